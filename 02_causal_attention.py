"""Stage 02 -- block-causal attention for chunk-by-chunk video generation, with a KV cache.

The idea
    Self-Forcing generates a video a chunk of F latent frames at a time. Inside one chunk every token
    sees every other token of the chunk; across chunks attention is causal: a chunk sees all earlier
    chunks. Written as one pass over the whole video this is a block-causal mask. Generated chunk by
    chunk, the earlier chunks' keys/values come from a KV cache that the loop appends to, and the
    chunk's queries attend to [cache, own chunk] with no mask at all.

    Positions are global: a chunk starting at frame s is rotated with start_frame = s (stage 01), and the
    cache stores keys already rotated at their absolute positions.

    Long videos use a local window and sink frames. Exactly: a chunk ending at frame e sees key frame g
    iff g < e and (g < sink_frames or g >= e - (window_frames - sink_frames)): the video's first
    `sink_frames` frames, then the latest frames, its own chunk included, `window_frames` in all
    (LongLive's local_attn_size 12 with sink_size 3 is window 12, sink 3: the sink and the latest 9
    frames). Without a sink this is Self-Forcing's local_attn_size; without a window a chunk sees every
    earlier frame. The sink is whole chunks (a prompt switch re-runs chunks, stage 06). The time index
    keeps growing; the sink's keys move to sit just before the window (`sink_shift` frames, see stage 01),
    so no distance a chunk sees grows with the video. The cache holds at most `window_frames` frames
    however long the stream runs: block_causal_mask shows the rule over a whole video, KVCache keeps it
    bounded chunk by chunk (the sink at the front of its storage, the window after it).

Shapes
    q, k, v in the model:       [batch, tokens, heads, head_dim]
    attention() operands:        [batch, heads, tokens, head_dim]  (what scaled_dot_product_attention takes)
    KVCache.kv:                  [capacity, 2, batch, heads, head_dim]  token-major: a chunk (or any token
                                 range) is one contiguous block, and heads_major() views it as attention
                                 operands without a copy (flash attention's native memory layout)
    block_causal_mask:           [tokens, tokens] bool, True = may attend

Uses
    01_rope: causal_rope, rotate_time, head_dim_flag

Run
    python 02_causal_attention.py   the chunked run with the KV cache (no window; a window; a window with
                                    sink frames) equals one full pass with the block-causal mask
    torchrun --nproc_per_node=2 02_causal_attention.py   every rank checks, rank 0 prints
"""
import importlib

import torch
import torch.nn.functional as F

from support.harness import check, is_rank_zero, non_negative, Parser, positive, run_main

rope = importlib.import_module("01_rope")


def attention(q, k, v, mask=None):
    """Plain softmax attention, written from the formula (the reference). q [B,H,Nq,D], k/v [B,H,Nk,D],
    mask [Nq, Nk] bool (True = attend)."""
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def fast_attention(q, k, v):
    """Unmasked attention through PyTorch's fused kernels (flash / cuDNN / memory-efficient on GPU)."""
    return F.scaled_dot_product_attention(q, k, v)


def spell_setting(name, value):
    """How a library message names a setting: `window_frames=2` (a command line spells its flag instead)."""
    return f"{name}={value}"


def window_problem(window_frames, chunk_frames, sink_frames=0, spell=spell_setting):
    """What is wrong with a window and sink (a message), or None. `spell(name, value)` names a setting (a
    command line spells it as its flag)."""
    if sink_frames < 0 or sink_frames % chunk_frames:
        return (f"{spell('sink_frames', sink_frames)} must be whole chunks: a multiple of "
                f"{spell('chunk_frames', chunk_frames)}")
    if window_frames is not None and window_frames < sink_frames + chunk_frames:
        return (f"{spell('window_frames', window_frames)} must be >= {spell('sink_frames', sink_frames)} + "
                f"{spell('chunk_frames', chunk_frames)}: a chunk sees the sink and at least itself")
    return None


def check_window(window_frames, chunk_frames, sink_frames=0):
    problem = window_problem(window_frames, chunk_frames, sink_frames)
    if problem:
        raise ValueError(problem)


def sink_shift(chunk_end, window, sink):
    """How far the sink's keys move for a chunk ending at `chunk_end` (frames, or tokens with window and
    sink in tokens): to sit just before the window's first frame, chunk_end - (window - sink)."""
    return max(0, chunk_end - window) if sink and window is not None else 0


def block_causal_mask(num_frames, tokens_per_frame, chunk_frames, window_frames=None, sink_frames=0):
    """[N, N] bool: query token i may attend key token j iff j's chunk is not after i's chunk, and (with a
    window) j is a sink frame or lies in the latest window_frames - sink_frames frames ending with i's
    chunk."""
    check_window(window_frames, chunk_frames, sink_frames)
    token_frame = torch.arange(num_frames * tokens_per_frame) // tokens_per_frame
    chunk_end_frame = (token_frame // chunk_frames + 1) * chunk_frames   # frame after the query's chunk
    query_end, key_frame = chunk_end_frame[:, None], token_frame[None, :]
    mask = key_frame < query_end
    if window_frames is not None:
        mask &= (key_frame < sink_frames) | (key_frame >= query_end - (window_frames - sink_frames))
    return mask


def held_by_window(ranges, kept_from, sink_end=0):
    """How many tokens of the global (first, end) ranges are visible: before `sink_end` or at or after
    `kept_from`."""
    return sum(max(0, min(end, sink_end) - first) + max(0, end - max(first, kept_from, sink_end))
               for first, end in ranges)


def heads_major(x):
    """[tokens, B, H, D] -> [B, H, tokens, D], a view (attention operands from token-major storage)."""
    return x.permute(1, 2, 0, 3)


class KVCache:
    """Keys/values of the chunks written so far, for one attention layer on one rank.

    Stored token-major, kv [capacity, 2, batch, heads, head_dim]; `kv[:length]` is the cached keys (kv[:, 0])
    and values (kv[:, 1]), in frame order: the sink first, then the window. Bookkeeping is in Python ints
    (no device syncs). Every rank records the same global token ranges of the committed chunks (`chunks`),
    so the length any rank holds can be computed anywhere (stage 03's ring needs its peers' lengths); `held`
    says which part of each chunk this rank stores (all of it here, a sequence shard under ring attention).

    One pass over a chunk: `reserve` evicts what the window no longer shows and moves the sink's keys
    (`make_room`), and hands out the slots after the cached tokens; the caller writes the chunk's k/v there
    and attends over the returned view. Only `commit(chunk)` makes the chunk part of the cache; an
    uncommitted pass (a denoising step) leaves it as it was. The storage is allocated once, at full
    capacity, and never moves (stage 06 replays CUDA graphs that read it); `reset` empties it for the next
    video and `rewind` keeps only the sink (a prompt switch re-runs the window's chunks, stage 06).
    """

    def __init__(self, capacity_tokens, window_tokens=None, sink_tokens=0, tokens_per_frame=1):
        self.capacity, self.window_tokens, self.sink_tokens = capacity_tokens, window_tokens, sink_tokens
        self.tokens_per_frame = tokens_per_frame
        self.kv = None                  # allocated at the first reserve, with the caller's shape/dtype/device
        self.reset()

    @classmethod
    def for_video(cls, frames, tokens_per_frame, window_frames=None, sink_frames=0):
        """A cache for a video of `frames` frames: room for all of them, or for what the window shows."""
        window_tokens = None if window_frames is None else window_frames * tokens_per_frame
        capacity = frames * tokens_per_frame if window_tokens is None else min(window_tokens, frames * tokens_per_frame)
        return cls(capacity, window_tokens, sink_frames * tokens_per_frame, tokens_per_frame)

    def reset(self):
        """Forget every chunk (the next video starts empty); the storage stays where it is."""
        self.length = 0                 # tokens this rank holds
        self.kept_from = 0              # global index of the oldest window token still visible
        self.chunks, self.held = [], [] # committed chunks still visible, and this rank's part of each
        self.sink_keys = None           # the sink's keys as committed (rotated at their own frames)
        self.sink_shift = 0             # frames the sink's keys in kv are moved by now

    def rewind(self):
        """Keep the sink, forget the window's chunks (they are about to be re-run and committed again)."""
        kept = [i for i, (first, _) in enumerate(self.chunks) if first < self.sink_tokens]
        self.chunks, self.held = [self.chunks[i] for i in kept], [self.held[i] for i in kept]
        self.length = held_by_window(self.held, self.kept_from, self.sink_tokens)

    def held_length(self, shard_of=lambda chunk: chunk):
        """Tokens held by the rank whose part of a chunk is shard_of(chunk)."""
        return held_by_window([shard_of(c) for c in self.chunks], self.kept_from, self.sink_tokens)

    def evict_until(self, cutoff):
        if cutoff <= self.kept_from:
            return
        sink = sum(max(0, min(end, self.sink_tokens) - first) for first, end in self.held)   # held sink tokens
        drop = self.length - held_by_window(self.held, cutoff, self.sink_tokens)
        if drop:  # shift the window's survivors to just after the sink (overlapping copy: clone first)
            self.kv[sink:self.length - drop] = self.kv[sink + drop:self.length].clone()
            self.length -= drop
        self.kept_from = cutoff
        gone = [i for i, (first, end) in enumerate(self.chunks) if end <= cutoff and first >= self.sink_tokens]
        for i in reversed(gone):        # bookkeeping stays as small as the window
            del self.chunks[i], self.held[i]

    def make_room(self, chunk):
        """Evict what a window no longer shows once `chunk` (global range) is generated, and move the sink's
        keys to sit just before the window. Idempotent: every pass over the chunk may call it."""
        if self.window_tokens is None:
            return
        if chunk[1] - chunk[0] > self.window_tokens - self.sink_tokens:
            raise ValueError(f"KVCache: a chunk of {chunk[1] - chunk[0]} tokens does not fit the window "
                             f"of {self.window_tokens} beside a sink of {self.sink_tokens}")
        self.evict_until(chunk[1] - (self.window_tokens - self.sink_tokens))
        shift = sink_shift(chunk[1], self.window_tokens, self.sink_tokens) // self.tokens_per_frame
        if shift != self.sink_shift and self.sink_keys is not None:
            self.kv[:len(self.sink_keys), 0] = rope.rotate_time(self.sink_keys, shift)
        self.sink_shift = shift

    def reserve(self, like, chunk, held=None):
        """Slots for this rank's `held` tokens (global range, default the whole `chunk`) of `chunk`.
        like: a token-major [n, B, H, D] tensor giving shape/dtype/device. Returns (slot, kv): write the
        chunk's keys/values into slot [n, 2, B, H, D]; kv [length + n, 2, B, H, D] is cache + chunk."""
        held = held or chunk
        n = held[1] - held[0]
        if like.shape[0] != n:
            raise ValueError(f"KVCache: {like.shape[0]} tokens given for a held range of {n}")
        self.make_room(chunk)
        if self.kv is None:
            self.kv = like.new_empty(self.capacity, 2, *like.shape[1:])
        elif like.shape[1:] != self.kv.shape[2:]:
            raise ValueError(f"KVCache holds tokens of {tuple(self.kv.shape[2:])}, "
                             f"got {tuple(like.shape[1:])}")
        end = self.length + n
        if end > self.capacity:
            raise ValueError(f"KVCache: {end} tokens exceed the capacity of {self.capacity}")
        return self.kv[self.length:end], self.kv[:end]

    def extend(self, k, v, chunk, held=None):
        """reserve + write the token-major k, v [n, B, H, D]: returns kv [length + n, 2, B, H, D]."""
        slot, kv = self.reserve(k, chunk, held)
        slot[:, 0] = k
        slot[:, 1] = v
        return kv

    def commit(self, chunk, held=None):
        """Keep the k/v that the last pass over `chunk` wrote into its slots (this rank's `held` part). A sink
        chunk's keys are also kept as written, for make_room to move."""
        held = held or chunk
        self.chunks.append(chunk)
        self.held.append(held)
        self.length += held[1] - held[0]
        if chunk[0] < self.sink_tokens:
            self.sink_keys = self.kv[:self.length, 0].clone()


def chunk_attention(q, k, v, cache, chunk, attend=fast_attention):
    """One pass of a chunk's attention: q, k, v [n, B, H, D] (token-major, rotated) for global token range
    `chunk` attend to the cache and to the chunk itself. The chunk's k/v are written into the cache's slots;
    only the caller's cache.commit(chunk) keeps them for later chunks. Returns [B, H, n, D]."""
    kv = cache.extend(k, v, chunk)                                   # [cached + n, 2, B, H, D]
    return attend(heads_major(q), heads_major(kv[:, 0]), heads_major(kv[:, 1]))


def chunked_video_attention(q, k, v, grid, chunk_frames, window_frames=None, sink_frames=0,
                            attend=fast_attention):
    """The chunk loop: q, k, v [B, N, H, D] raw (not rotated) for a whole video of grid (frames, h, w);
    each chunk is rotated with its global start_frame, attends through the KV cache. Returns [B, N, H, D]."""
    frames, height, width = grid
    if frames % chunk_frames:
        raise ValueError(f"{frames} frames are not a whole number of chunks of {chunk_frames}")
    check_window(window_frames, chunk_frames, sink_frames)
    tpf = height * width
    cache = KVCache.for_video(frames, tpf, window_frames, sink_frames)
    outs = []
    for start_frame in range(0, frames, chunk_frames):
        chunk = (start_frame * tpf, (start_frame + chunk_frames) * tpf)
        sl = slice(*chunk)
        cq = rope.causal_rope(q[:, sl], (chunk_frames, height, width), start_frame).transpose(0, 1)
        ck = rope.causal_rope(k[:, sl], (chunk_frames, height, width), start_frame).transpose(0, 1)
        outs.append(chunk_attention(cq, ck, v[:, sl].transpose(0, 1), cache, chunk, attend=attend))
        cache.commit(chunk)                                          # later chunks see this one
    return torch.cat(outs, dim=2).transpose(1, 2)


def full_pass_attention(q, k, v, grid, chunk_frames, window_frames=None, sink_frames=0):
    """The same video in one masked pass per chunk of queries: all frames rotated from 0, except that the
    sink's keys sit just before each chunk's window (rotated from start frame sink_shift)."""
    frames, height, width = grid
    tpf = height * width
    rq = rope.causal_rope(q, grid, 0).transpose(1, 2)
    mask = block_causal_mask(frames, tpf, chunk_frames, window_frames, sink_frames).to(q.device)
    outs, sink = [], sink_frames * tpf
    for end in range(chunk_frames, frames + 1, chunk_frames):
        rk = rope.causal_rope(k, grid, 0)
        shift = sink_shift(end, window_frames, sink_frames)
        if shift:
            rk[:, :sink] = rope.causal_rope(k[:, :sink], (sink_frames, height, width), shift)
        rows = slice((end - chunk_frames) * tpf, end * tpf)
        outs.append(attention(rq[:, :, rows], rk.transpose(1, 2), v.transpose(1, 2), mask[rows]))
    return torch.cat(outs, dim=2).transpose(1, 2)


def main():
    parser = Parser(__doc__, check=rope.head_dim_flag)
    parser.add_argument("--frames", type=positive, default=12)
    parser.add_argument("--height", type=positive, default=3)
    parser.add_argument("--width", type=positive, default=4)
    parser.add_argument("--heads", type=positive, default=2)
    parser.add_argument("--head-dim", type=positive, default=16)
    parser.add_argument("--chunk-frames", type=positive, default=3)
    parser.add_argument("--window-frames", type=positive, default=7)
    parser.add_argument("--sink-frames", type=non_negative, default=3)
    parser.add_argument("--seed", type=non_negative, default=0)
    args = parser.parse_args()
    if args.frames % args.chunk_frames:
        parser.error(f"--frames {args.frames} is not a whole number of chunks of "
                     f"--chunk-frames {args.chunk_frames}")
    problem = window_problem(args.window_frames, args.chunk_frames, args.sink_frames,
                             lambda name, value: f"--{name.replace('_', '-')} {value}")
    if problem:
        parser.error(problem)
    grid = (args.frames, args.height, args.width)
    n = args.frames * args.height * args.width
    gen = torch.Generator().manual_seed(args.seed)
    q, k, v = (torch.randn(1, n, args.heads, args.head_dim, dtype=torch.float64, generator=gen)
               for _ in "qkv")
    lines = []
    for window, sink in ((None, 0), (args.window_frames, 0), (args.window_frames, args.sink_frames)):
        want = full_pass_attention(q, k, v, grid, args.chunk_frames, window, sink)
        got = chunked_video_attention(q, k, v, grid, args.chunk_frames, window, sink)
        err = check("chunked vs masked", got, want, 1e-12)
        lines.append(f"  window {str(window):>4s}, sink {sink} frames: chunked (KV cache) vs one masked pass  "
                     f"max error {err:.1e}")
    if is_rank_zero():
        print(f"02_causal_attention: {args.frames} frames of {args.height}x{args.width} tokens, "
              f"chunks of {args.chunk_frames} frames, float64")
        print("\n".join(lines))


if __name__ == "__main__":
    run_main(main)
