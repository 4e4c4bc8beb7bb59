"""An independent, dense reference of Self-Forcing inference, for the tests.

Written from the algorithm and from Wan2.1's model definition, not from the pipeline's code: one process,
float64, no KV cache, no sharding, no RoPE table. It reads the weights by their checkpoint names.

For every chunk and every denoising step, the whole DiT runs over the visible prefix of the video:
the clean latents of the earlier chunks at timestep 0, then the current chunk at timestep t. It uses a
block-causal mask, windowed when asked, and the current chunk's flow is read off the end. The cached K/V
of the pipeline are exactly the K/V of that prefix at t = 0, so the pipeline must equal this up to
rounding.
"""
import math

import torch

# Self-Forcing's denoising list, as literals: [1000, 750, 500, 250] warped by the shift-5 schedule
# sigma' = 5 sigma / (1 + 4 sigma), i.e. 1000, 937.5, 833.33.., 625 (pipeline/causal_inference.py upstream)
TIMESTEPS = (1000.0, 937.5, 2500.0 / 3.0, 625.0)
CHUNK_FRAMES = 3


def linear(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def layer_norm(x, weight=None, bias=None, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    return y if weight is None else y * weight + bias


def rms_norm(x, weight, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def silu(x):
    return x / (1 + torch.exp(-x))


def attend(q, k, v, mask=None):
    """q [B, Nq, H, D], k/v [B, Nk, H, D] -> [B, Nq, H*D]; mask [Nq, Nk] (True = may attend)."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", weights, v).flatten(2)


def rope(x, frames, height, width, theta=10000.0):
    """Wan's 3D RoPE as complex multiplication: x [B, frames*height*width, H, D], frames from global frame 0."""
    d = x.shape[-1]
    c = d // 2
    parts = [c - 2 * (c // 3), c // 3, c // 3]                       # complex pairs for time, height, width

    def axis(positions, pairs):
        freqs = 1.0 / theta ** (torch.arange(0, 2 * pairs, 2, dtype=torch.float64) / (2 * pairs))
        return torch.polar(torch.ones(len(positions), pairs, dtype=torch.float64),
                           torch.outer(positions.double(), freqs))

    t, h, w = axis(torch.arange(frames), parts[0]), axis(torch.arange(height), parts[1]), axis(torch.arange(width), parts[2])
    rotation = torch.cat([t[:, None, None].expand(frames, height, width, -1),
                          h[None, :, None].expand(frames, height, width, -1),
                          w[None, None, :].expand(frames, height, width, -1)], dim=-1).reshape(-1, 1, c)
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], c, 2).contiguous())
    return torch.view_as_real(z * rotation).flatten(-2)


def block_causal(frames, tokens_per_frame, window_frames=None):
    """Query frame i may see key frame j iff j's chunk is not after i's and j is in the window ending with
    i's chunk."""
    frame = torch.arange(frames * tokens_per_frame) // tokens_per_frame
    chunk_end = (frame // CHUNK_FRAMES + 1) * CHUNK_FRAMES
    visible = frame[None, :] < chunk_end[:, None]
    if window_frames is not None:
        visible &= frame[None, :] >= chunk_end[:, None] - window_frames
    return visible


def dit(sd, config, latents, frame_timesteps, text, window_frames=None):
    """Wan2.1 with per-frame timesteps over latents [B, 16, F, H, W]; frame_timesteps [B, F]; text
    [B, L, text_dim]. Returns the flow [B, 16, F, H, W]."""
    dim, heads = config["dim"], config["num_heads"]
    B, _, F, H, W = latents.shape
    x = torch.nn.functional.conv3d(latents, sd["patch_embedding.weight"], sd["patch_embedding.bias"],
                                   stride=(1, 2, 2))                 # [B, dim, F, h, w]
    h, w = x.shape[3], x.shape[4]
    x = x.flatten(2).transpose(1, 2)                                 # [B, F*h*w, dim], tokens (f, row, col)
    frame_of_token = torch.arange(F * h * w) // (h * w)

    half = config["freq_dim"] // 2
    angle = frame_timesteps.reshape(-1, 1).double() * 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    sinusoid = torch.cat([torch.cos(angle), torch.sin(angle)], dim=1)
    e = linear(silu(linear(sinusoid, sd, "time_embedding.0")), sd, "time_embedding.2")     # [B*F, dim]
    e6 = linear(silu(e), sd, "time_projection.1").reshape(B, F, 6, dim)[:, frame_of_token]  # per token
    e = e.reshape(B, F, dim)[:, frame_of_token]

    padded = torch.cat([text, text.new_zeros(B, config["text_len"] - text.shape[1], text.shape[2])], dim=1)
    context = linear(gelu_tanh(linear(padded, sd, "text_embedding.0")), sd, "text_embedding.2")
    mask = block_causal(F, h * w, window_frames)
    split = lambda t: t.reshape(B, t.shape[1], heads, dim // heads)

    for i in range(config["num_layers"]):
        p = f"blocks.{i}"
        m = sd[f"{p}.modulation"][0] + e6                           # [B, N, 6, dim]
        shift1, scale1, gate1, shift2, scale2, gate2 = m.unbind(2)
        y = layer_norm(x) * (1 + scale1) + shift1
        q = split(rms_norm(linear(y, sd, f"{p}.self_attn.q"), sd[f"{p}.self_attn.norm_q.weight"]))
        k = split(rms_norm(linear(y, sd, f"{p}.self_attn.k"), sd[f"{p}.self_attn.norm_k.weight"]))
        v = split(linear(y, sd, f"{p}.self_attn.v"))
        y = attend(rope(q, F, h, w), rope(k, F, h, w), v, mask)
        x = x + linear(y, sd, f"{p}.self_attn.o") * gate1
        y = layer_norm(x, sd[f"{p}.norm3.weight"], sd[f"{p}.norm3.bias"])
        q = split(rms_norm(linear(y, sd, f"{p}.cross_attn.q"), sd[f"{p}.cross_attn.norm_q.weight"]))
        k = split(rms_norm(linear(context, sd, f"{p}.cross_attn.k"), sd[f"{p}.cross_attn.norm_k.weight"]))
        v = split(linear(context, sd, f"{p}.cross_attn.v"))
        x = x + linear(attend(q, k, v), sd, f"{p}.cross_attn.o")
        y = layer_norm(x) * (1 + scale2) + shift2
        x = x + linear(gelu_tanh(linear(y, sd, f"{p}.ffn.0")), sd, f"{p}.ffn.2") * gate2

    shift, scale = (sd["head.modulation"][0] + e[:, :, None]).unbind(2)
    out = linear(layer_norm(x) * (1 + scale) + shift, sd, "head.head")  # [B, N, 1*2*2*16]
    out = out.reshape(B, F, h, w, 1, 2, 2, -1)
    return torch.einsum("bfhwpqrc->bcfphqwr", out).reshape(B, -1, F, 2 * h, 2 * w)


def generate(sd, config, text, frames, lat_h, lat_w, seed, window_frames=None):
    """Self-Forcing inference, dense. Noise: one generator seeded with `seed`, drawn chunk by chunk as the
    pipeline documents (the chunk's starting noise, then one draw per re-noising step)."""
    gen = torch.Generator().manual_seed(seed)
    B = text.shape[0]
    clean = torch.zeros(B, 16, 0, lat_h, lat_w, dtype=torch.float64)
    for start in range(0, frames, CHUNK_FRAMES):
        x = torch.randn(B, 16, CHUNK_FRAMES, lat_h, lat_w, generator=gen).double()
        for i, t in enumerate(TIMESTEPS):
            prefix = torch.cat([clean, x], dim=2)
            frame_t = torch.tensor([[0.0] * start + [t] * CHUNK_FRAMES] * B, dtype=torch.float64)
            flow = dit(sd, config, prefix, frame_t, text, window_frames)[:, :, start:]
            sigma = t / 1000.0
            x0 = x - sigma * flow                                     # the model predicts the flow
            if i + 1 < len(TIMESTEPS):
                next_sigma = TIMESTEPS[i + 1] / 1000.0
                noise = torch.randn(B, 16, CHUNK_FRAMES, lat_h, lat_w, generator=gen).double()
                x = (1 - next_sigma) * x0 + next_sigma * noise
        clean = torch.cat([clean, x0], dim=2)
    return clean
