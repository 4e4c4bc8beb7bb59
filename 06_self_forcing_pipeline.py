"""Stage 06 -- the Self-Forcing pipeline: chunk-by-chunk, KV-cached, 4-step video generation, on N ranks.

The idea
    Self-Forcing distils Wan2.1-T2V-1.3B into a causal generator that makes a video's latents 3 latent
    frames (a chunk) at a time, in 4 denoising steps per chunk:
        for each chunk (start_frame = 0, 3, 6, ...):
            x = noise
            for t in [1000, 750, 500, 250], warped by the shift-5 schedule (to 1000, 937.5, 833.3, 625):
                v  = model(x, t)                 # reads the KV cache of earlier chunks, keeps nothing
                x0 = x - sigma_t * v             # the model predicts the flow
                x  = (1 - sigma_next) * x0 + sigma_next * fresh_noise     (not after the last step)
            hand out x0; model(x0, t=0) once more and commit: its K/V become the chunk's cache entries
    Every rank keeps its contiguous token shard of the chunk through all steps; attention is stage 05's
    layer; each rank holds all text tokens' K/V. Only a finished chunk is gathered, to be handed out.
    `stream()` is the loop as a generator of each chunk's latents (stage 07 decodes them as they come);
    `generate()` concatenates them. One VideoState holds a video's KV caches and text K/V.

A stream without an end
    With sink frames and a window (stage 02) every cache stays the window's size, and time positions
    never run out (stage 01), so a stream runs as long as its caller reads it. The prompt can change on
    the way: `stream()` takes a schedule [(first latent frame, umT5 features), ...]. At a switch
    (`recache`, LongLive's KV re-cache) the text K/V are replaced and the chunks the next chunk will see
    outside the sink run once more at t = 0 under the new prompt, oldest first, each seeing the sink and
    the chunks re-run before it; the sink keeps its first prompt's K/V unless VideoSpec.rebuild_sink.
    `warm_up_video` is the shortest video that captures every graph a stream of any length replays.

Graph mode (the default on GPU)
    Split over GPUs, a forward's kernels get shorter but Python's work does not, so every GPU forward (all
    blocks, the all-to-alls included) is a CUDA graph, captured once per visible-cache length and replayed
    from one host call (GraphedForward). EagerForward (--no-graph, CPU, tests) is the same model code.

The model
    Wan2.1's DiT with per-frame timesteps and the original parameter names, so real checkpoints (and
    Self-Forcing's {'generator' | 'generator_ema': {'model.<name>': ...}}) load strictly. Tokens are
    1 x 2 x 2 patches, values ordered (pt, ph, pw, channel), the head's output order.

Shapes (wan-1.3b, 480x832)
    latents:  [batch, 16, frames, 60, 104]   -> tokens [batch, frames * 1560, 64]; a chunk is 4680 tokens
    x per rank: [batch, n_local, 1536] residual stream in the model dtype (bf16 on GPU, as upstream)
    text: [batch, 512, 4096] umT5 features -> per block cross-attention K/V [batch, 12, 512, 128]

Uses
    01_rope: RopeTable, MAX_TIME_POSITIONS
    02_causal_attention: KVCache, spell_setting, window_problem, fast_attention
    03_sequence_parallel: commit_chunk, gather_tokens, ring_shard_of, world, finish_distributed, SPMesh,
        init_distributed, mesh_shape, factorizations, attention_with_lse, lse_kernel, split_key_attention,
        key_parts, merge_parts
    05_fused_comm: CausalSelfAttention, ShardLayout, RMSNorm, rms_norm, compiled, MODES

Run
    python 06_self_forcing_pipeline.py                              tiny preset, one process
    torchrun --nproc_per_node=8 06_self_forcing_pipeline.py         tiny preset, 8 ranks (CPU: gloo)
    torchrun --nproc_per_node=2 06_self_forcing_pipeline.py --preset wan-1.3b \\
        --checkpoint self_forcing_dmd.pt --text-embedding prompt_umt5.pt --output out/latents.pt
    python 06_self_forcing_pipeline.py --frames 300 --window-frames 12 --sink-frames 3 --switch 150 \\
        --output none                                               a stream with a prompt switch
    Prints the first chunk's latency and the whole video's time (a switch's cost beside an ordinary
    chunk's, the cold start on GPU), saves the latents; with several ranks on the tiny preset, checks the
    first chunk against one process. bench_06.py times it, verify_06.py checks graphs against eager.
"""
import argparse
import bisect
import collections
import contextlib
import copy
import functools
import gc
import importlib
import math
import os
import statistics
import struct
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from support import extras, files, weights
from support.harness import BadInput, Deadline, Parser, check, non_negative, positive, run_main
from support.timing import Clock

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
    """The DiT's shape, under Wan2.1's own names."""
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
    rope_frames: int = rope.MAX_TIME_POSITIONS   # time rows of the RoPE table; later ones made as needed

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
    """What to generate: `frames` latent frames of height x width pixels, `chunk_frames` at a time; a chunk
    sees `window_frames` in all (None: all), `sink_frames` of them the first (stage 02); `rebuild_sink`:
    a switch re-runs the sink too. `problem()` says what is wrong, if anything."""
    frames: int
    height: int
    width: int
    chunk_frames: int = CHUNK_FRAMES
    window_frames: Optional[int] = None
    sink_frames: int = 0
    rebuild_sink: bool = False

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

    def problem(self, spell=causal.spell_setting):
        """What is wrong with this video for the model (a message), or None. `spell(name, value)` names a
        setting in the message (the command line passes its flags' spelling)."""
        step = VAE_STRIDE * PATCH[1]
        for name in ("height", "width"):
            if getattr(self, name) % step:
                return (f"{spell(name, getattr(self, name))} must be a multiple of {step} (8 pixels per "
                        "latent pixel, 2 latent pixels per patch)")
        if self.frames < 1 or self.frames % self.chunk_frames:
            return (f"{spell('frames', self.frames)} must be a multiple of "
                    f"{spell('chunk_frames', self.chunk_frames)} (whole chunks)")
        return causal.window_problem(self.window_frames, self.chunk_frames, self.sink_frames, spell)

    @property
    def cache_plan(self):
        """What a video's KV caches are built from: (frames they hold, window, sink). Videos that share it
        share one VideoState and its CUDA graphs, however long they run."""
        held = self.frames if self.window_frames is None else self.window_frames
        return held, self.window_frames, self.sink_frames


@dataclass(frozen=True)
class RunOptions:
    """How the loop runs (not what it computes): CUDA `graphs` (None: on GPU) and how long a graph capture
    may take before every rank stops."""
    graphs: Optional[bool] = None
    graph_timeout_s: float = 300.0


# ----------------------------------------------------------------------------- the model

def sinusoidal_embedding(dim, positions):
    """Wan's timestep embedding: [cos, sin] of position * 10000^(-i / (dim/2)), in float64."""
    half = dim // 2
    inv_freq = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=positions.device) / half)
    angles = torch.outer(positions.double(), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class LayerNorm(nn.LayerNorm):
    """Wan's LayerNorm: computed in float32 (or wider), its weights too, cast back."""

    def forward(self, x):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        weight, bias = (None if p is None else p.to(xf.dtype) for p in (self.weight, self.bias))
        return F.layer_norm(xf, self.normalized_shape, weight, bias, self.eps).type_as(x)


class CrossAttention(nn.Module):
    """Text cross-attention: each rank's tokens attend to all text tokens; no communication."""

    def __init__(self, dim, num_heads, eps=1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = fused.RMSNorm(dim, eps), fused.RMSNorm(dim, eps)

    def forward(self, x, context_kv):
        return self.attend(self.q(x), context_kv)

    def attend(self, q, context_kv):
        """The tokens' attention to the text from their q projection [B, n, dim], through o."""
        q = self.norm_q(q).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)             # [B, H, n, D]
        out = F.scaled_dot_product_attention(q, *context_kv)
        return self.o(out.transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, dim, ffn_dim, num_heads, eps=1e-6, mode="fused", compile=False):
        """mode: stage 05's attention layer; compile (for a GPU): the code around it through torch.compile."""
        super().__init__()
        self.norm1 = LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = fused.CausalSelfAttention(dim, num_heads, eps, mode, compile)
        self.norm3 = LayerNorm(dim, eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, num_heads, eps)
        self.norm2 = LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)
        self.around_attention = tuple(fused.compiled(f) if compile else f
                                      for f in (Block.pre_attention, Block.post_attention))
        self.fp8_qkv = None            # use_fp8: self-attention's q, k, v as one FP8 layer, run before it

    def scale_shift(self, e, which):
        """(1 + scale, shift) of each frame: (shift, scale) = e[.., which:which+2] plus the block's own."""
        shift, scale = (self.modulation[0, which:which + 2]
                        + e[:, :, which:which + 2]).unbind(2)                     # each [B, F, dim]
        return 1 + scale, shift

    def modulated(self, norm, x, e, frame_index, which):
        """norm(x) * (1 + scale) + shift with this token's frame's (shift, scale)."""
        weight, bias = self.scale_shift(e, which)
        return norm(x) * weight[:, frame_index] + bias[:, frame_index]

    def frame_gates(self, e, which):
        """Each frame's gate [B, F, dim]: e[.., which] plus the block's own."""
        return self.modulation[0, which] + e[:, :, which]

    def gate(self, e, frame_index, which):
        return self.frame_gates(e, which)[:, frame_index]

    def feed_forward(self, h):
        """ffn(h); on GPU the first Linear with cuBLASLt's bias + GELU(tanh) epilogue (one kernel); on CPU
        that op would use exact GELU, so the plain modules run there. In FP8 the GELU and the quantization
        of the hidden for the second layer are one pass (gelu_fp8_rows)."""
        up, down = self.ffn[0], self.ffn[2]
        if isinstance(up, Fp8Linear):
            return self.fp8_feed_forward(*fp8_rows(h.flatten(0, 1)), h.dtype).unflatten(0, h.shape[:2])
        if not h.is_cuda:
            return self.ffn(h)
        hidden = torch._addmm_activation(up.bias, h.flatten(0, 1), up.weight.t(), use_gelu=True)
        return down(hidden.unflatten(0, h.shape[:2]))

    def fp8_feed_forward(self, values, scales, dtype):
        """The FP8 FFN on its input quantized already (values [M, dim] e4m3, scales [M, 1]) -> [M, dim]."""
        hidden = self.ffn[0].quantized(values, scales, dtype)                      # [M, ffn_dim]
        return self.ffn[2].quantized(*gelu_fp8_rows(hidden), dtype)

    @staticmethod
    def frame_rows(x, frame_index, frames):
        """Each token's row of a [B * F, dim] table of per-frame values (b * F + its frame): [B * n]."""
        return (torch.arange(x.shape[0], device=x.device)[:, None] * frames + frame_index).flatten()

    def pre_attention(self, x, e, frame_index):
        """Self-attention's input; in FP8 its (q, k, v): the norm, modulation and quantization in one pass
        (norm_fp8_rows), then the one FP8 layer."""
        if self.fp8_qkv is None:
            return self.modulated(self.norm1, x, e, frame_index, 0)
        weight, bias = self.scale_shift(e, 0)                                      # [B, F, dim]
        _, values, scales = norm_fp8_rows(x.flatten(0, 1), weight.flatten(0, 1), bias.flatten(0, 1),
                                          self.frame_rows(x, frame_index, e.shape[1]), self.norm1.eps)
        qkv = self.fp8_qkv.quantized(values, scales, x.dtype).unflatten(0, x.shape[:2])
        return qkv.split(self.fp8_qkv.splits, dim=-1)

    def post_attention(self, x, y, e, frame_index, context_kv):
        """Everything after self-attention: gated residual, cross-attention, modulated FFN. In FP8 each
        residual sum, the norm after it and the quantization of its output are one pass (norm_fp8_rows)."""
        if self.fp8_qkv is not None:
            return self.fp8_post_attention(x, y, e, frame_index, context_kv)
        x = x + y * self.gate(e, frame_index, 2)
        x = x + self.cross_attn(self.norm3(x), context_kv)
        ffn = self.feed_forward(self.modulated(self.norm2, x, e, frame_index, 3))
        return x + ffn * self.gate(e, frame_index, 5)

    def fp8_post_attention(self, x, y, e, frame_index, context_kv):
        rows, shape = (lambda t: t.flatten(0, 1)), x.shape[:2]                  # [B, n, dim] -> [B * n, dim]
        group = self.frame_rows(x, frame_index, e.shape[1])
        gate = self.frame_gates(e, 2)                                               # [B, F, dim]
        x, values, scales = norm_fp8_rows(rows(x), self.norm3.weight[None], self.norm3.bias[None], group,
                                          self.norm3.eps, rows(y), rows(gate))
        q = self.cross_attn.q.quantized(values, scales, y.dtype).unflatten(0, shape)
        text = self.cross_attn.attend(q, context_kv)
        weight, bias = self.scale_shift(e, 3)
        x, values, scales = norm_fp8_rows(x, rows(weight), rows(bias), group, self.norm2.eps, rows(text))
        ffn = self.fp8_feed_forward(values, scales, y.dtype).unflatten(0, shape)
        return x.unflatten(0, shape) + ffn * self.gate(e, frame_index, 5)

    def forward(self, x, e, layout, cache, context_kv):
        pre_attention, post_attention = self.around_attention
        h = pre_attention(self, x, e, layout.frame_index)    # [B, n, dim], or FP8's (q, k, v)
        if self.fp8_qkv is None:                              # each writes the chunk's K/V to the cache slots
            y = self.self_attn(h, layout, cache)
        else:
            y = self.self_attn.attend_projections(*h, layout, cache)
        return post_attention(self, x, y, e, layout.frame_index, context_kv)


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

    def __init__(self, config, mode="fused", compile=False):
        super().__init__()
        self.config = c = config
        self.patch_embedding = nn.Conv3d(c.in_dim, c.dim, kernel_size=PATCH, stride=PATCH)
        self.text_embedding = nn.Sequential(nn.Linear(c.text_dim, c.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(c.dim, c.dim))
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, 6 * c.dim))
        self.blocks = nn.ModuleList([Block(c.dim, c.ffn_dim, c.num_heads, c.eps, mode, compile)
                                     for _ in range(c.num_layers)])
        self.head = Head(c.dim, math.prod(PATCH) * c.out_dim, c.eps)
        # The RoPE table is not a parameter or buffer (as upstream): real checkpoints load strictly.

    @property
    def dtype(self):
        return self.head.head.weight.dtype

    def text_context(self, text):
        """text [B, L <= text_len, text_dim] (zero-padded) -> per block the cross-attention K/V [B, H,
        text_len, D], once per video; all blocks' projections as one GEMM (one launch, not ~250)."""
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

    def forward(self, tokens, timestep, layout, state):
        """tokens [B, n_local, 64], timestep [B, F] per frame of the chunk, the video's VideoState -> the flow
        [B, n_local, 64] in float32 (or float64). Each block writes the chunk's K/V into its cache's slots;
        only state.commit() keeps them. The residual stream stays in the model dtype, as upstream."""
        weight = self.patch_embedding.weight.permute(0, 2, 3, 4, 1).flatten(1)      # conv as a linear layer
        x = F.linear(tokens.to(self.dtype), weight, self.patch_embedding.bias)       # [B, n, dim]
        t = sinusoidal_embedding(self.config.freq_dim, timestep.flatten()).to(self.dtype)
        e = self.time_embedding(t)                                                    # [B*F, dim]
        e6 = self.time_projection(e).unflatten(1, (6, self.config.dim))              # [B*F, 6, dim]
        e6 = e6.unflatten(0, timestep.shape)                                           # [B, F, 6, dim]
        for block, cache, context_kv in zip(self.blocks, state.caches, state.text_kv):
            x = block(x, e6, layout, cache, context_kv)
        flow = self.head(x, e.unflatten(0, timestep.shape), layout.frame_index)
        return flow.to(torch.promote_types(self.dtype, torch.float32))




# ----------------------------------------------------------------------------- the Self-Forcing loop

def warped_timesteps(steps=DENOISING_STEPS, shift=SHIFT, num_train_timesteps=1000):
    """(timesteps, sigmas): the shift-warped flow-matching schedule at 1000 - t, as Self-Forcing's
    pipeline/causal_inference.py."""
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
    """Noise from one seeded stream, drawn in the same order on every rank; each rank keeps its shard."""

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
    """The RoPE table of a video's token grid (the model's rope_frames time rows; a longer video's later
    rows are made as its chunks start), in the model's precision or float32 (whichever is wider)."""
    dtype = torch.promote_types(model.dtype, torch.float32)
    return rope_table(model.config.head_dim, model.config.rope_frames, *video.grid[1:], device, dtype)


def attention_backends(device):
    """On GPU: cuDNN attention first (the fastest here), then flash, memory-efficient, math."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch < 2.6: no priorities, PyTorch's own order
        return sdpa_kernel(order)


class VideoState:
    """A video's state between forwards: each block's KV cache (from its cache_plan) and the text K/V, at
    fixed addresses (CUDA graphs read them), reused by the next video of the same plan."""

    def __init__(self, model, table, cache_plan):
        held_frames, window_frames, sink_frames = cache_plan
        tokens_per_frame = table.tokens_per_frame
        self.caches = [causal.KVCache.for_video(held_frames, tokens_per_frame, window_frames, sink_frames)
                       for _ in model.blocks]
        self.text_kv = None            # per block (k, v) [B, H, text_len, D]

    def start(self, text_kv):
        """A new video: empty caches, this text's K/V."""
        for cache in self.caches:
            cache.reset()
        self.set_text(text_kv)

    def set_text(self, text_kv):
        """This text's K/V, copied into the buffers the graphs read (the first call makes them)."""
        if self.text_kv is None:
            self.text_kv = [(k.clone(), v.clone()) for k, v in text_kv]
            return
        for mine, new in zip(self.text_kv, text_kv):
            for buffer, value in zip(mine, new):
                buffer.copy_(value)

    def rewind(self, keep_sink):
        """Before a re-cache: forget the window's chunks (and the sink's too unless keep_sink)."""
        for cache in self.caches:
            cache.rewind() if keep_sink else cache.reset()

    def make_room(self, layout):
        """Before a chunk's first pass: a window drops what the chunk no longer sees."""
        for cache in self.caches:
            cache.make_room(layout.chunk)

    def commit(self, layout):
        """The K/V the last pass wrote become the chunk's cache entries (Python ints, no device work)."""
        for cache in self.caches:
            sp.commit_chunk(cache, layout.mesh, layout.chunk)

    def visible(self, layout):
        """How many cached tokens each ring rank holds for this chunk: all a forward's device work depends
        on besides its inputs (CUDA graph mode keys its graphs by it)."""
        mesh, cache = layout.mesh, self.caches[0]
        return layout.length, tuple(cache.held_length(lambda c, j=j: sp.ring_shard_of(mesh, c, j))
                                    for j in range(mesh.ring_degree))


class EagerForward:
    """The model forward over a chunk, launched kernel by kernel from Python (CPU, tests, --no-graph)."""

    def __init__(self, model, state):
        self.model, self.state = model, state

    def __call__(self, x, timestep, layout):
        return self.model(x, timestep, layout, self.state)


@torch.no_grad()
def stream(model, text, video, mesh, seed=0, options=RunOptions()):
    """Yield each chunk's latents [B, 16, chunk_frames, H/8, W/8] on every rank as it is handed out. text:
    umT5 features [B, L, text_dim], or a schedule [(first latent frame, features), ...] from frame 0 (a
    chunk runs under the last prompt starting at or before it). Every rank agrees before any work."""
    schedule = prompt_schedule(text)
    validate(model, mesh, video, schedule)
    starts, C, S = [frame for frame, _ in schedule], video.chunk_frames, video.sink_frames
    device = mesh.device if mesh.world_size > 1 else next(model.parameters()).device
    batch = schedule[0][1].shape[0]
    graphs = device.type == "cuda" if options.graphs is None else options.graphs
    if graphs and device.type != "cuda":
        raise ValueError("CUDA graphs need a GPU: use graphs=False (--no-graph) on CPU")
    table = video_rope_table(model, video, device)
    forward = chunk_forward(model, mesh, table, batch, video.cache_plan, replace(options, graphs=graphs))
    forward.state.start(model.text_context(schedule[0][1].to(device)))
    noise, t_zero = NoiseSource(seed, device), torch.zeros(batch, C, device=device)   # t = 0: clean
    out_dtype = torch.promote_types(model.dtype, torch.float32)
    window_chunks = None if video.window_frames is None else -(-(video.window_frames - S) // C)
    sink, recent = [], collections.deque(maxlen=window_chunks)          # x0 a re-cache may re-run
    layouts = lambda first: fused.ShardLayout(mesh, table, first, C)   # a chunk's shards and RoPE rows
    prompt_index = 0
    with attention_backends(device):
        for start_frame in range(0, video.frames, C):
            if prompt_of_chunk(starts, start_frame) != prompt_index:
                prompt_index = prompt_of_chunk(starts, start_frame)
                recache(forward, layouts, schedule[prompt_index][1].to(device), sink + list(recent), video,
                        start_frame, t_zero)
            layout = layouts(start_frame)
            forward.state.make_room(layout)
            x0 = denoise_chunk(forward, layout, noise, batch, video)                   # [B, n_local, 64]
            chunk = sp.gather_tokens(x0, mesh, layout.length)                         # hand the chunk out
            yield unpatchify(chunk, C, video.latent_height, video.latent_width).to(out_dtype)
            following = start_frame + C
            switch_next = following < video.frames and prompt_of_chunk(starts, following) != prompt_index
            # the chunk before a switch: the re-cache redoes its pass, or no later chunk sees it
            redone = switch_next and (start_frame >= S or video.rebuild_sink)
            if following < video.frames and not redone:          # clean-context pass (none after the last)
                forward(x0, t_zero, layout)
                forward.state.commit(layout)
            if start_frame >= S:
                recent.append((start_frame, x0))
            elif video.rebuild_sink:
                sink.append((start_frame, x0))


def recache(forward, layouts, text, kept, video, start_frame, t_zero):
    """The re-cache before the chunk at `start_frame` (the header's rule). kept: [(first frame, x0
    [B, n_local, 64])] of earlier chunks, oldest first; layouts(first frame): a chunk's ShardLayout."""
    state, C, S, W = forward.state, video.chunk_frames, video.sink_frames, video.window_frames
    state.set_text(forward.model.text_context(text))
    state.rewind(keep_sink=not video.rebuild_sink)
    first_seen = S if W is None else max(S, start_frame + C - (W - S))
    for chunk_start, x0 in kept:
        if chunk_start + C > first_seen or (video.rebuild_sink and chunk_start < S):
            layout = layouts(chunk_start)
            state.make_room(layout)
            forward(x0, t_zero, layout)
            state.commit(layout)


def prompt_schedule(text):
    """[(first latent frame, umT5 features [B, L, text_dim])]: a tensor alone is one prompt from frame 0."""
    return [(0, text)] if torch.is_tensor(text) else [(int(frame), features) for frame, features in text]


def prompt_of_chunk(starts, start_frame):
    """Which prompt a chunk starting at start_frame runs under: the last one starting at or before it."""
    return bisect.bisect_right(starts, start_frame) - 1


def warm_up_video(video):
    """The shortest video whose chunks see every cache length (graph key) `video`'s will, re-caches
    included: up to the first chunk that sees a full window; all of `video` without a window."""
    if video.window_frames is None:
        return video
    C = video.chunk_frames
    return replace(video, frames=min(video.frames, -(-video.window_frames // C) * C))


def generate(model, text, video, mesh, seed=0, options=RunOptions()):
    """The whole video's latents [B, 16, frames, height/8, width/8]: stream's chunks, concatenated."""
    return torch.cat(list(stream(model, text, video, mesh, seed, options)), dim=2)


def denoise_chunk(forward, layout, noise, batch, video):
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
    return x0


def validate(model, mesh, video, schedule):
    """Every rank checks the run's configuration, then all agree (same error everywhere, before any data
    collective): also catches ranks that were given different settings or different weights."""
    problem = (video.problem() or schedule_problem(schedule, video.chunk_frames, model.config)
               or mesh.heads_problem(model.config.num_heads))
    starts, text = [frame for frame, _ in schedule], schedule[0][1] if schedule else torch.zeros(0)
    mesh.agree("Self-Forcing pipeline", problem, frames=video.frames, height=video.latent_height,
               width=video.latent_width, chunk_frames=video.chunk_frames,
               window_frames=video.window_frames or 0,
               sink_frames=video.sink_frames, rebuild_sink=video.rebuild_sink, prompts=len(starts),
               prompt_frames=hash(tuple(starts)), batch=text.shape[0] if text.dim() else -1,
               weights=parameter_fingerprint(model))


def schedule_problem(schedule, chunk_frames, config):
    """What is wrong with a prompt schedule (a message), or None."""
    problem = switch_frames_problem([frame for frame, _ in schedule], chunk_frames)
    if problem:
        return problem
    for frame, text in schedule:
        if (text.dim() != 3 or text.shape[2] != config.text_dim or text.shape[1] > config.text_len
                or text.shape[0] != schedule[0][1].shape[0]):
            return (f"text embedding{f' at frame {frame}' if frame else ''} is {tuple(text.shape)}, expected "
                    f"[batch, <= {config.text_len}, {config.text_dim}] (one batch for every prompt)")
    return None


def switch_frames_problem(starts, chunk_frames):
    """What is wrong with the first frames of a schedule's prompts (a message), or None."""
    if not starts or starts[0] != 0:
        return "a prompt schedule starts with a prompt at frame 0"
    for frame, later in zip(starts, starts[1:]):
        if later <= frame:
            return f"prompt frames must increase, got {frame} then {later}"
        if -(-frame // chunk_frames) == -(-later // chunk_frames):
            return (f"prompts at frames {frame} and {later} would both begin with the chunk at frame "
                    f"{-(-later // chunk_frames) * chunk_frames}; a chunk runs under one prompt")
    return None


def parameter_fingerprint(model):
    """A number that differs when ranks hold different weights (the float64 sum's bits; buffers too: FP8
    weights are buffers), kept until a tensor's version counter moves."""
    tensors = [*model.parameters(), *model.buffers()]
    versions = [(id(p), p._version) for p in tensors]
    kept = getattr(model, "_fingerprint", None)
    if kept is None or kept[0] != versions:
        total = sum(p.detach().double().sum() for p in tensors).item()
        model._fingerprint = (versions, struct.unpack("<q", struct.pack("<d", total))[0])
    return model._fingerprint[1]


# ----------------------------------------------------------------------------- graph mode

class GraphedForward(EagerForward):
    """The model forward over a chunk, replayed from CUDA graphs (GPU only). What a graph reads stays at
    fixed addresses (static inputs here, caches and text K/V in the VideoState); commit and eviction are
    Python around the replay, so a graph's key is what each rank's cache holds (VideoState.visible). A new
    key costs an eager warm-up, a barrier, the capture and a first replay, under a Deadline."""

    def __init__(self, model, state, exchange, timeout_s):
        super().__init__(model, state)
        self.exchange, self.timeout_s = exchange, timeout_s
        self.graphs = {}            # visible-cache key -> (graph, output buffer)
        self.pool = None            # one memory pool for all of them: they never run at the same time
        self.static = None          # inputs the graphs read: x, timestep, layout (static RoPE rows)

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
        key = self.state.visible(layout)
        if key not in self.graphs:
            self.graphs[key] = self.capture(static_x, static_t, static_layout)
        graph, output = self.graphs[key]
        graph.replay()
        return output

    def capture(self, x, timestep, layout):
        run = lambda: self.model(x, timestep, layout, self.state)
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
        with capture_deadline(self.timeout_s, what):
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                output = run()
            graph.replay()
            torch.cuda.synchronize()
        return graph, output


def capture_deadline(seconds, what):
    """A hung capture ends every rank with one line naming what hung and what to switch."""
    advice = "rerun with --exchange symm (peer copies instead of NCCL) or with --no-graph"
    return Deadline(seconds, what, advice, sp.world()[1])


@functools.lru_cache(maxsize=4)
def graphed_forward(model, mesh, table, batch, cache_plan, options):
    """The GraphedForward of one video shape, built at its first video and reused by every later one."""
    return GraphedForward(model, VideoState(model, table, cache_plan), exchange_name(mesh),
                          options.graph_timeout_s)


def chunk_forward(model, mesh, table, batch, cache_plan, options):
    """The shape's GraphedForward (kept across videos), or a fresh EagerForward, each with its state."""
    if options.graphs:
        return graphed_forward(model, mesh, table, batch, cache_plan, options)
    return EagerForward(model, VideoState(model, table, cache_plan))


def exchange_name(mesh):
    return "none" if mesh.world_size == 1 else "symmetric memory" if mesh.symmetric is not None else "nccl"


def finish(timeout_s=120):
    """Drop every CUDA graph (a live graph keeps NCCL from tearing down: the job would hang at exit), then
    leave the process group in step with the other ranks."""
    graphed_forward.cache_clear()
    gc.collect()
    with Deadline(timeout_s, "leaving the process group", rank=sp.world()[1]):
        sp.finish_distributed()


# ----------------------------------------------------------------------------- weights

ATTENTION_KERNELS = ("sdpa", "flash-attn-4")    # PyTorch's SDPA (cuDNN first), FlashAttention-4 (optional)
KEY_PARTS = 2                                   # the most runs of keys self-attention is cut into (measured)


def build_model(preset, dtype, device, seed, checkpoint=None, use_ema=False, mode="fused", fp8=False,
                attention="sdpa", key_parts=KEY_PARTS):
    """A PRESETS model with stage 05's attention `mode`: random weights from `seed`, or a checkpoint's,
    loaded strictly; fp8: use_fp8; attention, key_parts: self_attention_kernel's. On a GPU the code around
    attention runs compiled."""
    torch.manual_seed(seed)
    on_gpu = torch.device(device).type == "cuda"
    model = CausalWanModel(PRESETS[preset], mode, on_gpu).to(dtype)   # load in the dtype asked for
    if checkpoint:
        weights.load_dit(model, checkpoint, use_ema)
    if fp8:
        use_fp8(model, compile=on_gpu)
    if on_gpu:
        attend = self_attention_kernel(attention, torch.device(device), key_parts)
        for block in model.blocks:
            block.self_attn.attend = attend
    return model.to(device).eval()


def build_job_model(run):
    """The DiT the flags ask for (build_model with the run's dtype and device)."""
    a = run.args
    return build_model(a.preset, run.dtype, run.device, a.seed, a.checkpoint, a.use_ema, a.mode, a.fp8,
                       a.attention, a.key_parts)


def self_attention_kernel(attention, device, key_parts=KEY_PARTS):
    """The blocks' self-attention on a GPU, attend(q, k, v) on [B, H, S, D]: `attention`'s kernel (one of
    ATTENTION_KERNELS) with the keys cut into at most `key_parts` runs, run as one batch and merged (stage
    03's split_key_attention), the fewest that fill the GPU within 5% of the best (key_parts)."""
    # in a model of 128-query tiles, one per processor at a time, a chunk's 4680 queries x 12 heads make
    # 444 tiles: 3.4 waves on an H200's 132 processors, the last one 36% full; two runs, 6.7 waves
    with_lse = extras.flash_attention_4() if attention == "flash-attn-4" else sp.attention_with_lse
    processors = torch.cuda.get_device_properties(device).multi_processor_count
    merge = fused.compiled(sp.merge_parts)

    def attend(q, k, v):
        if attention != "flash-attn-4" and sp.lse_kernel(q, k, v) is None:
            return causal.fast_attention(q, k, v)        # no fused kernel gives a log-sum-exp here: SDPA's
        B, H, queries, _ = q.shape
        parts = sp.key_parts(B * H * -(-queries // 128), k.shape[2], processors, key_parts)
        return sp.split_key_attention(q, k, v, parts, with_lse, merge)
    return attend


# ----------------------------------------------------------------------------- FP8 (opt-in)

FP8 = torch.float8_e4m3fn


def fp8_rows(x):
    """x [M, K] -> (e4m3 values [M, K], float32 scales [M, 1]): x ~ values * scale, each row scaled so its
    largest magnitude is e4m3's largest, 448."""
    scale = x.detach().abs().amax(-1, keepdim=True).float().clamp_min(1e-12) / torch.finfo(FP8).max
    return (x.float() / scale).to(FP8), scale


def fp8_matmul(values, scale, weight_fp8, weight_scale, bias, dtype):
    """(values [M, K] e4m3, scales [M, 1]) -> [M, N] in dtype: on a GPU one torch._scaled_mm adding the
    bias, with fast accumulation (the tensor cores' own accumulator, not promoted to float32 every few
    products: a whole video's latents 2.5-3.2% faster on an H100, as far from float32's); on the CPU the
    same product of the dequantized operands in float32, as the CPU's _scaled_mm takes only per-tensor
    scales in some releases (torch 2.11 among them)."""
    if values.is_cuda:
        return torch._scaled_mm(values, weight_fp8.t(), scale_a=scale, scale_b=weight_scale,
                                bias=bias.to(dtype), out_dtype=dtype, use_fast_accum=True)
    weight = weight_fp8.float() * weight_scale.t()                                # [N, K]
    return torch.addmm(bias.float(), values.float() * scale, weight.t()).to(dtype)


def fp8_linear(x, weight_fp8, weight_scale, bias):
    """x [..., K] -> [..., N] in x's dtype: x quantized per token (fp8_rows), then fp8_matmul."""
    y = fp8_matmul(*fp8_rows(x.flatten(0, -2)), weight_fp8, weight_scale, bias, x.dtype)
    return y.unflatten(0, x.shape[:-1])


class Fp8Linear(nn.Module):
    """y = (q_x s_x)(q_w s_w)^T + b (fp8_linear), the weight in e4m3 with a scale per output channel. Layers
    on one input make one: weights stacked, one GEMM, outputs split. compile: for a call from eager code."""

    def __init__(self, *linears, compile=False):
        super().__init__()
        weight, scale = fp8_rows(torch.cat([layer.weight for layer in linears]))
        self.register_buffer("weight_fp8", weight)                               # [N, K] e4m3
        self.register_buffer("weight_scale", scale.t().contiguous())             # [1, N]
        self.bias = nn.Parameter(torch.cat([layer.bias for layer in linears]).detach())
        self.splits = [layer.out_features for layer in linears]
        self.run = fused.compiled(fp8_linear) if compile else fp8_linear

    def forward(self, x):
        y = self.run(x, self.weight_fp8, self.weight_scale, self.bias)
        return y.split(self.splits, dim=-1) if len(self.splits) > 1 else y

    def quantized(self, values, scale, dtype):
        """The layer on an input already quantized (values [M, K] e4m3, scales [M, 1]) -> [M, N] in dtype."""
        return fp8_matmul(values, scale, self.weight_fp8, self.weight_scale, self.bias, dtype)


def gelu_fp8_rows(x):
    """fp8_rows(GELU_tanh(x)) for x [M, K]. On a GPU one Triton pass (gelu_fp8_op) reads x once and writes the
    e4m3 values, where the compiled GELU, row maximum and division took two passes at a third of the rate."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.shape[-1] <= 1 << 16:
        return gelu_fp8_op()(x)
    return fp8_rows(F.gelu(x, approximate="tanh"))


@functools.lru_cache(maxsize=None)
def gelu_fp8_op():
    """gelu_fp8_rows's GPU kernel as a custom op, opaque to torch.compile (inductor fails to compile it
    inlined). A row per program, held in registers as a power-of-two head and a masked tail."""
    namespace = torch.ops.self_forcing_sp
    if hasattr(namespace, "gelu_fp8_rows"):  # another copy of this module registered it
        return namespace.gelu_fp8_rows
    import triton
    import triton.language as tl

    @triton.jit
    def gelu_rounded(v):                       # GELU(tanh) as x * sigmoid(2u); the caller rounds to x's dtype
        u = 1.5957691216057308 * (v + 0.044715 * v * v * v)
        return v / (1.0 + tl.exp(-u))

    @triton.jit
    def kernel(x, values, scales, K, HEAD: tl.constexpr, TAIL: tl.constexpr, HAS_TAIL: tl.constexpr,
               FP8_MAX: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * K
        head, tail = tl.arange(0, HEAD), HEAD + tl.arange(0, TAIL)
        a = gelu_rounded(tl.load(x + row + head).to(tl.float32)).to(x.dtype.element_ty).to(tl.float32)
        amax = tl.max(tl.abs(a))
        if HAS_TAIL:
            b = tl.load(x + row + tail, mask=tail < K, other=0.0).to(tl.float32)
            b = gelu_rounded(b).to(x.dtype.element_ty).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(b)))
        amax = tl.maximum(amax, 1e-12)
        tl.store(scales + tl.program_id(0), amax / FP8_MAX)                     # as fp8_rows' scale
        inverse = FP8_MAX / amax               # one division a row (one a value bound it by its arithmetic)
        tl.store(values + row + head, (a * inverse).to(tl.float8e4nv))
        if HAS_TAIL:
            tl.store(values + row + tail, (b * inverse).to(tl.float8e4nv), mask=tail < K)

    @torch.library.custom_op("self_forcing_sp::gelu_fp8_rows", mutates_args=())
    def op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.contiguous()
        (M, K), head = x.shape, 1 << (x.shape[1].bit_length() - 1)
        values, scales = torch.empty_like(x, dtype=FP8), x.new_empty(M, 1, dtype=torch.float32)
        if M:
            kernel[(M,)](x, values, scales, K, HEAD=head, TAIL=triton.next_power_of_2(max(K - head, 1)),
                         HAS_TAIL=K > head, FP8_MAX=torch.finfo(FP8).max, num_warps=8)
        return values, scales

    @op.register_fake
    def _(x):
        return x.new_empty(x.shape, dtype=FP8), x.new_empty(x.shape[0], 1, dtype=torch.float32)

    return namespace.gelu_fp8_rows


def norm_fp8_rows(x, weight, bias, group, eps, residual=None, gate=None):
    """x [M, K] (plus residual [M, K] times gate[group]: the new x), its rows layer-normed, times
    weight[group], plus bias[group], in x's dtype, quantized per row (fp8_rows) -> (new x or None, values,
    scales). weight, bias, gate [G, K]; G = 1: one row for every token; group [M] int. On a GPU one Triton
    pass (norm_fp8_op) reads each row once, where inductor's code for rows over 1024 wide reads them two or
    three times."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.shape[-1] <= 1 << 16:
        new_x, values, scales = norm_fp8_op()(x, residual, gate, weight, bias, group, eps)
        return (new_x if residual is not None else None), values, scales
    rows = lambda t: t[group] if t.shape[0] > 1 else t
    wide = torch.promote_types(x.dtype, torch.float32)                      # as LayerNorm; sums rounded once
    if residual is not None:
        x = (x.to(wide) + residual.to(wide) * (1 if gate is None else rows(gate).to(wide))).to(x.dtype)
    xf = x.to(wide)
    h = F.layer_norm(xf, x.shape[-1:], eps=eps) * rows(weight).to(xf.dtype) + rows(bias).to(xf.dtype)
    return (x if residual is not None else None), *fp8_rows(h.to(x.dtype))


@functools.lru_cache(maxsize=None)
def norm_fp8_op():
    """norm_fp8_rows's GPU kernel as a custom op: a row per program, held in registers as a power-of-two head
    and a masked tail, as gelu_fp8_op's."""
    namespace = torch.ops.self_forcing_sp
    if hasattr(namespace, "norm_fp8_rows"):
        return namespace.norm_fp8_rows
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x, residual, gate, weight, bias, group, new_x, values, scales, K, eps, gate_stride,
               affine_stride, HEAD: tl.constexpr, TAIL: tl.constexpr, HAS_TAIL: tl.constexpr,
               HAS_RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr, FP8_MAX: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * K
        g = tl.load(group + tl.program_id(0)).to(tl.int64)
        head, tail = tl.arange(0, HEAD), HEAD + tl.arange(0, TAIL)
        in_tail = tail < K
        a = tl.load(x + row + head).to(tl.float32)
        if HAS_RESIDUAL:
            ra = tl.load(residual + row + head).to(tl.float32)
            if HAS_GATE:
                ra = ra * tl.load(gate + g * gate_stride + head).to(tl.float32)
            a = (a + ra).to(x.dtype.element_ty)
            tl.store(new_x + row + head, a)
            a = a.to(tl.float32)
        total = tl.sum(a)
        if HAS_TAIL:
            b = tl.load(x + row + tail, mask=in_tail, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                rb = tl.load(residual + row + tail, mask=in_tail, other=0.0).to(tl.float32)
                if HAS_GATE:
                    rb = rb * tl.load(gate + g * gate_stride + tail, mask=in_tail, other=0.0).to(tl.float32)
                b = (b + rb).to(x.dtype.element_ty)
                tl.store(new_x + row + tail, b, mask=in_tail)
                b = b.to(tl.float32)
            total += tl.sum(b)
        mean = total / K
        da = a - mean
        square = tl.sum(da * da)
        if HAS_TAIL:
            db = tl.where(in_tail, b - mean, 0.0)
            square += tl.sum(db * db)
        rstd = 1.0 / tl.sqrt(square / K + eps)
        wa = tl.load(weight + g * affine_stride + head).to(tl.float32)
        ba = tl.load(bias + g * affine_stride + head).to(tl.float32)
        ha = (da * rstd * wa + ba).to(x.dtype.element_ty).to(tl.float32)
        amax = tl.max(tl.abs(ha))
        if HAS_TAIL:
            wb = tl.load(weight + g * affine_stride + tail, mask=in_tail, other=0.0).to(tl.float32)
            bb = tl.load(bias + g * affine_stride + tail, mask=in_tail, other=0.0).to(tl.float32)
            hb = (db * rstd * wb + bb).to(x.dtype.element_ty).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(hb)))
        amax = tl.maximum(amax, 1e-12)
        tl.store(scales + tl.program_id(0), amax / FP8_MAX)                    # as fp8_rows' scale
        inverse = FP8_MAX / amax
        tl.store(values + row + head, (ha * inverse).to(tl.float8e4nv))
        if HAS_TAIL:
            tl.store(values + row + tail, (hb * inverse).to(tl.float8e4nv), mask=in_tail)

    @torch.library.custom_op("self_forcing_sp::norm_fp8_rows", mutates_args=())
    def op(x: torch.Tensor, residual: Optional[torch.Tensor], gate: Optional[torch.Tensor],
           weight: torch.Tensor, bias: torch.Tensor, group: torch.Tensor,
           eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, weight, bias, group = x.contiguous(), weight.contiguous(), bias.contiguous(), group.contiguous()
        residual = None if residual is None else residual.contiguous()
        gate = None if gate is None else gate.contiguous()
        (M, K), head = x.shape, 1 << (x.shape[1].bit_length() - 1)
        assert bias.shape == weight.shape and weight.shape[1] == K and group.shape == (M,), "shapes"
        assert residual is None or residual.shape == x.shape, "residual's shape"
        assert gate is None or (residual is not None and gate.shape[1] == K), "gate's shape"
        new_x, values, scales = norm_fp8_outputs(x, residual)
        if M:
            kernel[(M,)](x, x if residual is None else residual, x if gate is None else gate, weight, bias,
                         group, new_x if residual is not None else x, values, scales, K, eps,
                         0 if gate is None or gate.shape[0] == 1 else K, 0 if weight.shape[0] == 1 else K,
                         HEAD=head, TAIL=triton.next_power_of_2(max(K - head, 1)), HAS_TAIL=K > head,
                         HAS_RESIDUAL=residual is not None, HAS_GATE=gate is not None,
                         FP8_MAX=torch.finfo(FP8).max, num_warps=4)
        return new_x, values, scales

    @op.register_fake
    def _(x, residual, gate, weight, bias, group, eps):
        return norm_fp8_outputs(x, residual)

    return namespace.norm_fp8_rows


def norm_fp8_outputs(x, residual):
    """norm_fp8_op's outputs, empty and contiguous: new x (none without a residual), values, scales."""
    new_x = x.new_empty(x.shape if residual is not None else (0,))
    return new_x, x.new_empty(x.shape, dtype=FP8), x.new_empty(x.shape[0], 1, dtype=torch.float32)


def use_fp8(model, compile=False):
    """The blocks' linear layers on the token stream in FP8 (not the text K/V, embeddings or head); compile
    (GPU): each input is quantized once, in the compiled code that makes it."""
    for block in model.blocks:
        attention, cross, ffn = block.self_attn, block.cross_attn, block.ffn
        block.fp8_qkv = Fp8Linear(attention.q, attention.k, attention.v)     # one GEMM, in pre_attention
        del attention.q, attention.k, attention.v
        attention.o = Fp8Linear(attention.o, compile=compile)                # called by stage 05's eager code
        cross.q, cross.o = Fp8Linear(cross.q), Fp8Linear(cross.o)            # these four: in post_attention
        ffn[0], ffn[2] = Fp8Linear(ffn[0]), Fp8Linear(ffn[2])
    if compile:           # registered before torch.compile meets them: registering one there splits the graph
        gelu_fp8_op(), norm_fp8_op()
    return model


# ----------------------------------------------------------------------------- the program

def video_flops(config, video):
    """FLOPs of a video: 4 denoising passes per chunk, a clean-context pass for all but the last, each chunk
    seeing at most its window (re-cache passes left out)."""
    tokens, total = video.chunk_frames * video.tokens_per_frame, 0
    for c in range(video.num_chunks):
        passes = len(DENOISING_STEPS) + (c + 1 < video.num_chunks)
        seen = (c + 1) * video.chunk_frames if video.window_frames is None else min(
            (c + 1) * video.chunk_frames, video.window_frames)
        total += passes * forward_flops(config, tokens, seen * video.tokens_per_frame)
    return total


def forward_flops(config, tokens, visible_keys):
    """One forward: the linear layers (text K/V excluded: once per video), self- and cross-attention."""
    linear = 2 * tokens * (6 * config.dim ** 2 + 2 * config.dim * config.ffn_dim)   # q k v o, cross q o, ffn
    attention = 4 * tokens * (visible_keys + config.text_len) * config.dim      # QK^T, PV: self + cross
    return config.num_layers * (linear + attention)


def cpu_estimate(config, video):
    """(what a CPU run of the DiT costs, in a line, where over 100x the tiny default run, else None; its
    minutes). A decoder (stage 07) comes on top."""
    flops = video_flops(config, video)
    scale = video_flops(PRESETS["tiny"], VideoSpec(21, *PRESET_SIZE["tiny"]))
    minutes = flops / 30e9 / 60
    parameters = (config.num_layers * (8 * config.dim ** 2 + 2 * config.dim * config.ffn_dim)
                  + config.text_dim * config.dim)
    cache = config.num_layers * video.cache_plan[0] * video.tokens_per_frame * 2 * config.dim
    gib = 4 * (parameters + cache) / 2**30
    line = (f"this CPU run needs about {flops / 1e12:,.1f} TFLOP and {gib:.1f} GiB of float32 weights and "
            f"cache for the DiT ({flops / scale:,.0f}x the tiny preset's default run): at a few tens of "
            f"GFLOP/s {f'about {minutes:,.0f} min' if minutes >= 1 else 'under a minute'}, decoding apart")
    return line if flops >= 100 * scale else None, minutes


def parser(doc=__doc__, output="out/latents.pt"):
    """06's flags, in groups; stage 07 and the bench and verify programs add theirs."""
    p = Parser(doc, flag_problem)
    video = p.add_argument_group("the video")
    video.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    video.add_argument("--frames", type=positive, default=21, help="latent frames (21 = 81 video frames)")
    video.add_argument("--height", type=positive, default=None,
                       help="video height in pixels (preset default)")
    video.add_argument("--width", type=positive, default=None, help="video width in pixels (preset default)")
    video.add_argument("--window-frames", type=positive, default=None,
                       help="latent frames a chunk sees in all, the sink's and its own included "
                            "(default: all)")
    video.add_argument("--seed", type=non_negative, default=0)
    long = p.add_argument_group("a long stream")
    long.add_argument("--sink-frames", type=non_negative, default=0,
                      help="the stream's first latent frames, which every chunk keeps seeing (whole chunks)")
    long.add_argument("--switch", type=switch_flag, action="append", default=[], metavar="FRAME[=FILE]",
                      help="from latent frame FRAME on, the prompt in FILE (umT5 features, as "
                           "--text-embedding; a prompt's text with --prompt); no FILE: random features "
                           "(repeat the flag)")
    long.add_argument("--rebuild-sink", action="store_true",
                      help="at a switch, re-run the sink under the new prompt too (default: it keeps its "
                           "own)")
    inputs = p.add_argument_group("weights, text and output")
    inputs.add_argument("--checkpoint", help="Wan2.1 / Self-Forcing .pt, safetensors or a diffusers release "
                                             "(random weights when absent)")
    inputs.add_argument("--use-ema", action="store_true",
                        help="take 'generator_ema' from a Self-Forcing file")
    inputs.add_argument("--text-embedding", help="tensor file [L, 4096] or [B, L, 4096] of umT5 features")
    inputs.add_argument("--prompt",
                        help="a text prompt, encoded with the umT5 of --wan-folder (optional packages)")
    inputs.add_argument("--wan-folder", help="a local Wan2.1 diffusers release (text_encoder/, tokenizer/)")
    inputs.add_argument("--output", default=output,
                        help=f"where the result is saved (default {output}); 'none': kept nowhere (a long "
                             "stream's memory stays flat)")
    how = p.add_argument_group("how it runs")
    how.add_argument("--ring", type=positive, default=None,
                     help="ring degree (default: most Ulysses the heads allow)")
    how.add_argument("--dtype", choices=["bfloat16", "float32", "float64"], default=None,
                     help="default bfloat16 on GPU, float32 on CPU")
    how.add_argument("--mode", choices=fused.MODES, default="fused", help="stage 05's attention layer")
    how.add_argument("--no-graph", action="store_true",
                     help="GPU: launch every kernel from Python instead of replaying CUDA graphs")
    how.add_argument("--exchange", choices=["nccl", "symm"], default="nccl",
                     help="GPU: the Ulysses all-to-all as NCCL calls, or as peer copies into symmetric "
                          "memory")
    how.add_argument("--graph-timeout", type=float, default=300,
                     help="seconds a CUDA graph capture and its first replay may take before every rank "
                          "stops")
    how.add_argument("--fp8", action="store_true",
                     help="the DiT's linear layers in FP8 (e4m3, per-token and per-channel scales); its "
                          "speed and distance from bf16 in the README")
    how.add_argument("--attention", choices=ATTENTION_KERNELS, default="sdpa",
                     help="the DiT's self-attention kernel: PyTorch's (cuDNN first), or FlashAttention-4 "
                          "(optional package; the ring and the unfused mode keep PyTorch's)")
    how.add_argument("--key-parts", type=positive, default=KEY_PARTS,
                     help="GPU: self-attention's keys cut into at most this many runs, run as one batch "
                          "where that fills the GPU better (1: one call of a kernel giving its "
                          "log-sum-exp)")
    how.add_argument("--allow-cpu", action="store_true",
                     help="run on the CPU even a real preset, or a tiny run estimated at over 10 minutes")
    return p


def switch_flag(text):
    """argparse type of --switch FRAME[=FILE]: (frame >= 1, file or None)."""
    frame, _, value = text.partition("=")
    if not frame.isdigit() or int(frame) < 1 or (_ and not value.strip()):
        raise argparse.ArgumentTypeError(
            f"expected FRAME or FRAME=FILE with a latent frame >= 1, got {text!r}")
    return int(frame), value or None


def flag_spelling(name, value):
    """A setting named as its flag: --window-frames 2; settings that are no flag are named by value."""
    flags = {"frames", "height", "width", "window_frames", "sink_frames"}
    return f"--{name.replace('_', '-')} {value}" if name in flags else f"{value}"


def video_spec(args):
    """The video the flags ask for: the preset's size unless --height / --width say otherwise."""
    height, width = PRESET_SIZE[args.preset]
    return VideoSpec(args.frames, args.height or height, args.width or width,
                     window_frames=args.window_frames, sink_frames=args.sink_frames,
                     rebuild_sink=args.rebuild_sink)


OUTPUT_IN_MEMORY_GIB = 4      # a tensor file is kept in host memory until the run ends: at most this much


def kept(args):
    """Whether the run keeps its result for a tensor file (--output none keeps nothing)."""
    return args.output != "none"


def output_problem(args, gib_per_latent_frame):
    """A tensor output too large to keep in memory until the end (a message), or None."""
    gib = args.frames * gib_per_latent_frame
    if kept(args) and gib > OUTPUT_IN_MEMORY_GIB:
        return (f"--output {args.output} would hold {gib:.1f} GiB in memory until the run ends (at most "
                f"{OUTPUT_IN_MEMORY_GIB}); a stream this long: --output none"
                f"{', with --video to write the frames as they come' if hasattr(args, 'video') else ''}")
    return None


def flag_problem(args):
    """What is wrong with the flags alone (a message), found alike on every rank before any set-up."""
    named = [f for f in ("checkpoint", "text_embedding", "prompt", "wan_folder", "output", "vae", "video")
             if getattr(args, f, None) is not None and not getattr(args, f).strip()]
    if named:
        return f"--{named[0].replace('_', '-')} is empty"
    video = video_spec(args)
    problem = (video.problem(spell=flag_spelling)
               or switch_frames_problem([0] + [frame for frame, _ in args.switch], video.chunk_frames)
               or output_problem(args, 16 * video.latent_height * video.latent_width * 4 / 2**30))
    if problem:
        for library, flag in (("prompt frames", "--switch frames"), ("prompts at frames", "--switch frames")):
            problem = problem.replace(library, flag)
        return problem
    if args.prompt and any(value is None for _, value in args.switch):
        return "--switch with --prompt takes FRAME=TEXT: the prompt's text from that frame on"
    late = [frame for frame, _ in args.switch if frame >= args.frames]
    if late:
        return f"--switch {late[0]} is past the video's last latent frame, {args.frames - 1}"
    if args.rebuild_sink and not args.sink_frames:
        return "--rebuild-sink rebuilds the sink at a switch: it needs --sink-frames"
    heads, world_size = PRESETS[args.preset].num_heads, int(os.environ.get("WORLD_SIZE", "1"))
    if args.ring is not None and (world_size % args.ring or heads % (world_size // args.ring)):
        return (f"--ring {args.ring} does not fit {world_size} rank(s): the ring degree must divide the "
                f"world size, and the rest (the Ulysses degree) the {heads} heads; choose from "
                f"{[r for _, r in sp.factorizations(world_size, heads)]}")
    if args.seed >= 2**63:
        return f"--seed {args.seed} is too large (at most {2**63 - 1})"
    if not 1 <= args.graph_timeout <= 1e6:
        return f"--graph-timeout must be a number of seconds from 1 to 1000000, got {args.graph_timeout}"
    if args.wan_folder and not args.prompt:
        return "--wan-folder is read only with --prompt"
    if args.use_ema and not args.checkpoint:
        return "--use-ema picks the EMA weights of a --checkpoint: give one"
    problem = extras.extras_problem(args.prompt, args.wan_folder, args.text_embedding,
                                    getattr(args, "video", None))
    if not problem and args.attention == "flash-attn-4":
        problem = ("--attention flash-attn-4 runs in --mode fused or overlap" if args.mode == "unfused" else
                   extras.flash_attention_4_problem(chosen_dtype(args.dtype), PRESETS[args.preset].head_dim))
    if problem or torch.cuda.is_available():
        return problem
    if args.exchange == "symm":
        return "--exchange symm needs GPUs (symmetric memory is CUDA memory)"
    estimate, minutes = cpu_estimate(PRESETS[args.preset], video_spec(args))
    if (args.preset != "tiny" or minutes > 10) and not args.allow_cpu:
        if estimate is None:
            return (f"no GPU here: --preset {args.preset} is the real model, slow on a CPU; --allow-cpu runs "
                    "it anyway")
        return (f"no GPU here: {estimate}; a smaller --height/--width/--frames fits the CPU, or --allow-cpu "
                "runs it anyway")
    return None


@dataclass(frozen=True)
class Run:
    """One command's flags and what they set up on this rank."""
    name: str                      # the program, as its one-line errors name it
    args: object
    video: VideoSpec
    device: torch.device
    mesh: object
    dtype: torch.dtype
    options: RunOptions

    @property
    def show(self):
        return self.mesh.rank == 0

    def describe(self):
        a, m = self.args, self.mesh
        gpu = torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu"
        return (f"{a.preset}, {m.world_size} x {gpu} (ulysses {m.ulysses_degree} x ring {m.ring_degree}), "
                f"{self.dtype}, {self.video.frames} latent frames at {self.video.height}x{self.video.width}"
                f"{', CUDA graphs' if self.options.graphs else ''}")


def set_up(args, name, needs_gpus=None):
    """Join the job and build the mesh the flags ask for. needs_gpus names what needs a GPU per rank."""
    real = args.preset != "tiny" and not args.allow_cpu
    needs_gpus = needs_gpus or ("--exchange symm" if args.exchange == "symm" else None) or (
        f"--preset {args.preset}" if real else None)
    device = sp.init_distributed(needs_gpus=needs_gpus)
    shape = sp.mesh_shape(sp.world()[0], PRESETS[args.preset].num_heads, args.ring)
    mesh = sp.SPMesh.get(*shape, device=device)
    if args.exchange == "symm":
        mesh.use_symmetric_memory()
    estimate = cpu_estimate(PRESETS[args.preset], video_spec(args))[0] if device.type == "cpu" else None
    if estimate and mesh.rank == 0:
        print(f"note: {estimate}", flush=True)
    options = RunOptions(device.type == "cuda" and not args.no_graph, args.graph_timeout)
    return Run(name, args, video_spec(args), device, mesh, chosen_dtype(args.dtype, device), options)


def chosen_dtype(name, device=None):
    """A --dtype flag's torch dtype; unset, bfloat16 on GPU and float32 on CPU (device None, before set-up:
    a GPU where this machine has one)."""
    on_gpu = torch.cuda.is_available() if device is None else device.type == "cuda"
    return getattr(torch, name or ("bfloat16" if on_gpu else "float32"))


def read_inputs(run, *more, outputs=("output",)):
    """[model, prompt schedule, what each of `more` builds], rank 0's outputs tried by creating them: every
    rank ends with the same one-line error, or all go on."""
    a = run.args
    problem, built = None, [None, None] + [None] * len(more)
    if run.show:
        paths = [(f"--{flag}", getattr(a, flag)) for flag in outputs
                 if getattr(a, flag, None) not in (None, "none")]
        problem = next(filter(None, (files.output_problem(path, flag) for flag, path in paths)), None)
    try:
        model = build_job_model(run)
        load = lambda path, i, flag: weights.load_text(path, model.config, 1, a.seed + i, flag)
        built[0], built[1] = model, [(0, load(a.text_embedding, 0, "--text-embedding "))] + [
            (frame, None if a.prompt else load(value, i, f"--switch {frame}="))
            for i, (frame, value) in enumerate(a.switch, start=1)]
        built[2:] = [build() for build in more]
    except BadInput as e:
        problem = problem or str(e)
    agree(run, problem)
    if a.prompt:
        clock = Clock(run.device)
        texts = [a.prompt] + [value for _, value in a.switch]
        encode = lambda text: extras.prompt_features(a.wan_folder, text, model.config.text_len, run.device,
                                                     run.mesh)
        built[1] = [(frame, encode(text)) for (frame, _), text in zip(built[1], texts)]
        if run.show:
            print(f"prompt: {len(texts)} prompt(s) through umT5 in {clock.mark():.1f} s (not in the figures "
                  "below)")
    return built


def switch_cost(hand_outs, prompts, video):
    """A line: chunks after a switch (re-cache included) beside the others, hand-out to hand-out, once the
    window is full; None without a switch. hand_outs: seconds to each chunk's hand-out."""
    starts, C = [frame for frame, _ in prompts], video.chunk_frames
    full = 0 if video.window_frames is None else -(-video.window_frames // C)
    gaps = {k: hand_outs[k] - hand_outs[k - 1] for k in range(max(1, full), len(hand_outs))}
    switched = {k for k in gaps if prompt_of_chunk(starts, k * C) != prompt_of_chunk(starts, (k - 1) * C)}
    ordinary = [gap for k, gap in gaps.items() if k not in switched and k + 1 not in switched]
    if not switched or not ordinary:
        return None
    usual, after = statistics.median(ordinary) * 1e3, statistics.mean(gaps[k] for k in switched) * 1e3
    return (f"  a chunk after a prompt switch {after:.1f} ms from the chunk before (mean of "
            f"{len(switched)}), an ordinary one {usual:.1f} ms (median of {len(ordinary)}): a switch costs "
            f"{after - usual:.1f} ms")


def agree(run, problem):
    """Every rank raises the same one-line BadInput if any rank has a problem (one process: its own line)."""
    if run.mesh.world_size > 1:
        run.mesh.agree(run.name, problem)
    elif problem:
        raise BadInput(problem)


def save_on_rank_zero(run, result, problem=None):
    """Rank 0 saves result() to --output (unless none); a failed save, or rank 0's `problem`, ends every rank
    with it."""
    if run.show and kept(run.args):
        try:
            files.save(result(), run.args.output)
        except BadInput as e:
            problem = problem or str(e)
    agree(run, problem)


def time_stream(chunks, device, wait_each=False, keep=True):
    """(the chunks, seconds to each hand-out on the device's timeline); wait_each: the host waits too;
    keep=False keeps the first chunk only."""
    clock, kept = Clock(device), []
    for chunk in chunks:
        clock.record()
        if wait_each and device.type == "cuda":
            torch.cuda.synchronize()
        if keep or not kept:
            kept.append(chunk)
    return kept, clock.seconds()


def warm_up(run, fn):
    """On GPU, (seconds, fn()) of one untimed run (compile, capture, as a server would before its first
    request); None on CPU."""
    if run.device.type != "cuda":
        return None
    clock = Clock(run.device)
    result = fn()
    return clock.mark(), result


def cold_start(warm, what, video):
    """The line of a warm-up's first hand-out (warm_up's result, whose run returned its marks second)."""
    return (f"  cold start: {what} {warm[1][1][0]:.1f} s after the call (compile, CUDA graph capture); "
            f"warm-up of {warm_up_video(video).frames} latent frames {warm[0]:.1f} s")


def first_chunk_video(video):
    return replace(video, frames=CHUNK_FRAMES)


def tolerance(dtype):
    """The self-checks' bound: reordered sums; in bfloat16, roundings of values up to ~3."""
    return {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 5e-2)


def compare_with_one_process(run, run_alone, sharded, what):
    """With several ranks on the tiny preset (cheap there): the first chunk's result against one process."""
    if run.mesh.world_size == 1 or run.args.preset != "tiny":
        return
    error = check(f"{what} on {run.mesh.world_size} ranks vs one process", sharded,
                  run_alone(sp.SPMesh(1, 1, run.device, local=True)), tolerance(sharded.dtype))
    if run.show:
        print(f"  first chunk's {what} on {run.mesh.world_size} ranks vs one process: max error {error:.1e} "
              f"({sharded.dtype})")


def main(argv=None):
    """A video's latents after an untimed warm-up (GPU), timed on the device, saved on rank 0."""
    run = set_up(parser().parse_args(argv), "06_self_forcing_pipeline")
    a, video = run.args, run.video
    model, prompts = read_inputs(run)
    latents_stream = lambda spec: stream(model, prompts, spec, run.mesh, a.seed, run.options)
    warm = warm_up(run, lambda: time_stream(latents_stream(warm_up_video(video)), run.device, keep=False))
    chunks, marks = time_stream(latents_stream(video), run.device, keep=kept(a))
    latents = torch.cat(chunks, dim=2)                                          # [B, 16, F, H/8, W/8]
    save_on_rank_zero(run, lambda: {"latents": latents.cpu(), "frames": video.frames, "height": video.height,
                                    "width": video.width, "seed": a.seed, "preset": a.preset})
    if run.show:
        print(f"{run.name}: {run.describe()}")
        if warm is not None:
            print(cold_start(warm, "first chunk", video))
        print(f"  first chunk {marks[0] * 1e3:.1f} ms, total {marks[-1]:.3f} s, {video.video_frames} video "
              f"frames -> {video.video_frames / marks[-1]:.1f} FPS (latents)"
              f"{f'; latents {tuple(latents.shape)} saved to {a.output}' if kept(a) else ''}")
        switch_line = switch_cost(marks, prompts, video)
        if switch_line:
            print(switch_line)
    compare_with_one_process(run, lambda one: generate(model, prompts, first_chunk_video(video), one, a.seed,
                                                       run.options), latents[:, :, :CHUNK_FRAMES], "latents")
    finish(a.graph_timeout)


if __name__ == "__main__":
    run_main(main)

