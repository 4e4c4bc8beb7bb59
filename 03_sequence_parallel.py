"""Stage 03 -- sequence parallelism: Ulysses, ring, and a 2-D mesh of both, with the KV cache.

The idea
    A chunk of N tokens is split into contiguous shards, one per rank (N need not divide: the first
    N % world_size ranks hold one token more). Attention needs every key for every query, so ranks exchange:
    * Ulysses (DeepSpeed-Ulysses): one all-to-all turns "my tokens, all heads" into "all tokens of my group,
      heads/U of them"; attention is local; a second all-to-all turns the result back. The KV cache is
      sharded by head, so per-step traffic does not grow with the video.
    * Ring: K/V blocks travel around the ring while each rank attends its queries to the block in hand;
      partial results merge by their log-sum-exp. The cache is sharded by sequence.
    * 2-D mesh: world = ulysses_degree x ring_degree. Wan-1.3B's 12 heads cannot use Ulysses alone on 8 ranks;
      Ulysses 4 x ring 2 can. Rank r = ring_rank * U + ulysses_rank: a Ulysses group is U consecutive ranks
      whose shards form one contiguous "ring shard" of the chunk.
    * Keys split on one GPU: a chunk's few queries over a long cache give too few thread blocks to fill
      the GPU's last wave; cut into runs of keys, run as one batch, the runs merge as the ring's blocks do.
    Within a chunk every query sees every visible key (stage 02's mask is all-ones there), so no mask is
    needed, and uneven shards use uneven all-to-all splits, not padding. Bad configurations (heads not
    divisible by U, U x R != world, ranks disagreeing on shapes) raise the same ValueError on every rank
    before any data collective, so nothing hangs. ulysses_all_to_all is the process group's all_to_all_single
    (NCCL on GPU, gloo on CPU) or, on GPUs, SymmetricExchange: peer copies into symmetric memory between two
    device-side barriers, with no host-side bookkeeping, which matters once stage 06 captures CUDA graphs.
Shapes
    q, k, v per rank (in/out):     [batch, n_local, heads, head_dim]
    after seq_to_heads:            [n_ring_shard, batch, heads / U, head_dim], token-major (rows by source)
    K/V (cache + chunk) per rank:  [tokens of its ring shard, 2, batch, heads / U, head_dim]
Uses
    02_causal_attention: KVCache, heads_major, fast_attention, attention, block_causal_mask
Run
    python 03_sequence_parallel.py                          (one process: the degenerate mesh 1 x 1)
    torchrun --nproc_per_node=4 03_sequence_parallel.py     every Ulysses x ring factorization the heads
                                                            allow, with and without a KV cache, uneven N;
                                                            prints the max error against one process"""
import datetime
import importlib
import os

import torch
import torch.distributed as dist

from support.harness import (BadInput, Parser, check, choose_device, is_rank_zero, non_negative, positive,
                             run_main)

causal = importlib.import_module("02_causal_attention")


# ----------------------------------------------------------------------------- process groups

def init_distributed(timeout_s=600, needs_gpus=None):
    """Join the torchrun job if any; returns this rank's device (support.harness.choose_device). A run that
    `needs_gpus` (e.g. "--bench") and lacks them stops with the same BadInput on every rank."""
    ranks_on_node = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device, note = choose_device(ranks_on_node, gpus, int(os.environ.get("LOCAL_RANK", 0)), needs_gpus)
    if note and is_rank_zero():
        print(note, flush=True)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return device


def job_device():
    """The device of this rank's collectives: its GPU under nccl, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def world():
    return (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)


def shard_bounds(length, parts):
    """Contiguous [first, end) ranges of `length` tokens over `parts` ranks; earlier ranks take the extras."""
    base, extra = divmod(length, parts)
    bounds, first = [], 0
    for i in range(parts):
        end = first + base + (i < extra)
        bounds.append((first, end))
        first = end
    return bounds


class SPMesh:
    """U x R ranks: Ulysses groups of U consecutive ranks, ring groups of ranks U apart. SPMesh.get(U, R)
    creates the groups once per shape and reuses them (creating a process group is itself a collective)."""
    _made = {}

    @classmethod
    def get(cls, ulysses_degree=None, ring_degree=1, device=None):
        world_size, _ = world()
        if ulysses_degree is None:
            ulysses_degree = world_size // ring_degree if ring_degree and world_size % ring_degree == 0 else 0
        key = (ulysses_degree, ring_degree)
        if key not in cls._made:
            cls._made[key] = cls(ulysses_degree, ring_degree, device)
        return cls._made[key]

    def __init__(self, ulysses_degree, ring_degree, device=None, local=False):
        """local=True: a 1 x 1 mesh of this process alone, whatever the job (the single-process reference)."""
        world_size, rank = (1, 0) if local else world()
        self.device = torch.device(device or ("cpu" if local else job_device()))
        problem = None
        if ulysses_degree < 1 or ring_degree < 1 or ulysses_degree * ring_degree != world_size:
            problem = (f"ulysses {ulysses_degree} x ring {ring_degree} does not multiply to the world size "
                       f"{world_size}")
        self.world_size, self.rank = world_size, rank
        self.agree("SPMesh", problem, ulysses_degree=ulysses_degree, ring_degree=ring_degree)
        self.ulysses_degree, self.ring_degree = ulysses_degree, ring_degree
        self.ring_rank, self.ulysses_rank = divmod(rank, ulysses_degree)
        self.ulysses_ranks = [self.ring_rank * ulysses_degree + i for i in range(ulysses_degree)]
        self.ring_ranks = [j * ulysses_degree + self.ulysses_rank for j in range(ring_degree)]
        self.ulysses_group = self._groups([[j * ulysses_degree + i for i in range(ulysses_degree)]
                                           for j in range(ring_degree)], self.ring_rank)
        self.ring_group = self._groups([[j * ulysses_degree + i for j in range(ring_degree)]
                                        for i in range(ulysses_degree)], self.ulysses_rank)
        self.symmetric = None       # a SymmetricExchange once use_symmetric_memory() chose it

    def use_symmetric_memory(self):
        """Ulysses all-to-alls as SymmetricExchange (GPU; every rank calls it); ring steps stay NCCL."""
        if self.ulysses_degree > 1 and self.symmetric is None:
            self.symmetric = SymmetricExchange(self)

    def _groups(self, all_ranks, mine):         # every rank creates every group; returns its own
        if len(all_ranks[0]) in (1, self.world_size):
            return None if len(all_ranks[0]) == 1 else dist.group.WORLD
        return [dist.new_group(ranks) for ranks in all_ranks][mine]

    def agree(self, what, problem=None, **fields):
        """Raise the same BadInput on every rank if any rank found a `problem` (a message, or None) or ranks
        passed different integer `fields`: one all_gather of one shape everywhere (one more for the messages),
        so it cannot hang. A mesh of one process asks no one (others may be waiting): it raises its own."""
        if self.world_size == 1:
            if problem:
                raise BadInput(f"{what}: {problem}")
            return
        mine = torch.tensor([problem is not None] + [int(v) for v in fields.values()], dtype=torch.int64,
                            device=self.device)
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine)
        every = [row.tolist() for row in every]
        failed = [r for r, row in enumerate(every) if row[0]]
        if failed:
            messages = [None] * self.world_size
            dist.all_gather_object(messages, problem)
            raise BadInput(f"{what}: rank {failed[0]}: {messages[failed[0]]} "
                                f"(ranks rejecting their input: {failed})")
        for i, name in enumerate(fields, start=1):
            values = [row[i] for row in every]
            if len(set(values)) > 1:
                raise BadInput(f"{what}: ranks disagree on {name}: {values} (by rank)")

    def heads_problem(self, heads):
        if heads % self.ulysses_degree:
            return f"{heads} heads do not split over a Ulysses degree of {self.ulysses_degree}"
        return None

    def token_shard(self, length, rank=None):
        """This rank's (or `rank`'s) [first, end) of a chunk of `length` tokens."""
        return shard_bounds(length, self.world_size)[self.rank if rank is None else rank]

    def ring_shard(self, length, ring_rank=None):
        """The tokens a Ulysses group holds together (contiguous): what its ranks attend as queries."""
        j = self.ring_rank if ring_rank is None else ring_rank
        bounds = shard_bounds(length, self.world_size)
        return bounds[j * self.ulysses_degree][0], bounds[(j + 1) * self.ulysses_degree - 1][1]

    def ulysses_sizes(self, length):
        return [b - a for a, b in (self.token_shard(length, r) for r in self.ulysses_ranks)]


# ----------------------------------------------------------------------------- Ulysses all-to-all

def ulysses_all_to_all(send, rows, mesh, async_op=False):
    """All-to-all of rows (dim 0) in the Ulysses group; rows[s][p]: rows member s sends member p (one matrix
    on every rank). send holds my rows for member 0, 1, ... in turn, the result the rows from each in turn.
    async_op: returns (recv, work), valid after work.wait() (work None: already in stream order)."""
    me = mesh.ulysses_rank
    if mesh.symmetric is not None:
        recv = mesh.symmetric(send, rows)
        return (recv, None) if async_op else recv
    recv = send.new_empty(sum(r[me] for r in rows), *send.shape[1:])
    work = dist.all_to_all_single(recv, send, output_split_sizes=[r[me] for r in rows],
                                  input_split_sizes=rows[me], group=mesh.ulysses_group, async_op=async_op)
    return (recv, work) if async_op else recv


def exchange_rows(send, mesh, length, async_op=False):
    """send [U * n_local, ...], n_local rows per member in turn -> [n_ring_shard, ...] in token order."""
    sizes = mesh.ulysses_sizes(length)
    rows = [[n] * len(sizes) for n in sizes]                  # member s sends its n_s rows to every member
    return ulysses_all_to_all(send, rows, mesh, async_op)


def seq_to_heads(x, mesh, length, async_op=False):
    """[B, n_local, H, D] (my tokens, all heads) -> [n_ring_shard, B, H/U, D] (group's tokens, my heads)."""
    U = mesh.ulysses_degree
    if U == 1:
        return (x.transpose(0, 1), None) if async_op else x.transpose(0, 1)
    B, n, H, D = x.shape
    send = (x.reshape(B, n, U, H // U, D)               # [B, n, U, Hu, D]: head groups, one per member
            .permute(2, 1, 0, 3, 4)                      # [U, n, B, Hu, D]: member-major
            .reshape(U * n, B, H // U, D))               # [U*n, B, Hu, D]: member p's rows are p*n..p*n+n-1
    return exchange_rows(send, mesh, length, async_op)


def heads_to_seq(x, mesh, length):
    """Token-major [n_ring_shard, B, H/U, D] -> [B, n_local, H, D]: the inverse of seq_to_heads."""
    U = mesh.ulysses_degree
    if U == 1:
        return x.transpose(0, 1)
    _, B, Hu, D = x.shape
    sizes = mesh.ulysses_sizes(length)
    n = sizes[mesh.ulysses_rank]
    # every member s sends member p the rows of p's tokens: [n_ring, B, Hu, D] -> recv [U * n, B, Hu, D]
    recv = ulysses_all_to_all(x.contiguous(), [sizes] * U, mesh)
    out = recv.new_empty(B, n, U, Hu, D)                      # [B, n, U, Hu, D]: head group s at index s
    copy_rows_(out.permute(2, 1, 0, 3, 4),                    # [U, n, B, Hu, D] view of out
               recv.view(U, n, B, Hu, D))                     # the rows from member s = head group s
    return out.view(B, n, U * Hu, D)


def copy_rows_(dst, src):
    """dst.copy_(src) for strided rows, viewed as 16-byte complex128 words (bits only): 8 bf16 values a step,
    not one. The plain copy where a row, stride or offset is not a multiple of 16 bytes."""
    try:
        dst, src = dst.view(torch.complex128), src.view(torch.complex128)
    except RuntimeError:
        pass
    return dst.copy_(src)


class SymmetricExchange:
    """Ulysses all-to-all as writes into peers' receive buffers in torch's symmetric memory (CUDA, NVLink or
    PCIe peer access): barrier, one copy per peer, barrier, copy out; all kernels, safe in a CUDA graph.
    Buffers grow (collectively) as an exchange needs more room and are kept, so earlier graphs stay valid."""

    def __init__(self, mesh):
        from torch.distributed import _symmetric_memory
        self.symm_mem, self.mesh = _symmetric_memory, mesh
        group = mesh.ulysses_group
        self.group_name = group.group_name
        self.buffers = []       # (bytes, handle, this rank's buffer), growing; none is ever freed
        self.views = {}         # (buffer index, dtype) -> every member's buffer as a flat tensor of dtype

    def _buffer(self, nbytes, device):
        if not self.buffers or self.buffers[-1][0] < nbytes:
            local = self.symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
            self.buffers.append((nbytes, self.symm_mem.rendezvous(local, self.group_name), local))
        return len(self.buffers) - 1

    def __call__(self, send, rows):
        me, U = self.mesh.ulysses_rank, self.mesh.ulysses_degree
        row = send[0].numel()                                          # elements per row
        most = max(sum(r[p] for r in rows) for p in range(U)) * row    # the largest receive of any member
        index = self._buffer(most * send.element_size(), send.device)
        _, handle, _ = self.buffers[index]
        if (index, send.dtype) not in self.views:
            self.views[index, send.dtype] = [handle.get_buffer(p, (most,), send.dtype) for p in range(U)]
        peers = self.views[index, send.dtype]
        handle.barrier(channel=0)                     # every peer has copied out what it received last time
        first = 0
        for p in range(U):
            at = sum(rows[s][p] for s in range(me)) * row              # my rows' place in member p's buffer
            count = rows[me][p] * row
            peers[p][at:at + count].copy_(send[first:first + rows[me][p]].reshape(-1))
            first += rows[me][p]
        handle.barrier(channel=1)                     # every member's rows have landed in my buffer
        received = sum(r[me] for r in rows)
        return peers[me][:received * row].view(received, *send.shape[1:]).clone()


# ----------------------------------------------------------------------------- ring attention

def attention_with_lse(q, k, v):
    """Unmasked attention and its log-sum-exp [B, H, Nq] (float32 or wider), for merging partial results."""
    kernel = lse_kernel(q, k, v)
    if kernel is not None:
        out, lse = kernel(q, k, v)[:2]
        return out, lse.view(out.shape[:-1])
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(compute) @ k.to(compute).transpose(-1, -2)) / q.shape[-1] ** 0.5
    lse = scores.logsumexp(dim=-1)
    return ((scores - lse[..., None]).exp() @ v.to(compute)).to(q.dtype), lse


def lse_kernel(q, k, v):
    """PyTorch's fused GPU kernel giving a log-sum-exp for these operands (cuDNN's first), else None."""
    # None on the CPU, in float32, for a head size they refuse; host-side checks: graph capture sees the same
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    cuda = torch.backends.cuda
    try:
        params = cuda.SDPAParams(q, k, v, None, 0.0, False, False)
        if cuda.cudnn_sdp_enabled() and cuda.can_use_cudnn_attention(params):
            return lambda q, k, v: torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)
        if cuda.flash_sdp_enabled() and cuda.can_use_flash_attention(params):
            return torch.ops.aten._scaled_dot_product_flash_attention
    except (AttributeError, TypeError, RuntimeError):                  # a PyTorch without these checks
        pass
    return None


def merge_partial(out, lse, block_out, block_lse):
    """Combine two softmax-attention results over disjoint key sets, weighted by their log-sum-exps."""
    if out is None:
        return block_out.to(torch.promote_types(block_out.dtype, block_lse.dtype)), block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    out = out * (lse - new_lse).exp()[..., None] + block_out * (block_lse - new_lse).exp()[..., None]
    return out, new_lse


def ring_attention(q, kv, mesh, kv_lengths):
    """q [B, Hu, nq, D], this rank's kv [nk, 2, B, Hu, D]; kv_lengths[j]: tokens held by ring rank j."""
    R, j = mesh.ring_degree, mesh.ring_rank
    block = kv.contiguous()
    nxt, prv = mesh.ring_ranks[(j + 1) % R], mesh.ring_ranks[(j - 1) % R]
    out = lse = None
    for step in range(R):
        owner = (j - step) % R                                           # whose K/V `block` is
        incoming, reqs = None, []
        if step < R - 1:
            in_len = kv_lengths[(owner - 1) % R]
            incoming = block.new_empty(in_len, *block.shape[1:])
            ops = ([dist.P2POp(dist.isend, block, nxt)] if len(block) else []) + \
                  ([dist.P2POp(dist.irecv, incoming, prv)] if in_len else [])
            reqs = dist.batch_isend_irecv(ops) if ops else []
        if len(block):
            k, v = causal.heads_major(block[:, 0]), causal.heads_major(block[:, 1])
            out, lse = merge_partial(out, lse, *attention_with_lse(q, k, v))
        for req in reqs:
            req.wait()
        block = incoming
    return out.to(q.dtype)


def split_key_attention(q, k, v, parts, attend=attention_with_lse, merge=None):
    """q [B, H, Nq, D] attends to k, v [B, H, Nk, D] cut into `parts` equal runs of keys, run as one batch
    and merged by log-sum-exp as the ring's blocks are. merge: merge_parts, or a compiled copy of it."""
    if parts == 1:
        return attend(q, k, v)[0]
    B = q.shape[0]
    runs = lambda t: t.unflatten(2, (parts, -1)).movedim(2, 0).flatten(0, 1)    # [parts * B, H, Nk/parts, D]
    out, lse = attend(q.expand(parts, *q.shape).flatten(0, 1), runs(k), runs(v))  # views when B is 1
    return (merge or merge_parts)(out.unflatten(0, (parts, B)), lse.unflatten(0, (parts, B)))


def merge_parts(out, lse):
    """out [parts, B, H, Nq, D], lse [parts, B, H, Nq] -> the merged attention [B, H, Nq, D]."""
    merged, merged_lse = None, None
    for part in range(out.shape[0]):
        merged, merged_lse = merge_partial(merged, merged_lse, out[part], lse[part])
    return merged.to(out.dtype)


def key_parts(tiles, keys, processors, most, tile_keys=128):
    """Runs to cut `keys` into so that `tiles` thread blocks (batch x heads x query tiles) per run fill
    `processors` best: the fewest parts within 5% of the best."""
    # a last, partly filled wave of blocks costs a whole one; runs of equal length, >= 8 key tiles each
    fill = lambda p: p * tiles / (processors * -(-p * tiles // processors))
    fits = [p for p in range(1, min(most, keys // (8 * tile_keys)) + 1) if keys % p == 0]
    best = max((fill(p) for p in fits), default=1.0)
    return min((p for p in fits if fill(p) >= best - 0.05), default=1)


# ----------------------------------------------------------------------------- the SP attention layer

def check_shapes(mesh, q, k, v, chunk):
    """Every rank raises if any rank's input is wrong or ranks disagree on anything but shard length."""
    length = chunk[1] - chunk[0]
    first, end = mesh.token_shard(length)
    problem = None
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        problem = (f"q, k, v must share one [batch, tokens, heads, head_dim] shape; got "
                   f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    elif q.shape[1] != end - first:
        problem = f"holds {q.shape[1]} tokens but its shard of a {length}-token chunk is {end - first}"
    else:
        problem = mesh.heads_problem(q.shape[2])
    batch, _, heads, head_dim = q.shape if q.dim() == 4 else (-1, -1, -1, -1)
    mesh.agree("sequence-parallel attention", problem, batch=batch, heads=heads, head_dim=head_dim,
          chunk_first=chunk[0], chunk_end=chunk[1])


def sp_attention(q, k, v, mesh, chunk, cache=None, check=True):
    """q, k, v [B, n_local, H, D] (rotated): this rank's shard of global range `chunk`, attending to cache +
    chunk; K/V go into the cache's slots (commit_chunk keeps them). Three all-to-alls in, one out."""
    if check:
        check_shapes(mesh, q, k, v, chunk)
    length = chunk[1] - chunk[0]
    q_tm, k_tm, v_tm = (seq_to_heads(t, mesh, length) for t in (q, k, v))  # [n_ring, B, Hu, D]
    if cache is None:
        kv = torch.stack([k_tm, v_tm], dim=1)                                # [n_ring, 2, B, Hu, D]
    else:
        kv = cache.extend(k_tm, v_tm, chunk, ring_shard_of(mesh, chunk))     # [cached + n_ring, 2, B, Hu, D]
    return attend_heads(q_tm, kv, mesh, chunk, cache)


def ring_shard_of(mesh, chunk, ring_rank=None):
    """Global token range of `chunk` that ring rank `ring_rank`'s Ulysses group holds."""
    a, b = mesh.ring_shard(chunk[1] - chunk[0], ring_rank)
    return chunk[0] + a, chunk[0] + b


def commit_chunk(cache, mesh, chunk):
    """Keep the K/V the last pass over `chunk` wrote: this rank's part is its group's ring shard."""
    cache.commit(chunk, ring_shard_of(mesh, chunk))


def attend_heads(q_tm, kv, mesh, chunk, cache=None, attend=causal.fast_attention):
    """q_tm [n_ring, B, Hu, D] attends to kv [cached + n_ring, 2, B, Hu, D], then back to my token shard."""
    length = chunk[1] - chunk[0]
    q = causal.heads_major(q_tm)
    if mesh.ring_degree == 1:
        out = attend(q, causal.heads_major(kv[:, 0]), causal.heads_major(kv[:, 1]))   # as SDPA, [B, Hu, n, D]
    else:                           # every ring rank's K/V length: cached part (if any) + its chunk shard
        lengths = [b - a for a, b in (mesh.ring_shard(length, j) for j in range(mesh.ring_degree))]
        if cache is not None:
            lengths = [cache.held_length(lambda c, j=j: ring_shard_of(mesh, c, j)) + n
                       for j, n in enumerate(lengths)]
        out = ring_attention(q, kv, mesh, lengths)
    return heads_to_seq(out.permute(2, 0, 1, 3), mesh, length)         # [B, Hu, n, D] -> [n, B, Hu, D]


def gather_tokens(x_local, mesh, length, dim=1):
    """Every rank's shard of a `length`-token tensor, concatenated along `dim` in token order, everywhere."""
    if mesh.world_size == 1:
        return x_local
    return gather_shards(x_local, [b - a for a, b in shard_bounds(length, mesh.world_size)], dim)


def gather_shards(x_local, sizes, dim=1, group=None):
    """Parts of `sizes` along `dim`, rank order, concatenated on every rank (padded for one all_gather).
    `group`: a process group of all the job's ranks in order (default the job's own)."""
    x = x_local.movedim(dim, 0)
    padded = x.new_zeros(max(sizes), *x.shape[1:])
    padded[:x.shape[0]] = x
    every = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(every, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(every, sizes)]).movedim(0, dim)


def factorizations(world_size, heads):
    """Every (ulysses_degree, ring_degree) with U * R = world_size and U dividing the heads."""
    return [(u, world_size // u) for u in range(1, world_size + 1)
            if world_size % u == 0 and heads % u == 0]


def mesh_shape(world_size, heads, ring_degree=None):
    """(U, R): the given ring degree, or else the largest Ulysses degree the heads allow."""
    if ring_degree is None:
        return factorizations(world_size, heads)[-1]
    return (world_size // ring_degree if world_size % ring_degree == 0 else 0), ring_degree


def main():
    parser = Parser(__doc__)
    parser.add_argument("--tokens", type=positive, default=61,
                        help="tokens per chunk (need not divide the world size)")
    parser.add_argument("--heads", type=positive, default=12)
    parser.add_argument("--head-dim", type=positive, default=32)
    parser.add_argument("--chunks", type=positive, default=3, help="chunks run through the KV cache")
    parser.add_argument("--seed", type=non_negative, default=0)
    args = parser.parse_args()
    device = init_distributed()
    world_size, rank = world()
    dtype = torch.float64 if device.type == "cpu" else torch.bfloat16
    tol = 1e-12 if dtype == torch.float64 else 2e-2
    N, C = args.tokens, args.chunks
    gen = torch.Generator().manual_seed(args.seed)                       # same inputs on every rank
    q, k, v = (torch.randn(1, C * N, args.heads, args.head_dim, dtype=torch.float64, generator=gen)
               .to(device, dtype) for _ in "qkv")
    # single-process reference: chunk c attends to chunks 0..c (block-causal, stage 02's mask)
    mask = causal.block_causal_mask(C, N, 1).to(device)
    want = causal.attention(*(t.double().transpose(1, 2) for t in (q, k, v)), mask).transpose(1, 2)
    lines = []
    for U, R in factorizations(world_size, args.heads):
        mesh = SPMesh.get(U, R, device)
        first, end = mesh.token_shard(N)
        cache = causal.KVCache(capacity_tokens=C * N)
        outs = []
        for c in range(C):
            sl = slice(c * N + first, c * N + end)
            chunk = (c * N, c * N + N)
            outs.append(sp_attention(q[:, sl], k[:, sl], v[:, sl], mesh, chunk, cache))
            commit_chunk(cache, mesh, chunk)
        got = torch.cat([gather_tokens(o, mesh, N) for o in outs], dim=1)
        err = check(f"ulysses {U} x ring {R}", got, want, tol)
        lines.append(f"  ulysses {U} x ring {R}: {C} chunks of {N} tokens through the KV cache, "
                     f"max error vs one process {err:.1e}")
    if rank == 0:
        print(f"03_sequence_parallel: {world_size} rank(s), {device.type}, {dtype}, "
              f"{args.heads} heads, shards {[b - a for a, b in shard_bounds(N, world_size)]}")
        print("\n".join(lines))
    finish_distributed()


def finish_distributed():
    """Tear down in step: every rank passes a barrier, sub-groups go first, then the default group."""
    if dist.is_initialized():
        dist.barrier()
        for mesh in SPMesh._made.values():
            for group in {mesh.ulysses_group, mesh.ring_group} - {None, dist.group.WORLD}:
                dist.destroy_process_group(group)
        SPMesh._made.clear()
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
