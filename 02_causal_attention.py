"""Stage 02 -- block-causal attention for chunk-by-chunk video generation, with a KV cache.

The idea
    Self-Forcing makes a video F latent frames (a chunk) at a time. A chunk's tokens see each other and all
    earlier chunks: over the whole video a block-causal mask; chunk by chunk, its queries attend unmasked to
    [KV cache, own chunk], keys rotated at their global positions (stage 01). With a window and sink frames,
    a chunk ending at frame e sees key frame g iff g < e and
    (g < sink_frames or g >= e - (window_frames - sink_frames)): the first `sink_frames` frames, then the
    latest frames, its own chunk included, `window_frames` in all (LongLive's local_attn_size 12 + sink_size 3
    = window 12, sink 3: the sink and the latest 9 frames). Without a sink this is Self-Forcing's
    local_attn_size; without a window a chunk sees every earlier frame. The sink is whole chunks (a prompt
    switch re-runs chunks, stage 06); its keys move to sit just before the window (`sink_shift` frames, stage
    01), so no distance a chunk sees grows with the video and the cache holds at most `window_frames` frames.
Shapes
    q, k, v in the model [batch, tokens, heads, head_dim]; attention() operands [batch, heads, tokens, ...];
    KVCache.kv [capacity, 2, batch, heads, head_dim], token-major: heads_major() views it as operands, no copy
Uses
    01_rope: causal_rope, rotate_time, head_dim_flag
Run
    python 02_causal_attention.py   chunks through the KV cache (no window; a window; a window and a sink)
                                    == one full pass with the block-causal mask
    torchrun --nproc_per_node=2 02_causal_attention.py   every rank checks, rank 0 prints"""
import importlib

import torch
import torch.nn.functional as F

from support.harness import check, is_rank_zero, non_negative, Parser, positive, run_main

rope = importlib.import_module("01_rope")


def attention(q, k, v, mask=None):
    """The reference, from the formula: q [B,H,Nq,D], k/v [B,H,Nk,D], mask [Nq, Nk] bool (True = attend)."""
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def fast_attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)          # fused kernels (flash / cuDNN / mem-efficient)


def spell_setting(name, value):
    return f"{name}={value}"            # how a library message names a setting (a command line: its flag)


def window_problem(window_frames, chunk_frames, sink_frames=0, spell=spell_setting):
    """What is wrong with a window and sink (a message), or None; `spell(name, value)` names a setting."""
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
    # frames (or tokens) the sink's keys move for a chunk ending at chunk_end: to end where the window starts
    return max(0, chunk_end - window) if sink and window is not None else 0


def block_causal_mask(num_frames, tokens_per_frame, chunk_frames, window_frames=None, sink_frames=0):
    check_window(window_frames, chunk_frames, sink_frames)
    token_frame = torch.arange(num_frames * tokens_per_frame) // tokens_per_frame
    chunk_end_frame = (token_frame // chunk_frames + 1) * chunk_frames   # frame after the query's chunk
    query_end, key_frame = chunk_end_frame[:, None], token_frame[None, :]
    mask = key_frame < query_end
    if window_frames is not None:
        mask &= (key_frame < sink_frames) | (key_frame >= query_end - (window_frames - sink_frames))
    return mask                                                      # [N, N] bool, the rule above


def held_by_window(ranges, kept_from, sink_end=0):
    """Tokens of the global (first, end) ranges that are visible: before `sink_end` or from `kept_from` on."""
    return sum(max(0, min(end, sink_end) - first) + max(0, end - max(first, kept_from, sink_end))
               for first, end in ranges)


def heads_major(x):
    return x.permute(1, 2, 0, 3)        # [tokens, B, H, D] -> [B, H, tokens, D], a view


class KVCache:
    """One layer's keys/values on one rank: kv[:length] (keys kv[:, 0], values kv[:, 1]), sink then window.
    Every rank records the same global ranges of committed chunks (`chunks`, ints: no device syncs), so any
    rank's length is known anywhere (stage 03's ring); `held` is this rank's part. A pass: `reserve` slots,
    write k/v, attend; only `commit` keeps them. Allocated once, never moved (stage 06's graphs read it)."""

    def __init__(self, capacity_tokens, window_tokens=None, sink_tokens=0, tokens_per_frame=1):
        self.capacity, self.window_tokens, self.sink_tokens = capacity_tokens, window_tokens, sink_tokens
        self.tokens_per_frame = tokens_per_frame
        self.kv = None                  # allocated at the first reserve, with the caller's shape/dtype/device
        self.reset()

    @classmethod
    def for_video(cls, frames, tokens_per_frame, window_frames=None, sink_frames=0):
        """A cache for a video of `frames` frames: room for all of them, or for what the window shows."""
        window_tokens = None if window_frames is None else window_frames * tokens_per_frame
        capacity = (frames * tokens_per_frame if window_tokens is None
                    else min(window_tokens, frames * tokens_per_frame))
        return cls(capacity, window_tokens, sink_frames * tokens_per_frame, tokens_per_frame)

    def reset(self):                    # forget every chunk for the next video; the storage stays
        self.length = 0                 # tokens this rank holds
        self.kept_from = 0              # global index of the oldest window token still visible
        self.chunks, self.held = [], [] # committed chunks still visible, and this rank's part of each
        self.sink_keys = None           # the sink's keys as committed (rotated at their own frames)
        self.sink_moved = 0             # frames the sink's keys in kv are moved by now

    def rewind(self):
        """Keep the sink, forget the window's chunks (a prompt switch re-runs and commits them again)."""
        kept = [i for i, (first, _) in enumerate(self.chunks) if first < self.sink_tokens]
        self.chunks, self.held = [self.chunks[i] for i in kept], [self.held[i] for i in kept]
        self.length = held_by_window(self.held, self.kept_from, self.sink_tokens)

    def held_length(self, shard_of=lambda chunk: chunk):
        """Tokens held by the rank whose part of a chunk is shard_of(chunk)."""
        return held_by_window([shard_of(c) for c in self.chunks], self.kept_from, self.sink_tokens)

    def evict_until(self, cutoff):
        if cutoff <= self.kept_from:
            return
        sink = sum(max(0, min(end, self.sink_tokens) - first) for first, end in self.held)  # held sink tokens
        drop = self.length - held_by_window(self.held, cutoff, self.sink_tokens)
        if drop:  # shift the window's survivors to just after the sink (overlapping copy: clone first)
            self.kv[sink:self.length - drop] = self.kv[sink + drop:self.length].clone()
            self.length -= drop
        self.kept_from = cutoff
        gone = [i for i, (first, end) in enumerate(self.chunks)
                if end <= cutoff and first >= self.sink_tokens]
        for i in reversed(gone):        # bookkeeping stays as small as the window
            del self.chunks[i], self.held[i]

    def make_room(self, chunk):
        """Evict what the window no longer shows at `chunk`, move the sink's keys before it. Idempotent."""
        if self.window_tokens is None:
            return
        if chunk[1] - chunk[0] > self.window_tokens - self.sink_tokens:
            raise ValueError(f"KVCache: a chunk of {chunk[1] - chunk[0]} tokens does not fit the window "
                             f"of {self.window_tokens} beside a sink of {self.sink_tokens}")
        self.evict_until(chunk[1] - (self.window_tokens - self.sink_tokens))
        shift = sink_shift(chunk[1], self.window_tokens, self.sink_tokens) // self.tokens_per_frame
        if shift != self.sink_moved and self.sink_keys is not None:
            self.kv[:len(self.sink_keys), 0] = rope.rotate_time(self.sink_keys, shift)
        self.sink_moved = shift

    def reserve(self, like, chunk, held=None):
        """(slot [n, 2, B, H, D] for this rank's `held` part of `chunk`, kv [length + n, ...]: cache + chunk).
        like: token-major [n, B, H, D], giving shape/dtype/device."""
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

    def extend(self, k, v, chunk, held=None):   # reserve, write k, v [n, B, H, D]; kv [length + n, 2, ...]
        slot, kv = self.reserve(k, chunk, held)
        slot[:, 0] = k
        slot[:, 1] = v
        return kv

    def commit(self, chunk, held=None):
        """Keep the k/v the last pass over `chunk` wrote; a sink chunk's keys also as written (make_room)."""
        held = held or chunk
        self.chunks.append(chunk)
        self.held.append(held)
        self.length += held[1] - held[0]
        if chunk[0] < self.sink_tokens:
            self.sink_keys = self.kv[:self.length, 0].clone()


def chunk_attention(q, k, v, cache, chunk, attend=fast_attention):
    """q, k, v [n, B, H, D] (token-major, rotated) of global range `chunk` attend to cache + chunk; the k/v
    go into the cache's slots, kept only by the caller's cache.commit(chunk). Returns [B, H, n, D]."""
    kv = cache.extend(k, v, chunk)                                   # [cached + n, 2, B, H, D]
    return attend(heads_major(q), heads_major(kv[:, 0]), heads_major(kv[:, 1]))


def chunked_video_attention(q, k, v, grid, chunk_frames, window_frames=None, sink_frames=0,
                            attend=fast_attention):
    """The chunk loop over a video: q, k, v [B, N, H, D] not yet rotated; returns [B, N, H, D]."""
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
    """The same in one masked pass per chunk of queries, the sink's keys rotated from frame sink_shift."""
    frames, height, width = grid
    tpf = height * width
    rq = rope.causal_rope(q, grid, 0).transpose(1, 2)
    mask = block_causal_mask(frames, tpf, chunk_frames, window_frames, sink_frames).to(q.device)
    outs, sink = [], sink_frames * tpf
    rk_in_place = rope.causal_rope(k, grid, 0)                       # every key at its own frame
    for end in range(chunk_frames, frames + 1, chunk_frames):
        rk, shift = rk_in_place, sink_shift(end, window_frames, sink_frames)
        if shift:
            rk = rk_in_place.clone()
            rk[:, :sink] = rope.causal_rope(k[:, :sink], (sink_frames, height, width), shift)
        rows = slice((end - chunk_frames) * tpf, end * tpf)
        outs.append(attention(rq[:, :, rows], rk.transpose(1, 2), v.transpose(1, 2), mask[rows]))
    return torch.cat(outs, dim=2).transpose(1, 2)


def main():
    parser = Parser(__doc__, rope.head_dim_flag)
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
        lines.append(f"  window {str(window):>4s}, sink {sink} frames: chunked (KV cache) vs one masked pass "
                     f" max error {err:.1e}")
    if is_rank_zero():
        print(f"02_causal_attention: {args.frames} frames of {args.height}x{args.width} tokens, "
              f"chunks of {args.chunk_frames} frames, float64")
        print("\n".join(lines))


if __name__ == "__main__":
    run_main(main)
