"""An independent, dense reference of Self-Forcing inference, for the tests.

Written from the algorithm and from Wan2.1's model definition, not from the pipeline's code: one process,
float64, no KV cache, no sharding, no RoPE table (angles come from positions). It reads the weights by their
checkpoint names.

For every chunk and every denoising step, the whole DiT runs over every frame generated so far: the clean
latents of the earlier chunks at timestep 0, then the current chunk at timestep t, and the current chunk's
flow is read off the end. The cached K/V of the pipeline are the K/V of those earlier rows, so the pipeline
must equal this up to rounding.

Streams (latent frames; chunk C = 3; chunk k covers [s, e), s = kC, e = s + C; window W, None = unbounded;
sink S, a multiple of C, with W - S >= C when W is set):
1. A chunk's prompt is the last (frame, text) schedule entry with frame <= s; a switch happens before chunk
   s > 0 when that index differs from the previous chunk's.
2. Visibility: a query in the chunk ending at e sees key frame g iff g < e and (W is None or g < S or
   g >= e - (W - S)).
3. Positions: a query frame f is rotated at time f. A key frame g seen from the chunk ending at e is rotated
   at g + max(0, e - W) when W is set and g < S (the sink sits just before the window), else at g. So
   self-attention runs per query chunk, each with its own key rotation.
4. Records: each generated frame keeps the prompt and the visible set its K/V were last computed under
   (generation: the chunk's prompt and rule 2 for its own e). In the dense pass an earlier frame is a row at
   timestep 0 that cross-attends its record's prompt, uses its record's visible set as its mask row and
   rule 3 with its own chunk's end.
5. Re-cache at a switch before chunk s (new prompt p', e = s + C): the chunks j < s/C with a frame in
   [max(S, e - (W - S)), s) (W None: [S, s)), plus the sink chunks when rebuild_sink. In ascending j each
   of their frames gets prompt p' and visible set rule 2 (for e_j) intersected with [0, S) and the frames of
   re-cached chunks <= j. Kept sink frames keep their records.
6. Noise: one generator seeded with `seed`, per chunk the starting noise then one draw per re-noising step;
   a re-cache draws none.
"""
import math

import torch

# Self-Forcing's denoising list, as literals: [1000, 750, 500, 250] warped by the shift-5 schedule
# sigma' = 5 sigma / (1 + 4 sigma), i.e. 1000, 937.5, 833.33.., 625 (pipeline/causal_inference.py upstream)
TIMESTEPS = (1000.0, 937.5, 2500.0 / 3.0, 625.0)
CHUNK_FRAMES = 3

# Rule 3's sink shift. Only tests turn it off, to show that the shift moves the output.
SHIFT_SINK_POSITIONS = True


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
    """Wan's 3D RoPE as complex multiplication: x [B, F*height*width, H, D]. `frames` is the frame count F
    (time positions 0..F-1) or a tensor [F] of each frame's time position."""
    time_positions = torch.arange(frames) if isinstance(frames, int) else frames
    frames = len(time_positions)
    d = x.shape[-1]
    c = d // 2
    parts = [c - 2 * (c // 3), c // 3, c // 3]                       # complex pairs for time, height, width

    def axis(positions, pairs):
        freqs = 1.0 / theta ** (torch.arange(0, 2 * pairs, 2, dtype=torch.float64) / (2 * pairs))
        return torch.polar(torch.ones(len(positions), pairs, dtype=torch.float64),
                           torch.outer(positions.double(), freqs))

    t, h, w = axis(time_positions, parts[0]), axis(torch.arange(height), parts[1]), axis(torch.arange(width), parts[2])
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


def text_context(sd, config, text):
    """umT5 features [B, L, text_dim], L <= text_len -> the context [B, text_len, dim], zero-padded first."""
    B = text.shape[0]
    padded = torch.cat([text, text.new_zeros(B, config["text_len"] - text.shape[1], text.shape[2])], dim=1)
    return linear(gelu_tanh(linear(padded, sd, "text_embedding.0")), sd, "text_embedding.2")


def transformer(sd, config, latents, frame_timesteps, contexts, prompt_of_frame, self_attention):
    """Wan2.1 with per-frame timesteps over latents [B, 16, F, H, W]; frame_timesteps [B, F]; contexts: one
    [B, text_len, dim] per prompt, frame f cross-attends contexts[prompt_of_frame[f]];
    self_attention(q, k, v, h, w) -> [B, N, dim] with q/k/v [B, N, heads, head_dim] before RoPE.
    Returns the flow [B, 16, F, H, W]."""
    dim, heads = config["dim"], config["num_heads"]
    B, _, F, H, W = latents.shape
    x = torch.nn.functional.conv3d(latents, sd["patch_embedding.weight"], sd["patch_embedding.bias"],
                                   stride=(1, 2, 2))                 # [B, dim, F, h, w]
    h, w = x.shape[3], x.shape[4]
    x = x.flatten(2).transpose(1, 2)                                 # [B, F*h*w, dim], tokens (f, row, col)
    frame_of_token = torch.arange(F * h * w) // (h * w)
    prompt_of_token = torch.as_tensor(prompt_of_frame)[frame_of_token]  # [N]

    half = config["freq_dim"] // 2
    angle = frame_timesteps.reshape(-1, 1).double() * 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    sinusoid = torch.cat([torch.cos(angle), torch.sin(angle)], dim=1)
    e = linear(silu(linear(sinusoid, sd, "time_embedding.0")), sd, "time_embedding.2")     # [B*F, dim]
    e6 = linear(silu(e), sd, "time_projection.1").reshape(B, F, 6, dim)[:, frame_of_token]  # per token
    e = e.reshape(B, F, dim)[:, frame_of_token]
    split = lambda t: t.reshape(B, t.shape[1], heads, dim // heads)

    for i in range(config["num_layers"]):
        p = f"blocks.{i}"
        m = sd[f"{p}.modulation"][0] + e6                           # [B, N, 6, dim]
        shift1, scale1, gate1, shift2, scale2, gate2 = m.unbind(2)
        y = layer_norm(x) * (1 + scale1) + shift1
        q = split(rms_norm(linear(y, sd, f"{p}.self_attn.q"), sd[f"{p}.self_attn.norm_q.weight"]))
        k = split(rms_norm(linear(y, sd, f"{p}.self_attn.k"), sd[f"{p}.self_attn.norm_k.weight"]))
        v = split(linear(y, sd, f"{p}.self_attn.v"))
        x = x + linear(self_attention(q, k, v, h, w), sd, f"{p}.self_attn.o") * gate1
        y = layer_norm(x, sd[f"{p}.norm3.weight"], sd[f"{p}.norm3.bias"])
        q = split(rms_norm(linear(y, sd, f"{p}.cross_attn.q"), sd[f"{p}.cross_attn.norm_q.weight"]))
        cross = None                                                 # [B, N, dim], each row from its prompt
        for index, context in enumerate(contexts):
            k = split(rms_norm(linear(context, sd, f"{p}.cross_attn.k"), sd[f"{p}.cross_attn.norm_k.weight"]))
            v = split(linear(context, sd, f"{p}.cross_attn.v"))
            y = attend(q, k, v)
            cross = y if cross is None else torch.where((prompt_of_token == index)[:, None], y, cross)
        x = x + linear(cross, sd, f"{p}.cross_attn.o")
        y = layer_norm(x) * (1 + scale2) + shift2
        x = x + linear(gelu_tanh(linear(y, sd, f"{p}.ffn.0")), sd, f"{p}.ffn.2") * gate2

    shift, scale = (sd["head.modulation"][0] + e[:, :, None]).unbind(2)
    out = linear(layer_norm(x) * (1 + scale) + shift, sd, "head.head")  # [B, N, 1*2*2*16]
    out = out.reshape(B, F, h, w, 1, 2, 2, -1)
    return torch.einsum("bfhwpqrc->bcfphqwr", out).reshape(B, -1, F, 2 * h, 2 * w)


def dit(sd, config, latents, frame_timesteps, text, window_frames=None):
    """One prompt, no sink: a block-causal (windowed when asked) mask, every frame at its own position.
    latents [B, 16, F, H, W], frame_timesteps [B, F], text [B, L, text_dim] -> flow [B, 16, F, H, W]."""
    F = latents.shape[2]

    def self_attention(q, k, v, h, w):
        return attend(rope(q, F, h, w), rope(k, F, h, w), v, block_causal(F, h * w, window_frames))

    return transformer(sd, config, latents, frame_timesteps, [text_context(sd, config, text)], [0] * F,
                       self_attention)


# ---- streams: sink, positions, records and re-caching (rules 2, 3, 5 of the module docstring)

def chunk_end(frame):
    return (frame // CHUNK_FRAMES + 1) * CHUNK_FRAMES


def visible_frames(end, window_frames, sink_frames):
    """Rule 2: the key frames a query in the chunk ending at `end` sees."""
    return frozenset(g for g in range(end) if window_frames is None or g < sink_frames
                     or g >= end - (window_frames - sink_frames))


def key_positions(frames, end, window_frames, sink_frames):
    """Rule 3: time positions [frames] of every key frame as seen from the chunk ending at `end`."""
    shift = max(0, end - window_frames) if window_frames is not None and SHIFT_SINK_POSITIONS else 0
    return torch.tensor([g + shift if g < sink_frames else g for g in range(frames)])


def dit_stream(sd, config, latents, frame_timesteps, contexts, records, window_frames, sink_frames):
    """latents [B, 16, F, H, W] of frames 0..F-1 (F a multiple of C); records: per frame (prompt index,
    frozenset of visible key frames). Self-attention runs per query chunk: queries at their own positions,
    keys at rule 3's positions for that chunk, mask rows from the records (computed for all rows under each
    chunk's key rotation and kept on that chunk's rows, a dense reference's luxury). -> flow [B, 16, F, H, W]."""
    F = latents.shape[2]
    seen = torch.tensor([[g in sees for g in range(F)] for _, sees in records])    # [F, F] frame mask

    def self_attention(q, k, v, h, w):
        n = h * w                                                    # tokens per frame
        q = rope(q, torch.arange(F), h, w)
        mask = seen.repeat_interleave(n, 0).repeat_interleave(n, 1)  # [N, N]
        query_end = torch.tensor([chunk_end(f) for f in range(F)]).repeat_interleave(n)    # [N]
        out = None
        for end in range(CHUNK_FRAMES, F + 1, CHUNK_FRAMES):         # every query chunk's key rotation
            keys = rope(k, key_positions(F, end, window_frames, sink_frames), h, w)
            y = attend(q, keys, v, mask)                             # [B, N, dim], kept on its chunk's rows
            out = y if out is None else torch.where((query_end == end)[:, None], y, out)
        return out

    return transformer(sd, config, latents, frame_timesteps, contexts, [p for p, _ in records], self_attention)


def prompt_of_chunk(schedule_frames, start):
    """Rule 1: the index of the last schedule entry whose frame is <= the chunk's first frame."""
    return max(i for i, frame in enumerate(schedule_frames) if frame <= start)


def recached_chunks(start, window_frames, sink_frames, rebuild_sink):
    """Rule 5: the chunks re-cached at a switch before the chunk starting at `start`, ascending."""
    end = start + CHUNK_FRAMES
    low = sink_frames if window_frames is None else max(sink_frames, end - (window_frames - sink_frames))
    chunks = {f // CHUNK_FRAMES for f in range(low, start)}
    if rebuild_sink:                                   # the sink's chunks made so far
        chunks |= set(range(min(sink_frames, start) // CHUNK_FRAMES))
    return sorted(chunks)


def recache(records, start, prompt, window_frames, sink_frames, rebuild_sink):
    """Rule 5, applied to the records (a list, one per frame before `start`) in place."""
    chunks = recached_chunks(start, window_frames, sink_frames, rebuild_sink)
    for j in chunks:
        allowed = set(range(sink_frames))
        allowed |= {f for i in chunks if i <= j for f in range(i * CHUNK_FRAMES, (i + 1) * CHUNK_FRAMES)}
        sees = visible_frames((j + 1) * CHUNK_FRAMES, window_frames, sink_frames) & allowed
        for f in range(j * CHUNK_FRAMES, (j + 1) * CHUNK_FRAMES):
            records[f] = (prompt, frozenset(sees))


def check_stream(window_frames, sink_frames, prompts):
    if sink_frames < 0 or sink_frames % CHUNK_FRAMES:
        raise ValueError(f"sink_frames {sink_frames}: a multiple of {CHUNK_FRAMES}, >= 0")
    if window_frames is not None and window_frames - sink_frames < CHUNK_FRAMES:
        raise ValueError(f"window_frames {window_frames} leaves under one chunk beside {sink_frames} sink frames")
    frames = [frame for frame, _ in prompts]
    if not frames or frames[0] != 0 or any(a >= b for a, b in zip(frames, frames[1:])):
        raise ValueError(f"prompt frames {frames}: strictly increasing from 0")


def generate(sd, config, text, frames, lat_h, lat_w, seed, window_frames=None, *, sink_frames=0, prompts=None,
             rebuild_sink=False):
    """Self-Forcing inference, dense, with a sink, long-stream positions and prompt switches (the module
    docstring's rules). text [B, L, text_dim]; prompts, when given, a list of (frame, text) replacing it.
    Returns the clean latents [B, 16, frames rounded up to chunks, lat_h, lat_w]."""
    prompts = [(0, text)] if prompts is None else prompts
    check_stream(window_frames, sink_frames, prompts)
    contexts = [text_context(sd, config, t) for _, t in prompts]   # each [B, text_len, dim]
    schedule_frames = [frame for frame, _ in prompts]
    gen = torch.Generator().manual_seed(seed)
    B = prompts[0][1].shape[0]
    clean = torch.zeros(B, 16, 0, lat_h, lat_w, dtype=torch.float64)
    records = []                                                     # per generated frame (prompt, sees)
    for start in range(0, frames, CHUNK_FRAMES):
        prompt = prompt_of_chunk(schedule_frames, start)
        if start > 0 and prompt != prompt_of_chunk(schedule_frames, start - CHUNK_FRAMES):
            recache(records, start, prompt, window_frames, sink_frames, rebuild_sink)
        end = start + CHUNK_FRAMES
        chunk_records = [(prompt, visible_frames(end, window_frames, sink_frames))] * CHUNK_FRAMES
        flow_of = lambda prefix, frame_t: dit_stream(sd, config, prefix, frame_t, contexts,
                                                     records + chunk_records, window_frames, sink_frames)
        clean = torch.cat([clean, denoise(gen, clean, flow_of)], dim=2)
        records += chunk_records
    return clean


def generate_block_causal(sd, config, text, frames, lat_h, lat_w, seed, window_frames=None):
    """The one-prompt, sink-free Self-Forcing with one block-causal mask over the whole prefix: the
    reference before streams, kept as a check that generate() with S = 0 and one prompt is unchanged."""
    gen = torch.Generator().manual_seed(seed)
    B = text.shape[0]
    clean = torch.zeros(B, 16, 0, lat_h, lat_w, dtype=torch.float64)
    for _ in range(0, frames, CHUNK_FRAMES):
        flow_of = lambda prefix, frame_t: dit(sd, config, prefix, frame_t, text, window_frames)
        clean = torch.cat([clean, denoise(gen, clean, flow_of)], dim=2)
    return clean


def denoise(gen, clean, flow_of):
    """The 4 steps of the chunk after the clean latents `clean` [B, 16, start, h, w]: its starting noise,
    then one draw per re-noising. flow_of(prefix, frame timesteps [B, F]) is the DiT's flow of the whole
    prefix. Returns the chunk's x0 [B, 16, CHUNK_FRAMES, h, w]."""
    B, _, start, lat_h, lat_w = clean.shape
    x = torch.randn(B, 16, CHUNK_FRAMES, lat_h, lat_w, generator=gen).double()
    for i, t in enumerate(TIMESTEPS):
        prefix = torch.cat([clean, x], dim=2)                       # [B, 16, start + 3, lat_h, lat_w]
        frame_t = torch.tensor([[0.0] * start + [t] * CHUNK_FRAMES] * B, dtype=torch.float64)
        x0 = x - t / 1000.0 * flow_of(prefix, frame_t)[:, :, start:]   # the model predicts the flow
        if i + 1 < len(TIMESTEPS):
            next_sigma = TIMESTEPS[i + 1] / 1000.0
            noise = torch.randn(B, 16, CHUNK_FRAMES, lat_h, lat_w, generator=gen).double()
            x = (1 - next_sigma) * x0 + next_sigma * noise
    return x0
