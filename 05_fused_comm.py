"""Stage 05 -- fused communication: Q, K and V in one all-to-all, RMSNorm + RoPE fused into the packing.

The idea
    Stages 03-04's SP self-attention layer runs RMSNorm(q), RMSNorm(k), RoPE(q), RoPE(k) as separate passes,
    then three all-to-alls (q, k, v) in and one out. At Wan-1.3B shapes each all-to-all is a few MB:
    latency-bound, so the count matters more than the bytes. This stage builds the layer the fast way:
    * pack_qkv: one pass normalises q and k, rotates them with this rank's RoPE table slice (stage 04) and
      writes q, k, v into ONE send buffer laid out per destination rank. The plain function is the CPU path
      and the reference; on a GPU pack_qkv_rows does it in one Triton pass, each token's rows read once.
    * one all-to-all for Q/K/V (stage 03's exchange_rows), landing token-major: keys/values are one copy
      from the KV cache, queries need no copy.
    * "overlap": V needs neither norm nor RoPE, so its all-to-all starts before Q/K are packed and runs
      while they are (two exchanges, one of them hidden).
    CausalSelfAttention.forward picks unfused_attention (stages 03 + 04 as they are), fused_exchange or
    overlapped_exchange, then attends; K/V go into the cache's slots, kept by stage 03's commit_chunk. Where
    a Ulysses group is one rank (one GPU, ring-only SP), nothing is sent: pack_qkv writes K/V into the slots.
Shapes
    x (per rank):           [batch, n_local, dim]
    send buffer:            [U, n_local, 3, batch, heads/U, head_dim]   (one block per destination)
    received:               [n_ring_shard, 3, batch, heads/U, head_dim] (token-major)
    parameter names:        q, k, v, o (Linear dim->dim), norm_q, norm_k (RMSNorm over the full dim):
                            Wan2.1's self_attn names, so stage 06 loads real checkpoints into it
Uses
    01_rope: RopeTable, apply_rope, head_dim_problem, MAX_TIME_POSITIONS
    02_causal_attention: KVCache, fast_attention
    03_sequence_parallel: SPMesh, exchange_rows, seq_to_heads, attend_heads, sp_attention, commit_chunk,
        ring_shard_of, copy_rows_, gather_tokens, shard_bounds, mesh_shape, world, init_distributed,
        finish_distributed
    04_causal_rope_sp: causal_rope_sp, causal_rope_sp_positions, rope_allgather_baseline
Run
    python 05_fused_comm.py                         fused == overlap == unfused == one process
    torchrun --nproc_per_node=4 05_fused_comm.py    the same on 4 ranks (Ulysses; 2-D meshes via --ring)
    torchrun --nproc_per_node=2 05_fused_comm.py --bench
        Wan-1.3B shapes (4680 tokens, 12 x 128 heads, bf16 on GPU): median times per attention layer of
        the RoPE stage (all-gather baseline vs Causal-RoPE SP), Q/K/V exchange (three vs one all-to-all)
        and the whole layer (unfused, fused, overlap)"""
import functools
import importlib
from dataclasses import dataclass

import torch
from torch import nn

from support.harness import check, non_negative, Parser, positive, run_main
from support.timing import Timings

rope = importlib.import_module("01_rope")
causal = importlib.import_module("02_causal_attention")
sp = importlib.import_module("03_sequence_parallel")
crsp = importlib.import_module("04_causal_rope_sp")

MODES = ("unfused", "fused", "overlap")


def rms_norm(x, weight, eps):
    """Wan's RMSNorm: normalise in float32 (or wider) over the last (full model) dim, cast back, scale."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


@dataclass
class ShardLayout:
    """Where this rank's tokens sit, for one chunk: computed once per chunk, shared by every layer/step."""
    mesh: object
    table: object          # stage 01's RopeTable for the whole video
    start_frame: int
    num_frames: int

    def __post_init__(self):
        self.length = self.num_frames * self.table.tokens_per_frame
        first = self.start_frame * self.table.tokens_per_frame
        self.chunk = (first, first + self.length)                     # global token range of the chunk
        self.shard = self.mesh.token_shard(self.length)               # this rank's part, chunk-relative
        self.n_local = self.shard[1] - self.shard[0]
        self.cos, self.sin = self.table.chunk_rows(self.start_frame, self.num_frames, self.shard)
        # the frame inside the chunk of each token this rank holds (stage 06 modulates per frame)
        self.frame_index = torch.arange(*self.shard, device=self.cos.device) // self.table.tokens_per_frame


def pack_qkv(q, k, v, norm_q_weight, norm_k_weight, cos, sin, heads, ulysses_degree, eps, kv_out=None):
    """q, k, v [B, n, dim] -> send buffer [U, n, 3, B, heads/U, D]. v=None packs Q/K only ([U, n, 2, ...]):
    the overlap mode sends V on its own, earlier. kv_out [n, 2, B, heads, D] (U = 1: nothing is sent): K/V
    are written there, a cache slot, and the buffer holds Q alone ([1, n, 1, B, heads, D])."""
    B, n, dim = q.shape
    D, U = dim // heads, ulysses_degree
    parts = [rope.apply_rope(rms_norm(q, norm_q_weight, eps).view(B, n, heads, D), cos, sin),   # [B, n, H, D]
             rope.apply_rope(rms_norm(k, norm_k_weight, eps).view(B, n, heads, D), cos, sin)]
    if v is not None:
        parts.append(v.view(B, n, heads, D))
    if kv_out is not None:
        kv_out.copy_(torch.stack(parts[1:]).permute(2, 0, 1, 3, 4))     # [2, B, n, H, D] -> [n, 2, B, H, D]
        parts = parts[:1]
    P = len(parts)                                                    # 3 (q, k, v), 2 (q, k) or 1 (q)
    return (torch.stack(parts)                      # [P, B, n, H, D]
            .view(P, B, n, U, heads // U, D)        # [P, B, n, U, Hu, D]: head group u goes to member u
            .permute(3, 2, 0, 1, 4, 5)              # [U, n, P, B, Hu, D]: one block per member
            .contiguous())                          # member u's rows are send[u], token-major


def pack_qkv_rows(q, k, v, norm_q_weight, norm_k_weight, cos, sin, heads, ulysses_degree, eps, kv_out=None):
    """pack_qkv on a GPU as one Triton pass (pack_kernel): each token's q, k and v rows are read once and
    written where pack_qkv writes them, with its roundings. Elsewhere pack_qkv through torch.compile."""
    B, n, dim = q.shape
    D, U = dim // heads, ulysses_degree
    if not one_pass_takes(q, k, v, (norm_q_weight, norm_k_weight), cos, sin, heads, U, kv_out):
        return compiled(pack_qkv)(q, k, v, norm_q_weight, norm_k_weight, cos, sin, heads, U, eps, kv_out)
    send = q.new_empty(U, n, 1 if kv_out is not None else 2 + (v is not None), B, heads // U, D)
    members = lambda t: t.unflatten(2, (U, -1)).movedim(2, 0)             # [n, B, H, D] -> [U, n, B, Hu, D]
    q_to = send[:, :, 0]                                                   # each [U, n, B, Hu, D], D dense
    if kv_out is not None:
        k_to, v_to = members(kv_out[:, 0]), members(kv_out[:, 1])
    else:
        k_to, v_to = send[:, :, 1], send[:, :, 2 if v is not None else 1]   # no V: v_to is never written
    v_from = v if v is not None else k                                      # no V: never read
    if n and B:
        pack_kernel()[(n, B)](
            q, k, v_from, norm_q_weight.contiguous(), norm_k_weight.contiguous(), cos.contiguous(),
            sin.contiguous(), q_to, k_to, v_to, *q_to.stride()[:3], *k_to.stride()[:3],  # K, V: one layout
            *q.stride()[:2], *k.stride()[:2], *v_from.stride()[:2], eps, DIM=dim, HALF_D=D // 2,
            HU=heads // U, PAIRS=1 << (dim // 2 - 1).bit_length(), HAS_V=v is not None)
    return send


def one_pass_takes(q, k, v, weights, cos, sin, heads, ulysses_degree, kv_out):
    """Whether pack_kernel takes these: CUDA tensors of one float dtype, rows dense, cos/sin float32 [n, D/2],
    K/V into a slot only beside V, and no gradient asked for (the kernel makes none)."""
    n, dim = q.shape[1:]
    D = dim // heads
    tensors = [t for t in (q, k, v, *weights, kv_out) if t is not None]
    return (q.is_cuda and q.dtype in (torch.float32, torch.bfloat16, torch.float16) and D % 2 == 0
            and heads % ulysses_degree == 0 and (kv_out is None or v is not None)
            and all(t.dtype == q.dtype and t.stride(-1) == 1 for t in tensors)
            and (kv_out is None or kv_out.stride(-2) == D)
            and cos.shape == sin.shape == (n, D // 2) and cos.dtype == sin.dtype == torch.float32
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


@functools.lru_cache(maxsize=None)
def pack_kernel():
    """pack_qkv_rows' Triton kernel: program (t, b) takes token t of batch row b, its dim / 2 pairs (2i, 2i+1)
    as one [pairs, 2] block (a power of two, masked past dim / 2)."""
    import triton
    import triton.language as tl

    @triton.jit
    def normed_rotated(x, weight, pairs, live, cos, sin, eps, DIM: tl.constexpr):
        """rms_norm then apply_rope of one row's [pairs, 2] block, each rounded to x's dtype as they round."""
        dtype = x.dtype.element_ty
        a = tl.load(x + pairs, mask=live[:, None], other=0.0).to(tl.float32)
        a = (a * tl.rsqrt(tl.sum(a * a) / DIM + eps)).to(dtype)
        a = (a.to(tl.float32) * tl.load(weight + pairs, mask=live[:, None], other=0.0).to(tl.float32))
        a = a.to(dtype).to(tl.float32)
        real, imag = tl.split(a)
        return tl.join(real * cos - imag * sin, real * sin + imag * cos).to(dtype)

    @triton.jit
    def kernel(q, k, v, q_weight, k_weight, cos, sin, q_to, k_to, v_to, q_to_u, q_to_t, q_to_b, kv_to_u,
               kv_to_t, kv_to_b, q_b, q_t, k_b, k_t, v_b, v_t, eps, DIM: tl.constexpr, HALF_D: tl.constexpr,
               HU: tl.constexpr, PAIRS: tl.constexpr, HAS_V: tl.constexpr):
        t, b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
        i = tl.arange(0, PAIRS)                                   # pair i: head i // HALF_D, j = i % HALF_D
        live, j, head = i < DIM // 2, i % HALF_D, i // HALF_D
        pairs = 2 * i[:, None] + tl.arange(0, 2)[None, :]         # [PAIRS, 2]: columns 2i and 2i + 1
        member = (head // HU).to(tl.int64)[:, None]               # where the pair goes: [member, t, b, ...]
        within = (head % HU * 2 * HALF_D + 2 * j)[:, None] + tl.arange(0, 2)[None, :]     # at [.., hu, d]
        c = tl.load(cos + t * HALF_D + j, mask=live, other=0.0)
        s = tl.load(sin + t * HALF_D + j, mask=live, other=0.0)
        out = normed_rotated(q + b * q_b + t * q_t, q_weight, pairs, live, c, s, eps, DIM)
        tl.store(q_to + member * q_to_u + t * q_to_t + b * q_to_b + within, out, mask=live[:, None])
        out = normed_rotated(k + b * k_b + t * k_t, k_weight, pairs, live, c, s, eps, DIM)
        kv_at = member * kv_to_u + t * kv_to_t + b * kv_to_b + within
        tl.store(k_to + kv_at, out, mask=live[:, None])
        if HAS_V:
            value = tl.load(v + b * v_b + t * v_t + pairs, mask=live[:, None])
            tl.store(v_to + kv_at, value, mask=live[:, None])

    return kernel


@functools.lru_cache(maxsize=None)
def compiled(fn, dynamic=False):
    """fn through torch.compile, made once and shared (dynamic: one compilation for every shape)."""
    return torch.compile(fn, dynamic=dynamic)


class CausalSelfAttention(nn.Module):
    """Wan2.1's causal self-attention, sequence-parallel: x [B, n_local, dim] -> [B, n_local, dim]."""

    def __init__(self, dim, num_heads, eps=1e-6, mode="fused", compile=False):
        """mode: "fused", "overlap" or "unfused"; compile (for a GPU): pack_qkv_rows' one pass."""
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} does not split into {num_heads} heads")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.dim, self.num_heads, self.head_dim, self.eps = dim, num_heads, dim // num_heads, eps
        self.mode, self.pack_qkv = mode, pack_qkv_rows if compile else pack_qkv
        self.attend = causal.fast_attention                 # the attention kernel (stage 06 may swap it)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def check_input(self, x, layout):
        """Every rank raises the same error for a bad input or a disagreement, before any exchange."""
        problem = layout.mesh.heads_problem(self.num_heads)
        if x.dim() != 3 or x.shape[1] != layout.n_local or x.shape[2] != self.dim:
            problem = f"x is {tuple(x.shape)}, expected [batch, {layout.n_local}, {self.dim}]"
        layout.mesh.agree("CausalSelfAttention", problem, batch=x.shape[0] if x.dim() else -1,
                 dim=self.dim, heads=self.num_heads, chunk_first=layout.chunk[0], chunk_end=layout.chunk[1])

    def forward(self, x, layout, cache=None, check=False):
        if check:
            self.check_input(x, layout)
        return self.attend_projections(self.q(x), self.k(x), self.v(x), layout, cache)   # [B, n, dim] each

    def attend_projections(self, q, k, v, layout, cache=None):          # made already (06's FP8: one GEMM)
        if self.mode == "unfused":
            out = self.unfused_attention(q, k, v, layout, cache)
        else:
            held = sp.ring_shard_of(layout.mesh, layout.chunk)      # my group's part of the chunk
            if cache is not None and layout.mesh.ulysses_degree == 1:       # nothing to send: the packing
                like = q.unflatten(-1, (self.num_heads, -1)).transpose(0, 1)   # [n, B, H, D], a view
                slot, kv = cache.reserve(like, layout.chunk, held)          # writes K/V into their slots
                q_tm = self.pack(q, k, v, layout, kv_out=slot)[0, :, 0]     # [n, B, H, D]
            else:
                exchange = self.fused_exchange if self.mode == "fused" else self.overlapped_exchange
                q_tm, kv = exchange(q, k, v, layout)      # [n_ring, B, Hu, D], [n_ring, 2, B, Hu, D]
                if cache is not None:                                 # the chunk's K/V into its cache slots
                    slot, kv_all = cache.reserve(q_tm, layout.chunk, held)
                    sp.copy_rows_(slot, kv)
                    kv = kv_all                                       # [cached + n_ring, 2, B, Hu, D]
            out = sp.attend_heads(q_tm, kv, layout.mesh, layout.chunk, cache, self.attend)   # [B, n, H, D]
        return self.o(out.flatten(2))

    def unfused_attention(self, q, k, v, layout, cache):
        heads = lambda t: t.unflatten(-1, (self.num_heads, -1))       # [B, n, dim] -> [B, n, H, D]
        rotate = lambda t: crsp.causal_rope_sp(t, layout.table, layout.start_frame, layout.num_frames,
                                               layout.shard)
        q, k = rotate(heads(self.norm_q(q))), rotate(heads(self.norm_k(k)))
        return sp.sp_attention(q, k, heads(v), layout.mesh, layout.chunk, cache, check=False)

    def pack(self, q, k, v, layout, kv_out=None):
        """pack_qkv with this layer's weights and this rank's RoPE rows."""
        return self.pack_qkv(q, k, v, self.norm_q.weight, self.norm_k.weight, layout.cos, layout.sin,
                             self.num_heads, layout.mesh.ulysses_degree, self.eps, kv_out)

    def fused_exchange(self, q, k, v, layout):
        """One buffer, one all-to-all: q_tm [n_ring, B, Hu, D] and kv [n_ring, 2, B, Hu, D], token-major."""
        recv = self.exchange(self.pack(q, k, v, layout), layout)     # [n_ring, 3, B, Hu, D]
        return recv[:, 0], recv[:, 1:]

    def overlapped_exchange(self, q, k, v, layout):
        """The same result as fused_exchange, V sent first: its all-to-all runs while Q/K are packed."""
        v_heads = v.unflatten(-1, (self.num_heads, -1))               # [B, n, H, D]
        v_tm, v_work = sp.seq_to_heads(v_heads, layout.mesh, layout.length, async_op=True)
        recv = self.exchange(self.pack(q, k, None, layout), layout)  # [n_ring, 2, B, Hu, D], V in flight
        if v_work is not None:
            v_work.wait()
        return recv[:, 0], torch.stack([recv[:, 1], v_tm], dim=1)

    @staticmethod
    def exchange(send, layout):
        """send [U, n, P, B, Hu, D] (one block per member) -> [n_ring, P, B, Hu, D]: the group's tokens."""
        if layout.mesh.ulysses_degree == 1:
            return send[0]
        return sp.exchange_rows(send.flatten(0, 1), layout.mesh, layout.length)


# ----------------------------------------------------------------------------- the self-check

def with_mode(layer, mode):
    """A layer with `layer`'s weights, built to run as `mode`."""
    weight = layer.q.weight
    other = CausalSelfAttention(layer.dim, layer.num_heads, layer.eps, mode, layer.pack_qkv is not pack_qkv)
    other.to(weight.device, weight.dtype).load_state_dict(layer.state_dict())
    return other


def run_layer_chunks(layer, x_chunks, mesh, table, chunk_frames, use_cache=True):
    """Whole chunks x_chunks[c] [B, chunk_tokens, dim] through the layer and cache; my output shards."""
    cache = causal.KVCache(sum(x.shape[1] for x in x_chunks)) if use_cache else None
    outs = []
    for c, x in enumerate(x_chunks):
        layout = ShardLayout(mesh, table, c * chunk_frames, chunk_frames)
        outs.append(layer(x[:, slice(*layout.shard)], layout, cache, check=True))
        if cache is not None:
            sp.commit_chunk(cache, mesh, layout.chunk)
    return outs


def check_main(args, device):
    mesh = sp.SPMesh.get(*sp.mesh_shape(sp.world()[0], args.heads, args.ring))
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.manual_seed(args.seed)                                      # same weights and inputs on every rank
    layer = CausalSelfAttention(args.dim, args.heads, compile=device.type == "cuda").to(device, dtype)
    table = rope.RopeTable(args.dim // args.heads, args.chunks * args.chunk_frames, args.height, args.width,
                           dtype=dtype, device=device)
    tokens = args.chunk_frames * args.height * args.width
    x_chunks = [torch.randn(1, tokens, args.dim, dtype=dtype, device=device) for _ in range(args.chunks)]
    run = lambda on, mode: run_layer_chunks(with_mode(layer, mode), x_chunks, on, table, args.chunk_frames)
    with torch.no_grad():
        want = torch.cat(run(sp.SPMesh(1, 1, device, local=True), "unfused"), dim=1)   # one process
        errors = {}
        for mode in MODES:
            got = torch.cat([sp.gather_tokens(o, mesh, tokens) for o in run(mesh, mode)], dim=1)
            errors[mode] = check(mode, got, want, tol)
    if mesh.rank == 0:
        shards = [b - a for a, b in sp.shard_bounds(tokens, mesh.world_size)]
        print(f"05_fused_comm: {mesh.world_size} rank(s) = ulysses {mesh.ulysses_degree} x ring "
              f"{mesh.ring_degree}, {device.type}, {dtype}, chunks of {tokens} tokens (shards {shards})")
        for mode, err in errors.items():
            print(f"  {mode:<8s} layer, {args.chunks} chunks through the KV cache: max error vs one process "
                  f"{err:.1e}")


# ----------------------------------------------------------------------------- the benchmark

def bench_main(args, device):
    mesh = sp.SPMesh.get(*sp.mesh_shape(sp.world()[0], args.heads, args.ring))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    H, D = args.heads, args.dim // args.heads
    torch.manual_seed(args.seed)
    layer = CausalSelfAttention(args.dim, H, compile=device.type == "cuda").to(device, dtype)
    table = rope.RopeTable(D, args.video_frames, args.height, args.width, device=device)
    layout = ShardLayout(mesh, table, args.start_frame, args.chunk_frames)
    x = torch.randn(1, layout.n_local, args.dim, device=device, dtype=dtype)
    q_local = torch.randn(1, layout.n_local, H, D, device=device, dtype=dtype)
    layers = {mode: with_mode(layer, mode) for mode in MODES}
    start, grid, shard = args.start_frame, (args.chunk_frames, args.height, args.width), layout.shard
    if mesh.rank == 0:   # rows print as they are measured: at these shapes a CPU takes minutes for all
        gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        print(f"05_fused_comm --bench: {mesh.world_size} rank(s) (ulysses {mesh.ulysses_degree} x ring "
              f"{mesh.ring_degree}), {gpu}, {dtype}, chunk {grid} = {layout.length} tokens, {H} heads x {D}; "
              f"median of {args.repeats} runs", flush=True)
    timings = Timings(device, mesh.rank == 0, args.warmup, args.repeats)
    baseline = "RoPE: all-gather baseline (q)"
    with torch.no_grad():
        timings.time(baseline, lambda: crsp.rope_allgather_baseline(q_local, mesh, grid, start))
        timings.time("RoPE: Causal-RoPE SP, positions (q)",
                     lambda: crsp.causal_rope_sp_positions(q_local, grid, start, shard), versus=baseline)
        timings.time("RoPE: Causal-RoPE SP, table slice (q)",
                     lambda: crsp.causal_rope_sp(q_local, table, start, grid[0], shard), versus=baseline)
        compiled_rope = compiled(crsp.causal_rope_sp) if device.type == "cuda" else crsp.causal_rope_sp
        timings.time("RoPE: Causal-RoPE SP, table slice, compiled",
                     lambda: compiled_rope(q_local, table, start, grid[0], shard), versus=baseline)
        if mesh.ulysses_degree > 1:   # the exchanges alone: both sides send buffers already packed
            U = mesh.ulysses_degree
            send = torch.randn(U * layout.n_local, 3, 1, H // U, D, device=device, dtype=dtype)
            singles = [send[:, i].contiguous() for i in range(3)]
            timings.time("Q/K/V exchange: three all-to-alls",
                         lambda: [sp.exchange_rows(t, mesh, layout.length) for t in singles])
            timings.time("Q/K/V exchange: one fused all-to-all",
                         lambda: sp.exchange_rows(send, mesh, layout.length),
                         versus="Q/K/V exchange: three all-to-alls")
        for mode in MODES:
            timings.time(f"layer ({mode}), no cache", lambda: layers[mode](x, layout),
                         versus=None if mode == "unfused" else "layer (unfused), no cache")
        cache = causal.KVCache(args.cache_frames * table.tokens_per_frame + layout.length)
        prefill = ShardLayout(mesh, table, 0, args.cache_frames)    # earlier frames, committed once
        layer(torch.randn(1, prefill.n_local, args.dim, device=device, dtype=dtype), prefill, cache)
        sp.commit_chunk(cache, mesh, prefill.chunk)
        cached = ShardLayout(mesh, table, args.cache_frames, args.chunk_frames)
        unfused = f"layer (unfused), {args.cache_frames}-frame cache"
        for mode in MODES:
            name = f"layer ({mode}), {args.cache_frames}-frame cache"
            timings.time(name, lambda: layers[mode](x, cached, cache),
                         versus=None if name == unfused else unfused)


def main():
    parser = Parser(__doc__)
    parser.add_argument("--bench", action="store_true", help="time at Wan-1.3B shapes instead of checking")
    parser.add_argument("--ring", type=positive, default=None,
                        help="ring degree (Ulysses degree = world / ring); "
                             "default: as much Ulysses as the heads allow")
    parser.add_argument("--dim", type=positive, default=None, help="model dim (default 48, bench 1536)")
    parser.add_argument("--heads", type=positive, default=None, help="heads (default 4, bench 12)")
    parser.add_argument("--height", type=positive, default=None,
                        help="latent rows / 2 (default 3, bench 30)")
    parser.add_argument("--width", type=positive, default=None,
                        help="latent columns / 2 (default 5, bench 52)")
    parser.add_argument("--chunk-frames", type=positive, default=3)
    parser.add_argument("--chunks", type=positive, default=3)
    parser.add_argument("--video-frames", type=positive, default=21)
    parser.add_argument("--start-frame", type=non_negative, default=9)
    parser.add_argument("--cache-frames", type=non_negative, default=9,
                        help="bench: frames already in the KV cache")
    parser.add_argument("--warmup", type=non_negative, default=5)
    parser.add_argument("--repeats", type=positive, default=50)
    parser.add_argument("--seed", type=non_negative, default=0)
    args = parser.parse_args()
    for name, small, wan in (("dim", 48, 1536), ("heads", 4, 12), ("height", 3, 30), ("width", 5, 52)):
        if getattr(args, name) is None:
            setattr(args, name, wan if args.bench else small)
    if args.dim % args.heads or rope.head_dim_problem(args.dim // args.heads):
        parser.error(f"--dim {args.dim} must split into --heads {args.heads} heads of an even head_dim >= 6")
    if args.bench:
        last_frame = max(args.start_frame, args.cache_frames) + args.chunk_frames
        table_frames = args.video_frames
    else:
        last_frame, table_frames = args.chunks * args.chunk_frames, rope.MAX_TIME_POSITIONS
    if last_frame > min(table_frames, rope.MAX_TIME_POSITIONS):
        parser.error(f"the chunks reach frame {last_frame}, past the RoPE table "
                     f"(--video-frames {args.video_frames})")
    device = sp.init_distributed(needs_gpus="--bench" if args.bench else None)
    (bench_main if args.bench else check_main)(args, device)
    sp.finish_distributed()


if __name__ == "__main__":
    run_main(main)
