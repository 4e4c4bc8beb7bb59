"""Stage 07 -- frames as they are made: Wan2.1's causal VAE decoder, streamed chunk by chunk and sharded
over the ranks in bands of rows.

The idea
    Wan2.1's VAE decoder turns 16-channel latents into RGB, 8x larger in space and 4x longer in time (the
    first latent frame gives one frame: F latent frames -> 4(F - 1) + 1 frames). It is causal in time:
    every 3-D convolution pads only on the past side. So each chunk that stage 06's stream hands out is
    decoded at once, every convolution keeping its last input frames (its time cache) for the next chunk,
    and the frames equal those of decoding the whole video in one call.

    The decoder, in Wan2.1's names (Wan2.1_VAE.pth loads strictly; a diffusers release's vae/ is renamed):
        latents * std + mean  ->  conv2 (1x1x1)  ->  decoder.conv1 (3x3x3, 16 -> 384)
        decoder.middle: residual block, attention over each frame's positions, residual block
        decoder.upsamples: 4 levels of 3 residual blocks (384, 384, 192, 96 channels); levels 0 and 1 end
            with 'upsample3d' (a causal time conv makes two frames of each, then 2x nearest in space and a
            3x3 conv halving the channels), level 2 with 'upsample2d' (the same without time)
        decoder.head: RMS norm, SiLU, 3x3x3 causal conv (96 -> 3); pixels clamped to [-1, 1]
    A residual block is (RMS norm, SiLU, 3x3x3 causal conv) twice, plus a 1x1x1 shortcut where the width
    changes. The first 'upsample3d' call skips its time conv for the video's first latent frame.

    Sharded: each rank decodes a contiguous band of rows of every frame. Every layer but the middle
    attention is local in space, and a 3x3 convolution needs one row beyond its band on each side: before
    each of the 33 a rank swaps its edge rows with its two neighbours (RowBands: 2 sends, 2 receives; 0.24-
    1.9 MB at 480x832 bf16), where an all-to-all would move the whole activation twice. The middle attention
    all-gathers the latent-size frame's keys and values.

    On a GPU every activation stays channels last (NDHWC), the layout cuDNN's kernels read; each RMS norm +
    SiLU is one Triton pass written into the buffer its convolution reads, taking the bias of the conv
    before it; other biases go in with the residual in one pass; the 2x upsampling's conv runs on the grid
    before 2x (Resample.phases). With one rank, each chunk shape is captured once as a CUDA graph and
    replayed in every later video (DecoderGraphs). One H200, bf16, a later chunk: 179.8 -> 107.9 ms, then
    107.2 -> 100.5 ms in a second call; 98.6 ms eager -> 96.5 ms as graphs in a third (README).

Shapes (Wan2.1, 480x832, one chunk of 3 latent frames; a band of h latent rows)
    latents: [B, 16, 3, 60, 104]  -> this rank's band [B, 16, 3, h, 104]
    pixels:  [B, 3, 12, 8h, 832]  -> gathered [B, 3, 12, 480, 832]; the first chunk as 1 frame, then 8

Uses
    03_sequence_parallel: shard_bounds, gather_shards
    06_self_forcing_pipeline: VAE_STRIDE, parser, video_spec, set_up, read_inputs, chosen_dtype, stream,
        generate, warm_up, warm_up_video, cold_start, kept, output_problem, agree, save_on_rank_zero,
        switch_cost, tolerance, compare_with_one_process, first_chunk_video, CHUNK_FRAMES, finish

Run
    python 07_vae_decoder.py                      the tiny pipeline decoded as it streams: the first frame's
                                                  latency, streamed == whole decode
    torchrun --nproc_per_node=8 07_vae_decoder.py the same on 8 ranks (bands of one latent row)
    --vae Wan2.1_VAE.pth loads real weights; --video out.mp4 writes the frames as they come (imageio with
    imageio-ffmpeg). bench_07.py times it.
"""
import functools
import importlib
import os
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from support import extras, weights
from support.harness import BadInput, check, run_main
from support.timing import Clock, MinuteReport

sp = importlib.import_module("03_sequence_parallel")
sf = importlib.import_module("06_self_forcing_pipeline")

# Wan2.1's latent statistics (wan/modules/vae.py WanVAE; diffusers' latents_mean / latents_std)
WAN21_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass(frozen=True)
class DecoderConfig:
    """The decoder's shape in Wan2.1's terms (dim_mult per level, read backwards going up)."""
    z_dim: int = 16
    dim: int = 96
    dim_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_upsample: tuple = (True, True, False)
    latents_mean: tuple = WAN21_MEAN
    latents_std: tuple = WAN21_STD

    @property
    def levels(self):
        return len(self.dim_mult)


DECODER_PRESETS = {
    "tiny": DecoderConfig(dim=8, dim_mult=(1, 1, 1, 1), num_res_blocks=1),    # tests and CPU runs
    "wan2.1": DecoderConfig(),                                                # Wan2.1's VAE (73 M)
}


# ----------------------------------------------------------------------------- bands of rows

class RowBands:
    """How every frame's rows (`rows` latent rows, bands `scale` times taller at `scale`) are split over the
    decoder's ranks, and the exchanges a band needs; with one rank, the halo is zeros, the gather a no-op."""

    def __init__(self, rows, world_size=1, rank=0, group=None):
        if rows < world_size:
            raise BadInput(f"the decoder splits frames into bands of rows: {rows} latent rows cannot feed "
                           f"{world_size} ranks (a height of at least {8 * world_size} pixels can)")
        self.rows, self.world_size, self.rank, self.group = rows, world_size, rank, group
        self.bounds = sp.shard_bounds(rows, world_size)

    @classmethod
    def for_job(cls, rows, mesh):
        """Bands over every rank of the job, exchanging in a process group of their own (side_group)."""
        if mesh.world_size == 1:
            return cls(rows)
        cls(rows, mesh.world_size)          # every rank raises the same BadInput here, before the group
        return cls(rows, mesh.world_size, mesh.rank, side_group(mesh))

    def band(self):
        """This rank's latent rows, [first, end)."""
        return self.bounds[self.rank]

    def halo_rows(self, rows):
        """The rows a band gets from each neighbour before a convolution `rows` deep (none with one rank:
        the convolution pads its own zeros)."""
        return rows if self.world_size > 1 else 0

    def halo(self, x, rows=1):
        """x [B, C, T, h, W] -> [B, C, T, h + 2 rows, W]: neighbour rows above and below (zeros at edges)."""
        out = channels_last_empty(*x.shape[:3], x.shape[3] + 2 * rows, x.shape[4], like=x)
        out[:, :, :, rows:-rows] = x
        self.fill_halo(out, x, rows)
        return out

    def fill_halo(self, out, x, rows):
        """The neighbours' edge rows (zeros at the frame's edges) into out's first and last `rows` rows."""
        top, bottom = out[:, :, :, :rows], out[:, :, :, -rows:]
        received, ops = [], []
        for peer, mine, theirs in ((self.rank - 1, x[:, :, :, :rows], top),
                                   (self.rank + 1, x[:, :, :, -rows:], bottom)):
            if 0 <= peer < self.world_size:
                buffer = torch.empty(theirs.shape, dtype=theirs.dtype, device=theirs.device)  # as mine, sent
                ops += [dist.P2POp(dist.isend, mine.contiguous(), peer, self.group),
                        dist.P2POp(dist.irecv, buffer, peer, self.group)]
                received.append((theirs, buffer))
            else:
                theirs.zero_()
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        for theirs, buffer in received:
            theirs.copy_(buffer)

    def gather(self, x, scale=1):
        """Every rank's band of x [B, C, T, h, W] (at `scale`): the whole frame's rows, on every rank."""
        if self.world_size == 1:
            return x
        return sp.gather_shards(x, [(b - a) * scale for a, b in self.bounds], dim=3, group=self.group)


@functools.lru_cache(maxsize=None)
def side_group(mesh):
    """A second process group of all the ranks (collective), so that a decoder on its own CUDA stream
    never shares the DiT's NCCL communicator (their calls could interleave differently and hang)."""
    return dist.new_group(list(range(mesh.world_size)))


# ----------------------------------------------------------------------------- the decoder's layers

def channels_last_empty(*shape, like):
    """An uninitialized [B, C, T, H, W] tensor laid out channels last (NDHWC in memory)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last_3d)


@functools.lru_cache(maxsize=None)
def device_constant(values, dtype, device):
    """Nested tuples of numbers as a tensor on `device`, made once (a host copy waits for the GPU)."""
    return torch.tensor(values, dtype=dtype, device=device)


EPS = 1e-12
BEGUN = "begun"         # a video's cache dict: True once its first latent frame is decoded


def rms_norm(x, gamma, eps=EPS):
    """Wan's RMS norm over the channels (dim 1), in float32 or wider: F.normalize(x) * sqrt(C) * gamma."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    out = xf * torch.rsqrt(xf.pow(2).sum(1, keepdim=True).clamp_min(eps * eps)) * x.shape[1] ** 0.5
    return out.type_as(x) * gamma


def norm_silu_into(out, x, gamma, shift=None):
    """out[...] = SiLU(rms_norm(x + shift)), out a view of a conv's input; on a GPU one pass (gpu_kernels)."""
    B, C, T, h, W = x.shape
    if not fast_on_gpu(x) or out.stride(1) != 1 or out.stride(3) != W * C or out.stride(4) != C:
        x = x if shift is None else x + shift.view(-1, 1, 1, 1)
        return out.copy_(F.silu(rms_norm(x, gamma)))
    C2 = 1 << (C - 1).bit_length()
    block, positions = max(1, 2048 // C2), B * T * h * W
    gpu_kernels().norm_silu[(-(-positions // block),)](
        x, gamma, gamma if shift is None else shift, out, positions, T, h * W, out.stride(0), out.stride(2),
        C ** 0.5, EPS * EPS, C=C, C2=C2, HAS_SHIFT=shift is not None, BLOCK=block, num_warps=2)
    return out


def add_bias(y, bias, residual=None):
    """y += bias (per channel), then + residual, in place; on a GPU in one pass (gpu_kernels), where
    PyTorch's own bias pass after a cuDNN convolution is slow on channels-last tensors."""
    if not fast_on_gpu(y) or (residual is not None and residual.stride() != y.stride()):
        y.add_(bias.view(-1, 1, 1, 1))
        return y if residual is None else y.add_(residual)
    n, block = y.numel(), 4096
    gpu_kernels().add_bias[(-(-n // block),)](y, bias, y if residual is None else residual, n, y.shape[1],
                                              HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=4)
    return y


def fast_on_gpu(x):
    return x.is_cuda and x.dtype != torch.float64 and x.is_contiguous(memory_format=torch.channels_last_3d)


@functools.lru_cache(maxsize=None)
def gpu_kernels():
    """The two memory-bound passes as Triton kernels over channels-last rows (C channels contiguous)."""
    import triton
    import triton.language as tl

    @triton.jit
    def norm_silu(x, gamma, shift, out, positions, frames, frame, out_batch, out_frame, sqrt_c, eps2,
                  C: tl.constexpr, C2: tl.constexpr, HAS_SHIFT: tl.constexpr, BLOCK: tl.constexpr):
        p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)         # positions (b, t, y, x)
        c = tl.arange(0, C2)
        mask = (p < positions)[:, None] & (c < C)[None, :]
        v = tl.load(x + p[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_SHIFT:                                                         # rounded, as x + shift is
            v = (v + tl.load(shift + c, mask=c < C, other=0.0).to(tl.float32)[None, :]).to(
                x.dtype.element_ty).to(tl.float32)
        scale = tl.rsqrt(tl.maximum(tl.sum(v * v, axis=1), eps2))
        y = (v * scale[:, None] * sqrt_c).to(x.dtype.element_ty).to(tl.float32)      # rounded as rms_norm
        g = tl.load(gamma + c, mask=c < C, other=0.0).to(tl.float32)
        y = (y * g[None, :]).to(x.dtype.element_ty).to(tl.float32)
        y = y / (1.0 + tl.exp(-y))                                                        # SiLU
        frame_of, at = p // frame, p % frame
        where = (frame_of // frames) * out_batch + (frame_of % frames) * out_frame + at * C
        tl.store(out + where[:, None] + c[None, :], y.to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def add_bias(y, bias, residual, n, C, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        v = tl.load(y + i, mask=m).to(tl.float32) + tl.load(bias + i % C, mask=m).to(tl.float32)
        if HAS_RESIDUAL:                                                  # rounded between, as two adds
            v = v.to(y.dtype.element_ty).to(tl.float32) + tl.load(residual + i, mask=m).to(tl.float32)
        tl.store(y + i, v.to(y.dtype.element_ty), mask=m)

    return types.SimpleNamespace(norm_silu=norm_silu, add_bias=add_bias)


class RMSNorm(nn.Module):
    def __init__(self, dim, images=False):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x):
        """The norm of x [B, C, T, H, W]."""
        return rms_norm(x, self.gamma.view(-1, 1, 1, 1))

    def silu_into(self, out, x, shift=None):
        """out[...] = SiLU(norm(x + shift)) (norm_silu_into)."""
        return norm_silu_into(out, x, self.gamma.view(-1, 1, 1, 1), shift)


class CausalConv3d(nn.Conv3d):
    """A 3-D convolution, causal in time: its input is one buffer holding kt - 1 past frames (the time cache;
    zeros before the first), then x, or SiLU(norm(x + shift)) written there by `norm`, with kh // 2
    neighbour rows above and below where bands need them. The convolution pads the frame's edges itself.
    Its bias goes in with `residual`, or with bias=False is left to the next norm (as its shift)."""

    def forward(self, x, cache, bands, norm=None, shift=None, residual=None, bias=True):
        kt, kh, kw = self.kernel_size
        past, rows = kt - 1, bands.halo_rows(kh // 2)
        padding = (0, kh // 2 - rows, kw // 2)
        B, C, T, h, W = x.shape
        padded = channels_last_empty(B, C, past + T, h + 2 * rows, W, like=x)   # [B, C, past + T, h + 2r, W]
        inside = padded[:, :, past:, rows:rows + h]
        if norm is not None:
            norm.silu_into(inside, x, shift)
        elif past or rows:
            inside.copy_(x)
        else:
            return self.finish(F.conv3d(x, self.weight, None, padding=padding), residual, bias)
        if rows:
            bands.fill_halo(padded[:, :, past:], inside, rows)
        if past:
            kept = cache.get(self)
            padded[:, :, :past] = 0 if kept is None else kept
            if kept is None:                                    # the next call's past frames (halo included),
                cache[self] = padded[:, :, -past:].clone()      # in place after the first (graphs read them)
            else:
                kept.copy_(padded[:, :, -past:])
        return self.finish(F.conv3d(padded, self.weight, None, padding=padding), residual, bias)

    def finish(self, y, residual, bias):
        return add_bias(y, self.bias, residual) if bias else y


class ResidualBlock(nn.Module):
    def __init__(self, in_dim, out_dim):
        super().__init__()
        # Wan2.1's layout, so the names match: residual.{0: norm, 2: conv, 3: norm, 6: conv}
        self.residual = nn.Sequential(RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3),
                                      RMSNorm(out_dim), nn.SiLU(), nn.Identity(),
                                      CausalConv3d(out_dim, out_dim, 3))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x, cache, bands):
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        shortcut = x if self.shortcut is None else self.shortcut(x, cache, bands)
        h = conv1(x, cache, bands, norm1, bias=False)                 # its bias goes in as norm2 reads h
        return conv2(h, cache, bands, norm2, shift=conv1.bias, residual=shortcut)


class AttentionBlock(nn.Module):
    """One head over each frame's positions; a rank gathers the frame's K/V and keeps its band's queries."""

    def __init__(self, dim):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x, cache, bands):
        B, C, T, h, W = x.shape
        qkv = F.conv3d(self.norm(x), self.to_qkv.weight[:, :, None], self.to_qkv.bias)    # [B, 3C, T, h, W]
        q, kv = qkv[:, :C], bands.gather(qkv[:, C:])                           # kv [B, 2C, T, H, W]
        per_frame = lambda t: t.permute(0, 2, 3, 4, 1).reshape(B * T, 1, -1, t.shape[1])  # [B*T, 1, pos, c]
        k, v = per_frame(kv).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(per_frame(q), k, v)                         # [B*T, 1, h*W, C]
        out = out.view(B, T, h, W, C).permute(0, 4, 1, 2, 3)
        return x + F.conv3d(out, self.proj.weight[:, :, None], self.proj.bias)


TAPS = (((1, 0, 0), (0, 1, 1), (0, 0, 0)),   # [phase a][tap before 2x: row i-1, i, i+1][conv tap]
        ((0, 0, 0), (1, 1, 0), (0, 0, 1)))


class Resample(nn.Module):
    """Up one level: 'upsample3d' doubles time (a causal time conv), then 2x nearest and a 3x3 conv
    C -> C/2."""

    def __init__(self, dim, mode):
        super().__init__()
        self.mode = mode
        self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, dim // 2, 3))   # names: resample.1
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1))

    def forward(self, x, cache, bands):
        if self.mode == "upsample3d":
            first = not cache.get(BEGUN)        # the video's first latent frame stays one frame
            head, x = (x[:, :, :1], x[:, :, 1:]) if first else (None, x)
            if x.shape[2]:
                B, C, T, h, W = x.shape                                 # channels 2t, 2t+1 -> frames 2t, 2t+1
                x = self.time_conv(x, cache, bands).permute(0, 2, 3, 4, 1).reshape(B, T, h, W, 2, C)
                x = x.permute(0, 1, 4, 2, 3, 5).reshape(B, 2 * T, h, W, C).permute(0, 4, 1, 2, 3)
            if head is not None:
                x = torch.cat([head, x], dim=2) if x.shape[2] else head
        rows = bands.halo_rows(1)
        if rows:
            x = bands.halo(x, rows)                                     # one neighbour row each side
        if (self, "phases") not in cache:                           # made once a video: the weights
            cache[self, "phases"] = self.phases()                   # do not change while it decodes
        weight, bias = cache[self, "phases"]
        y = add_bias(F.conv3d(x, weight, None, padding=(0, 1 - rows, 1)), bias)   # [B, 4 * C/2, T, h, W]
        B, C4, T, h, W = y.shape                                    # channels (a, b, c) -> (2i + a, 2j + b)
        y = y.permute(0, 2, 3, 4, 1).reshape(B, T, h, W, 2, 2, C4 // 4).permute(0, 1, 2, 4, 3, 5, 6)
        return y.reshape(B, T, 2 * h, 2 * W, C4 // 4).permute(0, 4, 1, 2, 3)

    def phases(self):
        """The 3x3 conv after 2x nearest as a 3x3 conv before it, an output channel per pixel phase (a, b):
        output row 2i + a reads rows 2i + a - 1 .. 2i + a + 1 = earlier rows i - 1 + a .. i + a (TAPS)."""
        conv = self.resample[1]
        wide = torch.promote_types(conv.weight.dtype, torch.float32)
        taps = device_constant(TAPS, wide, conv.weight.device)
        weight = torch.einsum("aiy,bjx,ocyx->abocij", taps, taps, conv.weight.to(wide)).flatten(0, 2)
        weight = weight[:, :, None].to(conv.weight.dtype).contiguous(memory_format=torch.channels_last_3d)
        return weight, conv.bias.repeat(4)                              # [4 * C/2, C, 1, 3, 3], [4 * C/2]


class Decoder3d(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config
        dims = [c.dim * u for u in (c.dim_mult[-1], *reversed(c.dim_mult))]
        self.conv1 = CausalConv3d(c.z_dim, dims[0], 3)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        upsamples = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            in_dim = in_dim // 2 if i > 0 else in_dim          # the upsampler before halved the channels
            for _ in range(c.num_res_blocks + 1):
                upsamples.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < c.levels - 1:
                upsamples.append(Resample(out_dim, "upsample3d" if c.temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*upsamples)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3))

    def forward(self, x, cache, bands):
        x = self.conv1(x, cache, bands)
        for layer in (*self.middle, *self.upsamples):
            x = layer(x, cache, bands)
        norm, _, conv = self.head
        return conv(x, cache, bands, norm)


class WanVAEDecoder(nn.Module):
    """latents [B, 16, T, h, W] (a band) -> pixels [B, 3, T', 8h, 8W] in [-1, 1], T' = 4T (4T - 3 at first).
    `cache`: one dict per video (or one restarted, `restart`): the causal convolutions' time caches, the
    upsamplers' phase weights, BEGUN."""

    def __init__(self, config=DecoderConfig()):
        super().__init__()
        self.config = config
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)        # the post-quant conv
        self.decoder = Decoder3d(config)

    @property
    def dtype(self):
        return self.conv2.weight.dtype

    def forward(self, latents, cache, bands):
        mean, std = (device_constant(values, self.dtype, latents.device).view(1, -1, 1, 1, 1)
                     for values in (self.config.latents_mean, self.config.latents_std))
        z = (latents.to(self.dtype) * std + mean).contiguous(memory_format=torch.channels_last_3d)
        pixels = self.decoder(self.conv2(z, cache, bands), cache, bands).clamp(-1, 1).contiguous()
        cache[BEGUN] = True
        return pixels


def restart(cache):
    """A used cache dict made a new video's, in place (CUDA graphs read its tensors): time caches zeroed (as
    absent ones read), phase weights combined again from the weights, BEGUN false."""
    for key, value in cache.items():
        if isinstance(key, CausalConv3d):
            value.zero_()
        elif isinstance(key, tuple):                                     # (Resample, "phases")
            for old, new in zip(value, key[0].phases()):
                old.copy_(new)
    cache[BEGUN] = False


# ----------------------------------------------------------------------------- decoding a stream

class FrameDecoder:
    """One video being decoded on this rank: decoder(a chunk's whole latents [B, 16, T, H/8, W/8]) decodes
    this rank's band, keeping the time caches, and returns the whole frames [B, 3, T', H, W]. With `graphs`
    (DecoderGraphs: one rank, GPU) the video's caches are theirs and each chunk shape replays a graph."""

    def __init__(self, vae, bands, graphs=None):
        if graphs is not None and bands.world_size > 1:
            raise ValueError("the decoder's CUDA graphs run on one rank: bands exchange rows between ranks")
        self.vae, self.bands, self.graphs = vae, bands, graphs
        self.cache = {} if graphs is None else graphs.begin(self)

    @torch.no_grad()
    def __call__(self, latents):
        first, end = self.bands.band()
        band = latents[:, :, :, first:end].to(next(self.vae.parameters()).device)
        if self.graphs is not None:
            return self.graphs(self, band)
        return self.bands.gather(self.vae(band, self.cache, self.bands), sf.VAE_STRIDE)


class DecoderGraphs:
    """One vae's decoder on one GPU as CUDA graphs, one per chunk shape, kept across videos. A shape's first
    chunk runs eagerly (cuDNN's search, Triton's compile, the caches made), then is captured on a stream
    of the graphs' own; later ones replay. The caches are one dict, restarted in place at each video,
    so every graph reads and writes the same storage, and one video at a time owns them."""

    def __init__(self, vae):
        self.vae, self.cache, self.graphs, self.owner = vae, {}, {}, None
        self.frame = None                               # [B, C, h, W] the caches were made for
        self.stream, self.done = torch.cuda.Stream(), None   # done: after the last chunk's work
        self.drop()

    def drop(self):
        """No graphs, and a fresh memory pool (a pool whose graphs are all gone cannot be captured into)."""
        self.graphs.clear()
        self.pool = torch.cuda.graph_pool_handle()

    def begin(self, owner):
        """The caches of `owner`'s new video (restarted, after the last video's chunks, on any stream)."""
        if self.done is not None:
            torch.cuda.current_stream().wait_event(self.done)
        restart(self.cache)
        self.owner = owner
        return self.cache

    def __call__(self, owner, latents):
        """owner's pixels of latents [B, 16, T, h, W] (a copy: a replay overwrites the graph's)."""
        if owner is not self.owner:
            raise RuntimeError("a FrameDecoder's CUDA graphs serve one video at a time: this decoder's video "
                               "was restarted by a newer FrameDecoder")
        B, C, T, h, W = latents.shape
        first = not self.cache[BEGUN]
        if first and self.frame != (B, C, h, W):        # another frame size: new caches, new graphs
            self.cache.clear()
            self.drop()
            self.begin(owner)
            self.frame = (B, C, h, W)
        key = (tuple(latents.shape), latents.dtype, first)
        if key in self.graphs:
            graph, static, pixels = self.graphs[key]
            static.copy_(latents)
            graph.replay()
            pixels, self.cache[BEGUN] = pixels.clone(), True
        else:
            pixels = self.vae(latents, self.cache, owner.bands)               # the shape's eager chunk
            self.cache[BEGUN] = not first                                  # as it was before that chunk
            try:
                self.graphs[key] = self.capture(latents.clone(), owner.bands)
            finally:
                self.cache[BEGUN] = True
        self.done = torch.cuda.Event()
        self.done.record()
        return pixels

    def capture(self, static, bands):
        """(graph, static input, its output) of one chunk, recorded, not run: the caches do not advance."""
        graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):          # capture_begin: unlike torch.cuda.graph, no device sync
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                static_pixels = self.vae(static, self.cache, bands)
            except BaseException:
                try:
                    graph.capture_end()               # ends the capture; its own error would hide the first
                except RuntimeError:
                    pass
                raise
            graph.capture_end()
        torch.cuda.current_stream().wait_stream(self.stream)
        return graph, static, static_pixels


@functools.lru_cache(maxsize=2)
def decoder_graphs(vae):
    """The DecoderGraphs of a vae, built at its first video and reused by every later one."""
    return DecoderGraphs(vae)


def job_graphs(run, vae, bands):
    """The vae's DecoderGraphs where the run replays graphs (GPU, not --no-graph) on one rank, else None."""
    return decoder_graphs(vae) if run.options.graphs and bands.world_size == 1 else None


def first_frame_apart(chunks):
    """The stream's chunks, the video's first latent frame handed on alone (causal: same pixels, sooner)."""
    for index, latents in enumerate(chunks):
        if index == 0 and latents.shape[2] > 1:
            yield latents[:, :, :1]
            latents = latents[:, :, 1:]
        yield latents


def decode_stream(decoder, chunks, overlap=False):
    """Yield each chunk's frames on the host, [B, 3, T', H, W], the first frame alone first. overlap (GPU):
    decode on a high-priority CUDA stream of its own while the DiT makes the next chunk."""
    chunks = first_frame_apart(chunks)
    device = next(decoder.vae.parameters()).device
    if device.type != "cuda":
        for latents in chunks:
            yield decoder(latents)
        return
    side = torch.cuda.Stream(device, priority=-1) if overlap else torch.cuda.current_stream(device)
    pending = None
    for latents in chunks:
        side.wait_stream(torch.cuda.current_stream(device))                     # the chunk is ready
        with torch.cuda.stream(side):
            latents.record_stream(side)
            pixels = decoder(latents)
            host = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
            host.copy_(pixels, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        if pending is not None:
            yield wait(pending)
        pending = (host, done)
        if not overlap:
            yield wait(pending)
            pending = None
    if pending is not None:
        yield wait(pending)


def wait(pending):
    host, done = pending
    done.synchronize()
    return host


def build_decoder(preset, dtype, device, seed, path=None):
    """A DECODER_PRESETS decoder: random weights from `seed`, or a Wan VAE file's, loaded strictly; every
    weight laid out channels last."""
    torch.manual_seed(seed)
    vae = WanVAEDecoder(DECODER_PRESETS[preset]).to(dtype)     # loaded in the dtype asked for
    if path:
        weights.load_vae_decoder(vae, path, vae.config.levels, vae.config.num_res_blocks + 1)
    vae = vae.to(device).eval()
    for conv in vae.modules():
        if isinstance(conv, (nn.Conv2d, nn.Conv3d)):
            layout = torch.channels_last if conv.weight.dim() == 4 else torch.channels_last_3d
            conv.weight.data = conv.weight.data.contiguous(memory_format=layout)
    return vae


# ----------------------------------------------------------------------------- the program

def parser():
    """06's flags, and the decoder's."""
    p = sf.parser(__doc__, output="out/frames.pt")
    p.checks.append(flag_problem)
    decoder = p.add_argument_group("the decoder")
    decoder.add_argument("--decoder", choices=sorted(DECODER_PRESETS), default=None,
                         help="the VAE decoder's shape (default: tiny for --preset tiny, else wan2.1)")
    decoder.add_argument("--vae", help="Wan2.1_VAE.pth, or a diffusers release (or its vae/ folder): the "
                                       "decoder's weights (random when absent)")
    decoder.add_argument("--decoder-dtype", choices=["bfloat16", "float32", "float64"], default=None,
                         help="default bfloat16 on GPU, float32 on CPU")
    decoder.add_argument("--video", help="also write the frames as they come to this mp4 (optional packages)")
    decoder.add_argument("--overlap", action="store_true",
                         help="GPU: decode each chunk on a CUDA stream of its own, beside the DiT's next "
                              "chunk")
    return p


def flag_problem(args):
    video, world_size = sf.video_spec(args), int(os.environ.get("WORLD_SIZE", "1"))
    rows = video.latent_height
    if rows < world_size:
        return (f"the decoder splits frames into bands of rows: --height {8 * rows} (latent rows {rows}) "
                f"cannot feed {world_size} ranks (a height of at least {8 * world_size} pixels can)")
    if args.video and not args.video.lower().endswith(".mp4"):
        return f"--video {args.video}: give a file name ending in .mp4 (a fragmented H.264 MP4 is written)"
    pixel_bytes = 1 + sf.chosen_dtype(args.decoder_dtype).itemsize
    return sf.output_problem(args, 4 * 3 * video.height * video.width * pixel_bytes / 2**30)  # then 8-bit


def decoder_preset(args):
    return args.decoder or ("tiny" if args.preset == "tiny" else "wan2.1")


def build_job_decoder(run, dtype=None):
    """The decoder the flags ask for (--decoder-dtype, or `dtype`). On GPU cuDNN times its algorithms for
    each convolution shape first: the decoder's shapes repeat every chunk."""
    a = run.args
    torch.backends.cudnn.benchmark = run.device.type == "cuda"
    return build_decoder(decoder_preset(a), dtype or sf.chosen_dtype(a.decoder_dtype, run.device), run.device,
                         a.seed, a.vae)


def time_frames(run, model, prompts, vae, overlap, video, writer=None, keep=True, report=None):
    """(frames, host seconds to each hand-out, to the end) of a video as a viewer gets them; closes writer."""
    bands = RowBands.for_job(video.latent_height, run.mesh)
    graphs = job_graphs(run, vae, bands)
    clock, frames, marks = Clock(run.device), [], []
    chunks = sf.stream(model, prompts, video, run.mesh, run.args.seed, run.options)
    for pixels in decode_stream(FrameDecoder(vae, bands, graphs), chunks, overlap):
        marks.append(clock.host_seconds())
        if writer:
            writer.write(pixels[0])
        if run.args.video:            # a failed mp4 (a full disk) stops every rank now, not at the end
            sf.agree(run, writer and writer.error and writer.failure())
        if keep or len(frames) < 2:
            frames.append(pixels)
        if report:
            report.add(pixels.shape[2], marks[-1])
    if writer:
        writer.problem = writer.close()
    return frames, marks, clock.host_seconds()


def main(argv=None):
    """The frames as they are made (after an untimed warm-up on GPU), timed, saved on rank 0."""
    run = sf.set_up(parser().parse_args(argv), "07_vae_decoder")
    a, video, mesh = run.args, run.video, run.mesh
    model, prompts, vae = sf.read_inputs(run, lambda: build_job_decoder(run), outputs=("output", "video"))
    overlap, keep = run.device.type == "cuda" and a.overlap, sf.kept(a)
    warm = sf.warm_up(run, lambda: time_frames(run, model, prompts, vae, overlap, sf.warm_up_video(video),
                                               keep=False))
    if run.show:
        print(f"{run.name}: {run.describe()}, decoder {decoder_preset(a)} ({vae.dtype}"
              f"{', overlapped on its own CUDA stream' if overlap else ''})", flush=True)
    writer = extras.VideoWriter(a.video) if a.video and run.show else None
    report = MinuteReport(16, run.device, run.show)
    frames, marks, total = time_frames(run, model, prompts, vae, overlap, video, writer, keep, report)
    pixels = torch.cat(frames, dim=2)                                          # [B, 3, T, H, W]
    sf.save_on_rank_zero(run, lambda: {"frames": extras.to_uint8(pixels[0]), "fps": 16, "seed": a.seed,
                                       "preset": a.preset}, writer and writer.problem)
    T, (H, W) = video.video_frames, pixels.shape[3:]
    if run.show:
        if warm is not None:
            print(sf.cold_start(warm, "first decoded frame", video))
        print(f"  first decoded frame {marks[0] * 1e3:.1f} ms after the call, the first chunk's "
              f"{frames[0].shape[2] + frames[1].shape[2]} frames {marks[1] * 1e3:.1f} ms; all {T} frames in "
              f"{total:.3f} s -> {T / total:.1f} FPS"
              f"{f', decoded frames [{T}, {H}, {W}, 3] saved to {a.output}' if keep else ''}"
              f"{f', mp4 {a.video}' if writer else ''}")
        switch_line = sf.switch_cost(marks[1:], prompts, video)
        if switch_line:
            print(switch_line)
    if a.preset == "tiny" and keep:    # cheap here: decoding the whole video at once gives the same frames
        latents = sf.generate(model, prompts, video, mesh, a.seed, run.options)
        whole = FrameDecoder(vae, RowBands.for_job(video.latent_height, mesh))(latents).cpu()
        error = check("streamed vs whole decode", pixels, whole, sf.tolerance(vae.dtype))
        if run.show:
            print(f"  streamed chunk by chunk vs the whole video decoded at once: max error {error:.1e}")
    sf.compare_with_one_process(run, lambda one: one_process_frames(run, model, prompts, vae, one),
                                pixels[:, :, :4 * sf.CHUNK_FRAMES - 3], "frames")
    sf.finish(a.graph_timeout)


def one_process_frames(run, model, prompts, vae, mesh):
    latents = sf.generate(model, prompts, sf.first_chunk_video(run.video), mesh, run.args.seed, run.options)
    return FrameDecoder(vae, RowBands(run.video.latent_height))(latents).cpu()


if __name__ == "__main__":
    run_main(main)

