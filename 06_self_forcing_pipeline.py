"""Stage 06 -- the Self-Forcing pipeline: chunk-by-chunk, KV-cached, 4-step video generation, on N ranks.

The idea
    Self-Forcing distils Wan2.1-T2V-1.3B into a causal generator that makes a video's latents a chunk of
    3 latent frames at a time, in 4 denoising steps per chunk:
        for each chunk (start_frame = 0, 3, 6, ...):
            x = noise
            for t in [1000, 750, 500, 250], warped by the shift-5 flow-matching schedule
                     (to 1000, 937.5, 833.3, 625):
                v  = model(x, t)                 # reads the KV cache of earlier chunks, keeps nothing
                x0 = x - sigma_t * v             # the model predicts the flow
                x  = (1 - sigma_next) * x0 + sigma_next * fresh_noise     (not after the last step)
            hand out x0; model(x0, t=0) once more with commit: its K/V become the chunk's cache entries
    Here every rank keeps only its contiguous token shard of the chunk through all steps (re-noising is
    elementwise, the per-frame modulation is per token); attention is stage 05's layer (Causal-RoPE SP
    from the table of stage 01, one Q/K/V all-to-all, KV cache sharded like the attention); the text
    cross-attention needs no communication (each rank holds all 512 text tokens' K/V, computed once).
    Only a finished chunk is gathered, to be handed out.

Graph mode (the default on GPU)
    Split over GPUs, each rank's kernels get shorter but Python's work per forward does not: on 2 H100s an
    eager Wan-1.3B forward needs ~55 ms of host time to enqueue ~20 ms of GPU work. So on GPU every
    forward -- all 30 blocks, the all-to-alls included -- is a CUDA graph, captured once per visible-cache
    length and replayed from one host call (GraphedForward). Eager mode (EagerForward, --no-graph) is the
    same model code; CPU and the tests use it. Compilation and capture happen in a warm-up video before
    any clock starts.

The model
    Wan2.1's DiT with Self-Forcing's per-frame timesteps and the original parameter names (patch_embedding,
    text_embedding.{0,2}, time_embedding.{0,2}, time_projection.1, blocks.N.{modulation, norm3, self_attn.*,
    cross_attn.*, ffn.{0,2}}, head.{head, modulation}), so real checkpoints load strictly, including the
    Self-Forcing file layout ({'generator' | 'generator_ema': {'model.<name>': tensor}}).
    Tokens are patches of 1 x 2 x 2 latent pixels; a token's 64 values are ordered (pt, ph, pw, channel),
    the head's output order, so latents stay in token form through the whole loop.

Shapes (wan-1.3b, 480x832)
    latents:  [batch, 16, frames, 60, 104]   -> tokens [batch, frames * 1560, 64]; a chunk is 4680 tokens
    x per rank: [batch, n_local, 1536] residual stream in the model dtype (bf16 on GPU, as upstream)
    text: [batch, 512, 4096] umT5 features -> per block cross-attention K/V [batch, 12, 512, 128]

Settings
    Two frozen dataclasses: ModelConfig (the DiT's shape; PRESETS "tiny" and "wan-1.3b") and VideoSpec (latent
    frames, size in pixels, chunk and window frames). generate(model, text, video, mesh, seed) runs the loop.

Uses
    01_rope: RopeTable; check, Timings/time_ms and the command line (the shared harness)
    02_causal_attention: KVCache, window_problem
    03_sequence_parallel: SPMesh, gather_tokens, commit_chunk, ring_shard_of, mesh_shape,
                          init/finish_distributed
    05_fused_comm: CausalSelfAttention (stage 04's Causal-RoPE SP works inside it), ShardLayout, RMSNorm,
                   rms_norm, on_device

Run
    python 06_self_forcing_pipeline.py                              tiny preset, one process
    torchrun --nproc_per_node=8 06_self_forcing_pipeline.py         tiny preset, 8 ranks (CPU: gloo)
    torchrun --nproc_per_node=2 06_self_forcing_pipeline.py --preset wan-1.3b \\
        --checkpoint self_forcing_dmd.pt \\
        --text-embedding prompt_umt5.pt --output out/latents.pt
    Prints first-chunk latency, total time and frames per second; saves the latents. With the optional
    packages (diffusers, transformers, imageio) and a local Wan2.1 diffusers release, a prompt goes in and
    an mp4 comes out: --wan-folder Wan2.1-T2V-1.3B-Diffusers --prompt "a red fox" --video out/fox.mp4.
    On GPU:
    torchrun --nproc_per_node=2 06_self_forcing_pipeline.py --preset wan-1.3b --bench --profile
        warm-up, chunk forward, first chunk, whole video, FPS; host vs kernel time per forward (rank 0)
    torchrun --nproc_per_node=2 06_self_forcing_pipeline.py --preset wan-1.3b --verify --frames 9
        CUDA graph == eager, and 2 GPUs == 1 GPU (float32 to 1e-5; bfloat16 within bfloat16's own error)
    --exchange symm makes the all-to-alls peer copies into symmetric memory instead of NCCL calls.
"""
import contextlib
import copy
import functools
import gc
import importlib
import importlib.util
import json
import math
import os
import statistics
import struct
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

rope = importlib.import_module("01_rope")
causal = importlib.import_module("02_causal_attention")
sp = importlib.import_module("03_sequence_parallel")
fused = importlib.import_module("05_fused_comm")

PATCH = (1, 2, 2)                  # latent frames x rows x columns per token
VAE_STRIDE = 8                     # video pixels per latent pixel (and 4 video frames per latent frame)
CHUNK_FRAMES = 3                   # latent frames generated together
DENOISING_STEPS = (1000, 750, 500, 250)
SHIFT = 5.0                        # of the flow-matching schedule that warps DENOISING_STEPS


@dataclass(frozen=True)
class ModelConfig:
    """The DiT's shape, under Wan2.1's own names. A name it does not have is an error (a TypeError)."""
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16               # latent channels in and out
    out_dim: int = 16
    text_dim: int = 4096           # umT5-XXL features
    text_len: int = 512            # text tokens; shorter prompts are zero-padded
    freq_dim: int = 256            # sinusoidal timestep embedding
    eps: float = 1e-6

    @property
    def head_dim(self):
        return self.dim // self.num_heads


PRESETS = {
    # tests and CPU runs: the same architecture, small
    "tiny": ModelConfig(dim=48, ffn_dim=96, num_heads=4, num_layers=2, text_dim=32, text_len=16, freq_dim=32),
    # Wan2.1-T2V-1.3B (Self-Forcing's generator)
    "wan-1.3b": ModelConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
}
PRESET_SIZE = {"tiny": (64, 96), "wan-1.3b": (480, 832)}     # default video height, width (pixels)


@dataclass(frozen=True)
class VideoSpec:
    """What to generate: `frames` latent frames (4 (frames - 1) + 1 video frames) of height x width video
    pixels, `chunk_frames` latent frames at a time; each chunk attends to the last `window_frames` latent
    frames, its own included (None: all of them). `problem()` says what is wrong, if anything."""
    frames: int
    height: int
    width: int
    chunk_frames: int = CHUNK_FRAMES
    window_frames: Optional[int] = None

    @property
    def latent_height(self):
        return self.height // VAE_STRIDE

    @property
    def latent_width(self):
        return self.width // VAE_STRIDE

    @property
    def grid(self):
        """(frames, rows, columns) of tokens: one token per PATCH of latent pixels."""
        return self.frames, self.latent_height // PATCH[1], self.latent_width // PATCH[2]

    @property
    def tokens_per_frame(self):
        return self.grid[1] * self.grid[2]

    @property
    def num_chunks(self):
        return self.frames // self.chunk_frames

    @property
    def video_frames(self):
        return 4 * (self.frames - 1) + 1

    def problem(self):
        """What is wrong with this video for the model (a message), or None."""
        step = VAE_STRIDE * PATCH[1]
        if self.height % step or self.width % step:
            return f"height {self.height} and width {self.width} must be multiples of {step}"
        if self.frames < 1 or self.frames % self.chunk_frames:
            return f"{self.frames} latent frames are not a whole number of chunks of {self.chunk_frames}"
        if self.frames > rope.MAX_TIME_POSITIONS:
            return (f"{self.frames} latent frames exceed the RoPE table's {rope.MAX_TIME_POSITIONS} "
                    "time positions")
        return causal.window_problem(self.window_frames, self.chunk_frames)


# ----------------------------------------------------------------------------- the model

def sinusoidal_embedding(dim, positions):
    """Wan's timestep embedding: [cos, sin] of position * 10000^(-i / (dim/2)), in float64."""
    half = dim // 2
    inv_freq = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=positions.device) / half)
    angles = torch.outer(positions.double(), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class LayerNorm(nn.LayerNorm):
    """Wan's LayerNorm: computed in float32 (or wider), cast back."""

    def forward(self, x):
        return super().forward(x.to(torch.promote_types(x.dtype, torch.float32))).type_as(x)


class CrossAttention(nn.Module):
    """Text cross-attention: each rank's tokens attend to all text tokens; no communication."""

    def __init__(self, dim, num_heads, eps=1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = fused.RMSNorm(dim, eps), fused.RMSNorm(dim, eps)

    def forward(self, x, context_kv):
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)   # [B, H, n, D]
        out = F.scaled_dot_product_attention(q, *context_kv)
        return self.o(out.transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, dim, ffn_dim, num_heads, eps=1e-6):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = fused.CausalSelfAttention(dim, num_heads, eps)
        self.norm3 = LayerNorm(dim, eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, num_heads, eps)
        self.norm2 = LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def modulated(self, norm, x, e, frame_index, which):
        """norm(x) * (1 + scale) + shift with this token's frame's (shift, scale) = e[.., which:which+2]."""
        shift, scale = (self.modulation[0, which:which + 2]
                        + e[:, :, which:which + 2]).unbind(2)                     # each [B, F, dim]
        return norm(x) * (1 + scale[:, frame_index]) + shift[:, frame_index]

    def gate(self, e, frame_index, which):
        return (self.modulation[0, which] + e[:, :, which])[:, frame_index]

    def feed_forward(self, h):
        """ffn(h). On GPU the first Linear runs with cuBLASLt's bias + GELU(tanh) epilogue (one kernel, no
        extra pass over the [tokens, 8960] activation; Inductor keeps this op as a library call). On CPU that
        op would use exact GELU, so the plain modules run there."""
        if not h.is_cuda:
            return self.ffn(h)
        up = self.ffn[0]
        hidden = torch._addmm_activation(up.bias, h.flatten(0, 1), up.weight.t(), use_gelu=True)
        return self.ffn[2](hidden.unflatten(0, h.shape[:2]))

    def pre_attention(self, x, e, frame_index):
        return self.modulated(self.norm1, x, e, frame_index, 0)

    def post_attention(self, x, y, e, frame_index, context_kv):
        """Everything after self-attention: gated residual, cross-attention, modulated FFN."""
        x = x + y * self.gate(e, frame_index, 2)
        x = x + self.cross_attn(self.norm3(x), context_kv)
        ffn = self.feed_forward(self.modulated(self.norm2, x, e, frame_index, 3))
        return x + ffn * self.gate(e, frame_index, 5)

    def forward(self, x, e, layout, cache, context_kv, mode="fused"):
        h = fused.on_device(Block.pre_attention, x)(self, x, e, layout.frame_index)
        y = self.self_attn(h, layout, cache, mode=mode)       # writes the chunk's K/V to the cache slots
        return fused.on_device(Block.post_attention, x)(self, x, y, e, layout.frame_index, context_kv)


class Head(nn.Module):
    def __init__(self, dim, out_features, eps=1e-6):
        super().__init__()
        self.norm = LayerNorm(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)

    def forward(self, x, e, frame_index):
        shift, scale = (self.modulation[None] + e[:, :, None]).unbind(2)          # [B, F, dim]
        h = self.norm(x) * (1 + scale[:, frame_index]) + shift[:, frame_index]
        return self.head(h)


class CausalWanModel(nn.Module):
    """Wan2.1 DiT, causal, sequence-parallel. forward(tokens of this rank's shard) -> predicted flow."""

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.patch_embedding = nn.Conv3d(c.in_dim, c.dim, kernel_size=PATCH, stride=PATCH)
        self.text_embedding = nn.Sequential(nn.Linear(c.text_dim, c.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(c.dim, c.dim))
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, 6 * c.dim))
        self.blocks = nn.ModuleList([Block(c.dim, c.ffn_dim, c.num_heads, c.eps)
                                     for _ in range(c.num_layers)])
        self.head = Head(c.dim, math.prod(PATCH) * c.out_dim, c.eps)
        # The RoPE table is not a parameter or buffer (as upstream): real checkpoints load strictly.

    @property
    def dtype(self):
        return self.head.head.weight.dtype

    def text_context(self, text):
        """text [B, L <= text_len, text_dim] (zero-padded to text_len) -> per block the cross-attention K/V
        [B, H, text_len, D]: k = norm_k(k(context)), v = v(context), computed once per video. All blocks'
        projections run as one GEMM over their concatenated weights (one launch instead of ~250 small ones
        on the path to the first chunk)."""
        c = self.config
        text = F.pad(text, (0, 0, 0, c.text_len - text.shape[1]))
        context = self.text_embedding(text.to(self.dtype))                         # [B, L, dim]
        attns = [block.cross_attn for block in self.blocks]
        weight = torch.cat([w for a in attns for w in (a.k.weight, a.v.weight)])   # [layers * 2 * dim, dim]
        bias = torch.cat([b for a in attns for b in (a.k.bias, a.v.bias)])
        kv = F.linear(context, weight, bias).unflatten(-1, (len(attns), 2, c.dim))  # [B, L, layers, 2, dim]
        k = fused.rms_norm(kv[:, :, :, 0], torch.stack([a.norm_k.weight for a in attns]), attns[0].norm_k.eps)
        heads = lambda t: t.unflatten(-1, (c.num_heads, -1)).transpose(1, 2)     # [B, L, dim] -> [B, H, L, D]
        return [(heads(k[:, :, i]), heads(kv[:, :, i, 1])) for i in range(len(attns))]

    def forward(self, tokens, timestep, layout, caches, context_kvs, mode="fused"):
        """tokens [B, n_local, 64] (patches, (pt, ph, pw, c) order), timestep [B, F] per frame of the chunk.
        Returns the predicted flow [B, n_local, 64] in float32 (or float64). Every block writes the chunk's
        K/V into its cache's slots after the cached tokens; only commit_chunk() makes them part of the
        cache."""
        # The residual stream and the modulation stay in the model dtype (bf16 on GPU), as upstream runs the
        # generator; norms compute in float32 inside. The flow comes back at least in float32 for the loop.
        weight = self.patch_embedding.weight.permute(0, 2, 3, 4, 1).flatten(1)      # conv as a linear layer
        x = F.linear(tokens.to(self.dtype), weight, self.patch_embedding.bias)       # [B, n, dim]
        t = sinusoidal_embedding(self.config.freq_dim, timestep.flatten()).to(self.dtype)
        e = self.time_embedding(t)                                                    # [B*F, dim]
        e6 = self.time_projection(e).unflatten(1, (6, self.config.dim))              # [B*F, 6, dim]
        e6 = e6.unflatten(0, timestep.shape)                                           # [B, F, 6, dim]
        for block, cache, context_kv in zip(self.blocks, caches, context_kvs):
            x = block(x, e6, layout, cache, context_kv, mode)
        flow = self.head(x, e.unflatten(0, timestep.shape), layout.frame_index)
        return flow.to(torch.promote_types(self.dtype, torch.float32))


# ----------------------------------------------------------------------------- the Self-Forcing loop

def warped_timesteps(steps=DENOISING_STEPS, shift=SHIFT, num_train_timesteps=1000):
    """Self-Forcing's denoising list: the shift-warped flow-matching schedule at 1000 - t
    (https://github.com/guandeh17/Self-Forcing pipeline/causal_inference.py). Returns (timesteps, sigmas)."""
    sigmas = torch.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=torch.float64)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    table = torch.cat([sigmas * num_train_timesteps, torch.zeros(1, dtype=torch.float64)])
    timesteps = [table[num_train_timesteps - t].item() for t in steps]
    return timesteps, [t / num_train_timesteps for t in timesteps]


def patchify(latents):
    """[B, C, F, H, W] -> tokens [B, F * H/2 * W/2, 4C], tokens (frame, row, column), values (ph, pw, c)."""
    B, C, Fr, H, W = latents.shape
    x = latents.view(B, C, Fr, H // 2, 2, W // 2, 2).permute(0, 2, 3, 5, 4, 6, 1)    # B F h w ph pw C
    return x.reshape(B, Fr * (H // 2) * (W // 2), 4 * C)


def unpatchify(tokens, frames, height, width):
    """Inverse of patchify (height/width in latent pixels)."""
    B, C = tokens.shape[0], tokens.shape[2] // 4
    x = tokens.view(B, frames, height // 2, width // 2, 2, 2, C).permute(0, 6, 1, 2, 4, 3, 5)
    return x.reshape(B, C, frames, height, width)


class NoiseSource:
    """Noise for the whole run from one seeded stream, drawn in a fixed order on every rank (so all ranks
    and the single-process run see the same numbers); each rank keeps its shard."""

    def __init__(self, seed, device):
        self.gen = torch.Generator(device).manual_seed(seed)
        self.device = device

    def chunk_noise(self, batch, channels, frames, height, width, shard):
        noise = torch.randn(batch, channels, frames, height, width, generator=self.gen, device=self.device)
        return patchify(noise)[:, slice(*shard)]


@functools.lru_cache(maxsize=8)
def rope_table(head_dim, frames, height, width, device, dtype=torch.float32):
    """The RoPE table of a video shape, built once and shared by every video of that shape (stage 01)."""
    return rope.RopeTable(head_dim, frames, height, width, dtype=dtype, device=device)


def video_rope_table(model, video, device):
    """The RoPE table of a video's token grid, in the model's precision or float32 (whichever is wider)."""
    dtype = torch.promote_types(model.dtype, torch.float32)
    return rope_table(model.config.head_dim, *video.grid, device, dtype)


def attention_backends(device):
    """On GPU, try cuDNN attention first (about 1.7x flash's rate on H200 at these shapes), then flash,
    then memory-efficient; PyTorch falls through to the next where a backend refuses the inputs."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch < 2.6: no priorities, PyTorch's own order
        return sdpa_kernel(order)


def new_caches(model, table, window_frames):
    """One KV cache per block, sized for the whole video (or the window)."""
    tpf = table.tokens_per_frame
    window_tokens = None if window_frames is None else window_frames * tpf
    return [causal.KVCache(window_tokens or table.frames * tpf, window_tokens) for _ in model.blocks]


def commit_chunk(caches, layout):
    """The K/V that the last pass wrote into the cache slots become the chunk's cache entries (bookkeeping
    only: Python ints, no device work)."""
    for cache in caches:
        sp.commit_chunk(cache, layout.mesh, layout.chunk)


class EagerForward:
    """The model forward over a chunk, launched kernel by kernel from Python (CPU, tests, --no-graph)."""

    def __init__(self, model, caches, mode):
        self.model, self.caches, self.mode = model, caches, mode

    def start_video(self, context_kvs):
        self.context_kvs = context_kvs

    def __call__(self, x, timestep, layout):
        return self.model(x, timestep, layout, self.caches, self.context_kvs, self.mode)


@torch.no_grad()
def generate(model, text, video, mesh, seed=0, mode="fused", graphs=None, graph_timeout_s=300, progress=False,
             on_chunk=None):
    """Generate the latents of `video` (a VideoSpec) on the mesh's ranks from text features [B, L, text_dim].
    Returns [B, 16, frames, height/8, width/8] on every rank, in float32 (float64 for a float64 model).
    mode: 05's attention layer; graphs: replay each forward from CUDA graphs (default: on GPU);
    on_chunk(index, seconds since the chunk loop began) is called as each chunk is handed out."""
    validate(model, mesh, video, text)
    device, batch = mesh.device if mesh.world_size > 1 else next(model.parameters()).device, text.shape[0]
    graphs = device.type == "cuda" if graphs is None else graphs
    if graphs and device.type != "cuda":
        raise ValueError("CUDA graphs need a GPU: use graphs=False (--no-graph) on CPU")
    table = video_rope_table(model, video, device)
    forward = chunk_forward(model, mesh, table, batch, video.window_frames, mode, graphs, graph_timeout_s)
    forward.start_video(model.text_context(text.to(device)))
    noise = NoiseSource(seed, device)
    chunks, start = [], time.perf_counter()
    bar = tqdm(total=video.num_chunks * len(DENOISING_STEPS), disable=not progress, desc="denoising",
               unit="step")
    with attention_backends(device):
        for start_frame in range(0, video.frames, video.chunk_frames):
            layout = fused.ShardLayout(mesh, table, start_frame, video.chunk_frames)
            for cache in forward.caches:      # a window drops what this chunk no longer sees (eagerly)
                cache.make_room(layout.chunk)
            x0 = denoise_chunk(forward, layout, noise, batch, video, bar)              # [B, n_local, 64]
            chunk = sp.gather_tokens(x0, mesh, layout.length)                         # hand the chunk out
            chunks.append(unpatchify(chunk, video.chunk_frames, video.latent_height, video.latent_width))
            if on_chunk:
                on_chunk(len(chunks) - 1, time.perf_counter() - start)
            if start_frame + video.chunk_frames < video.frames:   # clean-context pass (none after the last)
                forward(x0, torch.zeros(batch, video.chunk_frames, device=device), layout)
                commit_chunk(forward.caches, layout)
    bar.close()
    return torch.cat(chunks, dim=2).to(torch.promote_types(model.dtype, torch.float32))


def denoise_chunk(forward, layout, noise, batch, video, bar):
    """The 4 denoising steps of one chunk on this rank's shard (reading the cache, keeping nothing).
    Returns x0 [B, n_local, 64]."""
    model, device = forward.model, noise.device
    act = torch.promote_types(model.dtype, torch.float32)
    timesteps, sigmas = warped_timesteps()
    shape = (batch, model.config.in_dim, layout.num_frames, video.latent_height, video.latent_width)
    x = noise.chunk_noise(*shape, layout.shard).to(act)
    for i, (t, sigma) in enumerate(zip(timesteps, sigmas)):
        timestep = torch.full((batch, layout.num_frames), t, device=device, dtype=torch.float64)
        flow = forward(x, timestep, layout)
        x0 = x - sigma * flow
        if i + 1 < len(timesteps):
            x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * noise.chunk_noise(*shape, layout.shard).to(act)
        bar.update()
    return x0


def validate(model, mesh, video, text):
    """Every rank checks the run's configuration, then all agree (same error everywhere, before any data
    collective): also catches ranks that were given different settings or different weights."""
    c = model.config
    text_problem = ((text.dim() != 3 or text.shape[2] != c.text_dim or text.shape[1] > c.text_len)
                    and f"text embedding is {tuple(text.shape)}, expected "
                        f"[batch, <= {c.text_len}, {c.text_dim}]")
    problem = video.problem() or text_problem or mesh.heads_problem(c.num_heads)
    mesh.agree("Self-Forcing pipeline", problem, frames=video.frames, height=video.latent_height,
               width=video.latent_width, chunk_frames=video.chunk_frames,
               window_frames=video.window_frames or 0,
               batch=text.shape[0] if text.dim() else -1, weights=parameter_fingerprint(model))


def parameter_fingerprint(model):
    """A number that differs when ranks hold different weights (the float64 sum's bits). Summing 1.4 B
    weights costs ~10 ms, so the value is kept until a parameter changes (its version counter moves)."""
    versions = [(id(p), p._version) for p in model.parameters()]
    kept = getattr(model, "_fingerprint", None)
    if kept is None or kept[0] != versions:
        total = sum(p.detach().double().sum() for p in model.parameters()).item()
        model._fingerprint = (versions, struct.unpack("<q", struct.pack("<d", total))[0])
    return model._fingerprint[1]


# ----------------------------------------------------------------------------- graph mode

class GraphedForward(EagerForward):
    """The model forward over a chunk, replayed from CUDA graphs: one host call per forward (GPU only).

    Why: split over 2 GPUs, one Wan-1.3B forward's ~1000 kernel launches, 60 exchanges and ~90 compiled
    regions' guard checks took the host longer than the GPU took to run them, so the GPUs sat idle. A
    graph replays the whole forward, every exchange included, from one launch.

    What makes the forward capturable:
      * what a graph reads lives at fixed addresses: this object owns static buffers for the tokens, the
        timestep, the chunk's RoPE rows and the text K/V; each call copies its inputs into them;
      * the KV caches are allocated once at capacity, and only reset between videos;
      * a pass writes its chunk's K/V into the cache slots whether or not it commits; committing is
        bookkeeping done after the replay (commit_chunk) and eviction runs before it (make_room), so the
        device work depends only on how many cached tokens each rank sees. That is the graph's key: one
        graph per chunk without a window; with a window, every chunk after the window fills shares one.
        The denoising passes and the clean-context pass of a chunk are the same graph;
      * nothing inside the forward waits on the host; the ranks' agreement check runs once per video.
    A new key costs one eager warm-up of the same call (compiles, connects NCCL, plans cuDNN), a barrier,
    the capture and a first replay, all under a Deadline. Graphs outlive the video: build one
    GraphedForward per video shape (`graphed_forward`) and later videos only replay.
    """

    def __init__(self, model, caches, mode, exchange, timeout_s):
        super().__init__(model, caches, mode)
        self.exchange, self.timeout_s = exchange, timeout_s
        self.graphs = {}            # visible-cache key -> (graph, output buffer)
        self.pool = None            # one memory pool for all of them: they never run at the same time
        self.static = None          # inputs the graphs read: x, timestep, layout (static RoPE rows), text K/V

    def start_video(self, context_kvs):
        for cache in self.caches:
            cache.reset()
        if self.static is None:
            self.context_kvs = [(k.clone(), v.clone()) for k, v in context_kvs]
        else:
            for mine, new in zip(self.context_kvs, context_kvs):
                for buffer, value in zip(mine, new):
                    buffer.copy_(value)

    def key(self, layout):
        """How many cached tokens each ring rank holds for this chunk (the graph's only varying input)."""
        mesh, cache = layout.mesh, self.caches[0]
        return layout.length, tuple(cache.held_length(lambda c, j=j: sp.ring_shard_of(mesh, c, j))
                                    for j in range(mesh.ring_degree))

    def __call__(self, x, timestep, layout):
        """The flow for this chunk, in a buffer that the next call overwrites."""
        if self.static is None:
            static_layout = copy.copy(layout)
            static_layout.cos, static_layout.sin = layout.cos.clone(), layout.sin.clone()
            self.static = (x.clone(), timestep.clone(), static_layout)
        static_x, static_t, static_layout = self.static
        static_x.copy_(x)
        static_t.copy_(timestep)
        static_layout.cos.copy_(layout.cos)
        static_layout.sin.copy_(layout.sin)
        vars(static_layout).update({k: v for k, v in vars(layout).items() if not isinstance(v, torch.Tensor)})
        key = self.key(layout)
        if key not in self.graphs:
            self.graphs[key] = self.capture(static_x, static_t, static_layout)
        graph, output = self.graphs[key]
        graph.replay()
        return output

    def capture(self, x, timestep, layout):
        run = lambda: self.model(x, timestep, layout, self.caches, self.context_kvs, self.mode)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):   # warm-up, off the capture: compile, NCCL connections, cuDNN plans
            run()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        if layout.mesh.world_size > 1:        # every rank captures the same exchanges, together
            dist.barrier()
        graph, self.pool = torch.cuda.CUDAGraph(), self.pool or torch.cuda.graph_pool_handle()
        what = f"CUDA graph capture and first replay of the model forward (exchange: {self.exchange})"
        with Deadline(self.timeout_s, what):
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                output = run()
            graph.replay()
            torch.cuda.synchronize()
        return graph, output


@functools.lru_cache(maxsize=4)
def graphed_forward(model, mesh, table, batch, window_frames, mode, timeout_s):
    """The GraphedForward of one video shape, built at its first video and reused by every later one."""
    caches = new_caches(model, table, window_frames)
    return GraphedForward(model, caches, mode, exchange_name(mesh), timeout_s)


def chunk_forward(model, mesh, table, batch, window_frames, mode, graphs, graph_timeout_s):
    """What runs the model over a chunk: the shape's GraphedForward (kept across videos), or a fresh
    eager one."""
    if graphs:
        return graphed_forward(model, mesh, table, batch, window_frames, mode, graph_timeout_s)
    return EagerForward(model, new_caches(model, table, window_frames), mode)


class Deadline:
    """Ends this process with one clear line if a block of work has not finished in time: a captured NCCL
    exchange that hangs must not hang silently. Every rank runs its own timer, so every rank says it."""
    ADVICE = "rerun with --exchange symm (peer copies instead of NCCL) or with --no-graph"

    def __init__(self, seconds, what):
        self.seconds, self.what = seconds, what

    def expired(self):
        print(f"error: rank {sp.world()[1]}: {self.what} did not finish within {self.seconds:.0f} s; "
              f"{self.ADVICE}",
              file=sys.stderr, flush=True)
        os._exit(3)

    def __enter__(self):
        self.timer = threading.Timer(self.seconds, self.expired)
        self.timer.daemon = True
        self.timer.start()

    def __exit__(self, *exc):
        self.timer.cancel()


def exchange_name(mesh):
    return "none" if mesh.world_size == 1 else "symmetric memory" if mesh.symmetric is not None else "nccl"


def finish(timeout_s=120):
    """Drop every CUDA graph (NCCL cannot tear down a communicator that a live graph still uses: the job
    would hang at exit), then leave the process group in step with the other ranks."""
    graphed_forward.cache_clear()
    gc.collect()
    with Deadline(timeout_s, "leaving the process group"):
        sp.finish_distributed()


# ----------------------------------------------------------------------------- weights and text

def build_model(preset, dtype, device, seed, checkpoint=None, use_ema=False):
    """The model of a preset (a PRESETS name) in `dtype` on `device`: random weights from `seed` (the same on
    every rank), or the checkpoint's."""
    torch.manual_seed(seed)
    model = CausalWanModel(PRESETS[preset])
    if checkpoint:
        load_checkpoint(model, checkpoint, use_ema)
    return model.to(device, dtype).eval()


def load_text(path, model, batch, seed):
    """umT5 features [B, L, text_dim] from a tensor file ([L, text_dim] is batch 1), or random stand-ins."""
    c = model.config
    if path is None:   # random stand-in for umT5 features (--prompt encodes real ones)
        return torch.randn(batch, c.text_len, c.text_dim, generator=torch.Generator().manual_seed(seed + 1))
    expected = f"a tensor [L, {c.text_dim}] or [B, L, {c.text_dim}] with L <= {c.text_len}"
    if not os.path.isfile(path):
        raise rope.BadInput(f"--text-embedding {path}: no such file")
    try:
        text = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- a bad file fails inside pickle or zip in many ways
        raise rope.BadInput(f"--text-embedding {path}: not a torch tensor file ({type(e).__name__}); "
                            f"expected {expected}") from None
    if not isinstance(text, torch.Tensor):
        raise rope.BadInput(f"--text-embedding {path} holds a {type(text).__name__}; expected {expected}")
    text = text[None] if text.dim() == 2 else text
    if text.dim() != 3 or text.shape[2] != c.text_dim or not 1 <= text.shape[1] <= c.text_len:
        raise rope.BadInput(f"--text-embedding {path} is {tuple(text.shape)}; expected {expected}")
    return text


# Wan2.1's original names for diffusers' WanTransformer3DModel names: the inverse of the renaming
# in diffusers' scripts/convert_wan_to_diffusers.py. Whole dot-separated segments are matched; the first
# match wins.
DIFFUSERS_TO_WAN = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("proj_out", "head.head"),
    *((f"attn{i}.{theirs}", f"{ours}.{mine}") for i, ours in ((1, "self_attn"), (2, "cross_attn"))
      for theirs, mine in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"),
                           ("norm_q", "norm_q"), ("norm_k", "norm_k"))),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("norm2", "norm3"),                    # the affine norm before cross-attention
    ("scale_shift_table", "modulation"),   # a block's; the model's own (the head's) is named below
)


def rename(name, table, whole=None):
    """`name` with the first matching (from, to) segment run of `table` replaced; `whole` renames one full
    name (the top-level scale_shift_table, which is the head's modulation)."""
    if whole and name in whole:
        return whole[name]
    dotted = f".{name}."
    for old, new in table:
        if f".{old}." in dotted:
            return dotted.replace(f".{old}.", f".{new}.", 1)[1:-1]
    return name


def wan_name(diffusers_name):
    return rename(diffusers_name, DIFFUSERS_TO_WAN, {"scale_shift_table": "head.modulation"})


def diffusers_name(wan):
    theirs = [(ours, theirs) for theirs, ours in DIFFUSERS_TO_WAN]
    return rename(wan, theirs, {"head.modulation": "scale_shift_table"})


def read_weights(path, use_ema=False):
    """A checkpoint's tensors under Wan2.1's original names, from any of the forms people have:
      * a torch .pt: a plain Wan2.1 state dict, or Self-Forcing's {'generator' | 'generator_ema': ...};
      * Wan2.1's release: diffusion_pytorch_model.safetensors, or shards with their *.index.json;
      * a diffusers release (its folder, or its transformer/ folder): WanTransformer3DModel names, renamed."""
    if not os.path.exists(path):
        raise rope.BadInput(f"--checkpoint {path}: no such file or folder")
    if os.path.isdir(path) or path.endswith((".safetensors", ".json")):
        state = read_safetensors(safetensors_files(path))
    else:
        state = read_torch_checkpoint(path, use_ema)
    if "scale_shift_table" in state or any(k.startswith("condition_embedder.") for k in state):
        state = {wan_name(k): v for k, v in state.items()}
    return state


def read_torch_checkpoint(path, use_ema):
    """A torch .pt checkpoint's tensors: a plain state dict, or Self-Forcing's layout."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:   # a legacy (pre-zip) torch.save file cannot be memory-mapped: read it whole
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- pickle and zip each fail their own way on a bad file
        raise rope.BadInput(f"--checkpoint {path}: not a torch checkpoint (torch.load raised "
                            f"{type(e).__name__})") from None
    if isinstance(state, dict) and ("generator" in state or "generator_ema" in state):
        key = "generator_ema" if use_ema else "generator"
        if key not in state:
            raise rope.BadInput(f"{path}: no '{key}' entry (has {sorted(state)})")
        state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise rope.BadInput(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return {k.replace("_fsdp_wrapped_module.", "").removeprefix("model."): v for k, v in state.items()}


def safetensors_files(path):
    """The files of a safetensors checkpoint: one file, an *.index.json and its shards, or a folder of
    either (a diffusers release's top folder counts as its transformer/ folder)."""
    if os.path.isdir(path):
        transformer = os.path.join(path, "transformer")
        folder = transformer if os.path.isdir(transformer) else path
        names = sorted(os.listdir(folder))
        index = [n for n in names if n.endswith(".safetensors.index.json")]
        if index:
            return safetensors_files(os.path.join(folder, index[0]))
        files = [os.path.join(folder, n) for n in names if n.endswith(".safetensors")]
        if not files:
            raise rope.BadInput(f"--checkpoint {path}: no .safetensors files in {folder}")
        return files
    if path.endswith(".json"):
        try:
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise rope.BadInput(f"--checkpoint {path}: not a safetensors index "
                                f"({type(e).__name__})") from None
        return [os.path.join(os.path.dirname(path), shard) for shard in sorted(set(weight_map.values()))]
    return [path]


def read_safetensors(files):
    """The tensors of safetensors files, each problem naming its file."""
    from safetensors.torch import load_file
    state = {}
    for file in files:
        if not os.path.isfile(file):
            raise rope.BadInput(f"--checkpoint: shard {file} is missing")
        try:
            state.update(load_file(file))
        except Exception as e:  # noqa: BLE001 -- a truncated or corrupt file fails inside the parser
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
            raise rope.BadInput(f"--checkpoint {file}: not a readable safetensors file ({reason})") from None
    return state


def load_checkpoint(model, path, use_ema=False):
    """Load a checkpoint (any form read_weights reads) strictly: a missing, unreadable or ill-fitting file
    raises BadInput naming the file, and the key where a key is at fault."""
    state = read_weights(path, use_ema)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    problems = ([f"missing key {k}" for k in missing] + [f"unexpected key {k}" for k in unexpected] +
                [f"wrong shape {w}" for w in wrong])
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise rope.BadInput(f"{path} does not fit the model: " + "; ".join(problems[:10]) + more)
    model.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------- optional: prompt in, video out

EXTRAS = "pip install diffusers transformers imageio imageio-ffmpeg"


def extras_problem(prompt, video, wan_folder, text_embedding):
    """What stops --prompt / --video (a message), or None. Both use a local Wan2.1 diffusers release
    (text_encoder/ and tokenizer/ for the prompt, vae/ for the video) through the optional packages."""
    if not (prompt or video):
        return None
    if prompt and text_embedding:
        return "give --prompt or --text-embedding, not both"
    packages = ["diffusers", "transformers"] + (["imageio", "imageio_ffmpeg"] if video else [])
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        return f"--prompt and --video need the optional packages {', '.join(missing)}: {EXTRAS}"
    if not wan_folder:
        return ("--prompt and --video need --wan-folder: a local Wan2.1 diffusers release "
                "(text_encoder/, tokenizer/, vae/)")
    needed = (["text_encoder", "tokenizer"] if prompt else []) + (["vae"] if video else [])
    absent = [name for name in needed if not os.path.isdir(os.path.join(wan_folder, name))]
    if absent:
        return f"--wan-folder {wan_folder} has no {' or '.join(absent)} folder"
    return None


@torch.no_grad()
def encode_prompt(wan_folder, prompt, text_len, device):
    """umT5 features [1, L, 4096] of a prompt, made as diffusers' WanPipeline makes them: whitespace
    squeezed, the encoder's last hidden state, cut to the prompt's own L tokens (the model pads to
    text_len)."""
    from transformers import AutoTokenizer, UMT5EncoderModel
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(wan_folder, "tokenizer"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    encoder = UMT5EncoderModel.from_pretrained(os.path.join(wan_folder, "text_encoder"), torch_dtype=dtype)
    tokens = tokenizer([" ".join(prompt.split())], padding="max_length", max_length=text_len, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    encoder = encoder.to(device).eval()
    hidden = encoder(tokens.input_ids.to(device), tokens.attention_mask.to(device)).last_hidden_state
    return hidden[:, :int(tokens.attention_mask.sum())].float().cpu()


@torch.no_grad()
def decode_to_video(wan_folder, latents, path, device, fps=16):
    """Latents [1, 16, F, H/8, W/8] -> an mp4 of 4(F-1)+1 frames of H x W, through the Wan VAE of a
    diffusers release (latents un-normalised with the VAE's own mean and std, as WanPipeline does)."""
    from diffusers import AutoencoderKLWan
    from diffusers.utils import export_to_video
    vae = AutoencoderKLWan.from_pretrained(os.path.join(wan_folder, "vae"), torch_dtype=torch.float32)
    vae = vae.to(device).eval()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(device)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(device)
    video = vae.decode(latents.to(device, torch.float32) * std + mean, return_dict=False)[0]  # [1,3,T,H,W]
    frames = ((video[0].clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).cpu().numpy()              # [T, H, W, 3]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    export_to_video(list(frames), path, fps=fps)
    return len(frames)


def prompt_features(args, device, mesh, text_len):
    """Rank 0 encodes the prompt; every rank gets the features (one small broadcast)."""
    features = [encode_prompt(args.wan_folder, args.prompt, text_len, device) if mesh.rank == 0 else None]
    if mesh.world_size > 1:
        dist.broadcast_object_list(features, src=0)
    return features[0]


# ----------------------------------------------------------------------------- the command line

def main():
    parser = build_parser()
    args = parser.parse_args()
    check_flags(parser, args)
    device = sp.init_distributed()
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    heads = PRESETS[args.preset].num_heads
    mesh = sp.SPMesh.get(*sp.mesh_shape(sp.world()[0], heads, args.ring), device=device)
    if args.exchange == "symm":
        mesh.use_symmetric_memory()
    job = bench_main if args.bench else verify_main if args.verify else video_main
    job(args, video_spec(args), device, mesh, dtype)
    finish(args.graph_timeout)


def video_spec(args):
    """The video the flags ask for: the preset's size unless --height / --width say otherwise."""
    height, width = PRESET_SIZE[args.preset]
    return VideoSpec(args.frames, args.height or height, args.width or width,
                     window_frames=args.window_frames)


def video_main(args, video, device, mesh, dtype):
    """The main job: generate a video (after a warm-up one on GPU), report its speed, save the latents."""
    estimate = cpu_estimate(PRESETS[args.preset], video) if device.type == "cpu" else None
    if estimate and mesh.rank == 0:
        print(estimate, flush=True)
    model, text = read_inputs(args, dtype, device, mesh)
    if args.prompt:
        t0 = time.perf_counter()
        text = prompt_features(args, device, mesh, model.config.text_len)
        if mesh.rank == 0:
            print(f"prompt: {text.shape[1]} umT5 tokens in {time.perf_counter() - t0:.1f} s "
                  "(not in the figures below)")
    graphs = device.type == "cuda" and not args.no_graph
    run = lambda video=video, on=mesh, **kw: generate(model, text, video, on, args.seed, args.mode, graphs,
                                                      args.graph_timeout, **kw)
    warmup_s = None
    if device.type == "cuda":     # compile and capture before the clock starts, as a server would
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        warmup_s = time.perf_counter() - t0
    first_chunk = []
    t0 = time.perf_counter()
    latents = run(progress=mesh.rank == 0, on_chunk=lambda i, s: first_chunk.append(s))
    total = time.perf_counter() - t0
    if mesh.rank != 0:
        return
    save_latents({"latents": latents.cpu(), "frames": video.frames, "height": video.height,
                  "width": video.width, "seed": args.seed, "preset": args.preset}, args.output)
    print(f"06_self_forcing_pipeline: {args.preset}, {mesh.world_size} rank(s) (ulysses "
          f"{mesh.ulysses_degree} x ring {mesh.ring_degree}), {device.type}, {dtype}, {video.frames} latent "
          f"frames at {video.height}x{video.width}{', CUDA graphs' if graphs else ''}")
    if warmup_s is not None:
        print(f"  warm-up (compile, CUDA graph capture, one untimed video) {warmup_s:.1f} s")
    print(f"  first chunk {first_chunk[0] * 1e3:.1f} ms, total {total:.2f} s, {video.video_frames} video "
          f"frames -> {video.video_frames / total:.1f} FPS; latents {tuple(latents.shape)} saved to "
          f"{args.output}")
    if args.video:
        t0 = time.perf_counter()
        count = decode_to_video(args.wan_folder, latents, args.video, device)
        print(f"  video: {count} frames decoded by the Wan VAE in {time.perf_counter() - t0:.1f} s "
              f"(apart from the DiT's time), saved to {args.video}")
    if mesh.world_size > 1 and args.preset == "tiny":     # cheap here: show that the sharded run is right
        alone = run(video=replace(video, frames=CHUNK_FRAMES), on=sp.SPMesh(1, 1, device, local=True))
        error = (latents[:, :, :CHUNK_FRAMES] - alone).abs().max().item()
        print(f"  first chunk on {mesh.world_size} ranks vs one process: max error {error:.1e} ({dtype})")


def build_parser():
    parser = rope.Parser(__doc__)
    parser.add_argument("--bench", action="store_true",
                        help="time chunk forward, first chunk, whole video "
                             "(random weights; use --preset wan-1.3b)")
    parser.add_argument("--verify", action="store_true",
                        help="GPU: check CUDA-graph == eager latents, and N GPUs == 1 GPU "
                             "(float32 and bfloat16)")
    parser.add_argument("--profile", action="store_true",
                        help="bench: profile one chunk forward on rank 0, eager and graphed "
                             "(host vs kernel time)")
    parser.add_argument("--profile-dir", default=None,
                        help="bench --profile: also write the profiler tables here")
    parser.add_argument("--warmup", type=rope.non_negative, default=5, help="bench: untimed chunk forwards")
    parser.add_argument("--repeats", type=rope.positive, default=20, help="bench: timed chunk forwards")
    parser.add_argument("--warmup-videos", type=rope.non_negative, default=1,
                        help="bench: untimed videos (compile, capture)")
    parser.add_argument("--video-repeats", type=rope.positive, default=5, help="bench: timed videos")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--frames", type=rope.positive, default=21,
                        help="latent frames (21 = 81 video frames)")
    parser.add_argument("--height", type=rope.positive, default=None,
                        help="video height in pixels (preset default)")
    parser.add_argument("--width", type=rope.positive, default=None,
                        help="video width in pixels (preset default)")
    parser.add_argument("--window-frames", type=rope.positive, default=None,
                        help="local attention window (latent frames)")
    parser.add_argument("--seed", type=rope.non_negative, default=0)
    parser.add_argument("--checkpoint", help="Wan2.1 / Self-Forcing .pt (random weights when absent)")
    parser.add_argument("--use-ema", action="store_true",
                        help="take 'generator_ema' from a Self-Forcing file")
    parser.add_argument("--text-embedding", help="tensor file [L, 4096] or [B, L, 4096] of umT5 features")
    parser.add_argument("--prompt",
                        help="a text prompt, encoded with the umT5 of --wan-folder (optional packages)")
    parser.add_argument("--video", help="also decode the latents to this mp4 with the VAE of --wan-folder")
    parser.add_argument("--wan-folder",
                        help="a local Wan2.1 diffusers release (text_encoder/, tokenizer/, vae/)")
    parser.add_argument("--output", default="out/latents.pt")
    parser.add_argument("--ring", type=rope.positive, default=None,
                        help="ring degree (default: most Ulysses the heads allow)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32", "float64"], default=None,
                        help="default bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--mode", choices=fused.MODES, default="fused")
    parser.add_argument("--no-graph", action="store_true",
                        help="GPU: launch every kernel from Python instead of replaying CUDA graphs")
    parser.add_argument("--exchange", choices=["nccl", "symm"], default="nccl",
                        help="GPU: the Ulysses all-to-all as NCCL calls, "
                             "or as peer copies into symmetric memory")
    parser.add_argument("--graph-timeout", type=float, default=300,
                        help="seconds a CUDA graph capture and its first replay may take "
                             "before every rank stops")
    return parser


def check_flags(parser, args):
    """Flag checks that need nothing but the command line, so every rank fails alike, before any set-up."""
    heads = PRESETS[args.preset].num_heads
    step = VAE_STRIDE * PATCH[1]
    for name in ("height", "width"):
        if getattr(args, name) is not None and getattr(args, name) % step:
            parser.error(f"--{name} {getattr(args, name)} must be a multiple of {step} (8 pixels per latent "
                         "pixel, 2 latent pixels per patch)")
    if args.frames % CHUNK_FRAMES or args.frames > rope.MAX_TIME_POSITIONS:
        parser.error(f"--frames {args.frames} must be a multiple of {CHUNK_FRAMES} (whole chunks) and at "
                     f"most {rope.MAX_TIME_POSITIONS} (the RoPE table's time positions)")
    if args.window_frames is not None and args.window_frames < CHUNK_FRAMES:
        parser.error(f"--window-frames {args.window_frames} must be >= {CHUNK_FRAMES}: "
                     "a chunk must see itself")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.ring is not None and (world_size % args.ring or heads % (world_size // args.ring)):
        parser.error(f"--ring {args.ring} does not fit {world_size} rank(s): the ring degree must divide the "
                     f"world size, and the rest (the Ulysses degree) the {heads} heads; choose from "
                     f"{[r for _, r in sp.factorizations(world_size, heads)]}")
    if not args.graph_timeout > 0:
        parser.error(f"--graph-timeout must be a positive number of seconds, got {args.graph_timeout}")
    problem = extras_problem(args.prompt, args.video, args.wan_folder, args.text_embedding)
    if problem:
        parser.error(problem)
    gpu = torch.cuda.is_available()
    if args.exchange == "symm" and not gpu:
        parser.error("--exchange symm needs GPUs (symmetric memory is CUDA memory)")
    if args.verify and not gpu:
        parser.error("--verify compares GPU runs; on CPU the tests prove the same (python -m pytest)")


def read_inputs(args, dtype, device, mesh):
    """The model (its checkpoint, if any) and the text features, checked on every rank, with the output
    location on rank 0 (the rank that writes), before any work: every rank then ends with the same one-line
    error, or all go on."""
    outputs = [("--output", args.output)] + ([("--video", args.video)] if args.video else [])
    problem = None
    if mesh.rank == 0:
        problem = next(filter(None, (output_problem(path, flag) for flag, path in outputs)), None)
    model = text = None
    try:
        model = build_model(args.preset, dtype, device, args.seed, args.checkpoint, args.use_ema)
        text = load_text(args.text_embedding, model, 1, args.seed)
    except rope.BadInput as e:
        problem = problem or str(e)
    if mesh.world_size > 1:
        mesh.agree("06_self_forcing_pipeline", problem)
    elif problem:                     # one process: the file's own line, with no stage or rank before it
        raise rope.BadInput(problem)
    return model, text


def output_problem(path, flag="--output"):
    """What would stop the latents from being written to `path` (a message), or None: checked before
    the run."""
    if os.path.isdir(path):
        return f"{flag} {path} is a directory; give a file name"
    if os.path.exists(path):
        return None if os.access(path, os.W_OK) else f"{flag} {path} is not writable"
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        return f"{flag} {path}: cannot create a file under {folder}"
    return None


def save_latents(obj, path):
    """Save atomically (a temporary file renamed over `path`); a special file (/dev/null, a pipe) is written
    directly, since a rename would replace it."""
    if os.path.exists(path) and not os.path.isfile(path):
        torch.save(obj, path)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def cpu_estimate(config, video):
    """A warning line for a CPU run far beyond the tiny preset's default (its work and memory), else None."""
    flops = video_flops(config, video)
    scale = video_flops(PRESETS["tiny"], VideoSpec(21, *PRESET_SIZE["tiny"]))
    if flops < 100 * scale:
        return None
    weights = (config.num_layers * (8 * config.dim ** 2 + 2 * config.dim * config.ffn_dim)
               + config.text_dim * config.dim)
    cache = config.num_layers * video.frames * video.tokens_per_frame * 2 * config.dim
    gib = 4 * (weights + cache) / 2**30
    return (f"note: this CPU run needs about {flops / 1e12:,.1f} TFLOP and {gib:.1f} GiB of float32 weights "
            f"and cache ({flops / scale:,.0f}x the tiny preset's default run); at a few tens of GFLOP/s that "
            f"is about {flops / 30e9 / 60:,.0f} min. A GPU, or a smaller --height/--width/--frames, fits "
            "better.")


# ----------------------------------------------------------------------------- benchmark and GPU verification

def bench_main(args, video, device, mesh, dtype):
    """Times at the preset's full shapes with random weights; every rank runs, rank 0 prints. Compilation and
    graph capture happen in the warm-up videos, before any clock starts."""
    config = PRESETS[args.preset]
    model = build_model(args.preset, dtype, device, args.seed)
    text = load_text(None, model, 1, args.seed).to(device)     # as a GPU text encoder would hand it over
    graphs = device.type == "cuda" and not args.no_graph
    run = lambda on_chunk=None: generate(model, text, video, mesh, args.seed, args.mode, graphs,
                                         args.graph_timeout, on_chunk=on_chunk)
    warmup_s, first_s, total_s = time_videos(run, device, args.warmup_videos, args.video_repeats)
    show = mesh.rank == 0
    tokens = video.chunk_frames * video.tokens_per_frame
    if show:
        gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        print(f"06 --bench: {args.preset}, {mesh.world_size} x {gpu} (ulysses {mesh.ulysses_degree} x ring "
              f"{mesh.ring_degree}), {dtype}, {video.frames} latent frames at {video.height}x{video.width} "
              f"({tokens} tokens per chunk), mode {args.mode}, {'CUDA graphs' if graphs else 'eager'}, "
              f"exchange {exchange_name(mesh)}")
        print(f"  warm-up ({args.warmup_videos} video(s): compile, capture) {warmup_s:.2f} s, "
              "not timed below")
    timings = rope.Timings(device, show, args.warmup, args.repeats)
    chunk_tflop = forward_flops(config, tokens, tokens) / 1e12
    video_tflop = video_flops(config, video) / 1e12
    with torch.no_grad(), attention_backends(device):
        # one forward of the first chunk through the forward the videos used, timed last, with the GPU busy
        # for seconds already (timed right after compilation, on an idle GPU, it reads high)
        one_forward = first_chunk_forward(model, mesh, video, text, args, graphs, device)
        ms = rope.time_ms(one_forward, device, args.warmup, args.repeats)
        timings.add("chunk forward (empty cache)", ms, f"{chunk_tflop / ms * 1e3:6.1f} TFLOP/s of "
                    f"{chunk_tflop:.2f} TFLOP (median of {args.repeats})")
        timings.add("first chunk (4 steps)", first_s * 1e3, "from the call: incl. text K/V, cache set-up")
        timings.add("whole video", total_s * 1e3,
                    f"{video_tflop / total_s:6.1f} TFLOP/s of {video_tflop:.1f} TFLOP (median of "
                    f"{args.video_repeats})")
        if show:
            peak = f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if graphs else ""
            print(f"  frames per second {video.video_frames / total_s:.1f} ({video.video_frames} video "
                  f"frames){peak}")
        if args.profile and device.type == "cuda":
            profiled = [("eager", first_chunk_forward(model, mesh, video, text, args, False, device))]
            profiled += [("CUDA graph", one_forward)] if graphs else []
            for label, fn in profiled:
                report_profile(label, host_and_kernel_ms(fn), mesh, args.profile_dir)


def time_videos(run, device, warmups, repeats):
    """(warm-up seconds, median seconds to the first chunk, median seconds per video) of `repeats` calls of
    run(on_chunk) after `warmups` untimed ones; the GPU is synchronised at each mark."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(warmups):
        run()
    sync()
    warmup_s = time.perf_counter() - t0
    firsts, totals = [], []
    for _ in range(repeats):
        marks = []
        sync()
        t0 = time.perf_counter()
        run(on_chunk=lambda i, s: (sync(), marks.append(time.perf_counter() - t0)))
        sync()
        firsts.append(marks[0])
        totals.append(time.perf_counter() - t0)
    return warmup_s, statistics.median(firsts), statistics.median(totals)


def report_profile(label, profile, mesh, folder):
    """Print (rank 0) one profiled forward's host, wall and kernel times; write the profiler table to
    folder."""
    host, wall, kernels, table_text = profile
    if mesh.rank != 0:
        return
    print(f"  profile, rank 0, {label:<10s}  per forward: host {host:6.2f} ms to enqueue, "
          f"wall {wall:6.2f} ms, GPU kernels {kernels:6.2f} ms")
    if folder:
        os.makedirs(folder, exist_ok=True)
        name = f"profile_{mesh.world_size}gpu_{label.replace(' ', '_')}.txt"
        with open(os.path.join(folder, name), "w") as f:
            f.write(table_text)


def host_and_kernel_ms(fn, repeats=10):
    """Per call of fn on this rank: the host time to enqueue it and the wall time until the GPU is done
    (both without the profiler, whose tracing slows the host), and, from torch.profiler, the summed time of
    the GPU kernels it ran (kernels of different streams, e.g. NCCL's, are summed even where they overlap).
    Returns (host, wall, kernels, profiler table)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e3
    table = events.table(sort_by="self_cuda_time_total", row_limit=25)
    return host * 1e3 / repeats, wall * 1e3 / repeats, kernels / repeats, table


def first_chunk_forward(model, mesh, video, text, args, graphs, device, timestep=1000.0):
    """A call running one forward of the video's first chunk (empty cache) on fixed random tokens, through
    what generate() uses (graphs: the same GraphedForward, kept across videos); its output is the flow."""
    table = video_rope_table(model, video, device)
    layout = fused.ShardLayout(mesh, table, 0, video.chunk_frames)
    gen = torch.Generator(device).manual_seed(0)                       # the same tokens at every call
    x = torch.randn(1, layout.n_local, 4 * model.config.in_dim, device=device, generator=gen)
    t = torch.full((1, video.chunk_frames), timestep, device=device)
    forward = chunk_forward(model, mesh, table, 1, video.window_frames, args.mode, graphs, args.graph_timeout)
    forward.start_video(model.text_context(text.to(device)))
    return lambda: forward(x, t, layout)


def forward_flops(config, tokens, visible_keys):
    """Multiply-adds x 2 of one forward of a ModelConfig over `tokens` tokens attending to `visible_keys`
    keys: the linear layers (text K/V excluded: computed once per video), self- and cross-attention.
    Head and embeddings are ~0.1%."""
    linear = 2 * tokens * (6 * config.dim ** 2 + 2 * config.dim * config.ffn_dim)   # q k v o, cross q o, ffn
    attention = 4 * tokens * (visible_keys + config.text_len) * config.dim      # QK^T, PV: self + cross
    return config.num_layers * (linear + attention)


def video_flops(config, video):
    """forward_flops of a whole video: 4 denoising passes per chunk, and a clean-context pass for all but the
    last (without a window: every chunk sees all earlier ones)."""
    n, total = video.chunk_frames * video.tokens_per_frame, 0
    for c in range(video.num_chunks):
        passes = len(DENOISING_STEPS) + (c + 1 < video.num_chunks)
        total += passes * forward_flops(config, n, (c + 1) * n)
    return total


def verify_main(args, video, device, mesh, dtype=None):
    """On the GPU(s) of this job: CUDA-graph latents == eager latents, and (with several ranks) the job's
    latents == one GPU's (rank 0 runs the single-GPU reference alone while the others wait). Exits non-zero
    on failure. Runs bfloat16 and float32 whatever --dtype says."""
    bf16, f32 = (build_model(args.preset, d, device, args.seed) for d in (torch.bfloat16, torch.float32))
    text = load_text(args.text_embedding, bf16, 1, args.seed)
    run = lambda model, on, graphs: generate(model, text, video, on, args.seed, args.mode, graphs,
                                             args.graph_timeout)
    graph16, eager16 = run(bf16, mesh, True), run(bf16, mesh, False)
    graph32, eager32 = run(f32, mesh, True), run(f32, mesh, False)
    one16, one32 = graph16, graph32
    # one forward (first chunk, empty cache) both ways: shows whether a single pass already differs
    with torch.no_grad(), attention_backends(device):
        flows = [first_chunk_forward(bf16, mesh, video, text, args, graphs, device, 937.5)().clone()
                 for graphs in (True, False)]
    if mesh.world_size > 1:
        if mesh.rank == 0:
            one = sp.SPMesh(1, 1, device, local=True)
            one16, one32 = run(bf16, one, True), run(f32, one, True)
        dist.barrier()
    if mesh.rank != 0:
        return
    # float32 shows that two ways compute the same function (1e-5: reordered sums over 14 forwards); in
    # bfloat16 a library may pick another kernel (another summation order) for a captured call, and 14
    # forwards of a random-weight model amplify that, so bfloat16 runs must only be no further apart than
    # bfloat16 is from float32
    bf16_noise = relative_rms(one16, one32)
    rows = [("one forward, CUDA graph vs eager, bfloat16", relative_rms(*flows), float("inf")),
            ("CUDA graph vs eager, float32", relative_rms(graph32, eager32), 1e-5),
            ("CUDA graph vs eager, bfloat16", relative_rms(graph16, eager16), bf16_noise)]
    if mesh.world_size > 1:
        rows += [(f"{mesh.world_size} GPUs vs 1 GPU, float32", relative_rms(graph32, one32), 1e-5),
                 (f"{mesh.world_size} GPUs vs 1 GPU, bfloat16", relative_rms(graph16, one16), bf16_noise)]
    rows.append(("(1 GPU: bfloat16 vs float32)", bf16_noise, float("inf")))
    print(f"06 --verify: {args.preset}, {mesh.world_size} x {torch.cuda.get_device_name()} (ulysses "
          f"{mesh.ulysses_degree} x ring {mesh.ring_degree}), {video.frames} latent frames at "
          f"{video.height}x{video.width}, exchange {exchange_name(mesh)}; relative RMS of the latents")
    failed = [name for name, err, bound in rows if not err <= bound]
    for name, err, bound in rows:
        bound_text = f"(bound {bound:.1e})" if bound != float("inf") else ""
        print(f"  {name:<42s} {err:9.2e}   {bound_text}{'  FAILED' if name in failed else ''}")
    if failed:
        raise SystemExit(f"06 --verify failed: {failed}")


def relative_rms(got, want):
    return ((got.double() - want.double()).pow(2).mean().sqrt() / want.double().pow(2).mean().sqrt()).item()


if __name__ == "__main__":
    rope.run_main(main)
