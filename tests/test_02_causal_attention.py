"""Stage 02 properties: the chunk loop with a KV cache equals one pass with the block-causal mask."""
import importlib

import pytest
import torch
from hypothesis import given, strategies as st

causal = importlib.import_module("02_causal_attention")

EXACT = 1e-12  # float64: the chunked and masked passes differ only by summation order


def qkv(tokens, heads, head_dim, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, tokens, heads, head_dim, dtype=torch.float64, generator=gen) for _ in range(3)]


@given(chunk_frames=st.integers(1, 3), chunks=st.integers(1, 7), height=st.integers(1, 3), width=st.integers(1, 3),
       heads=st.integers(1, 3), head_dim=st.sampled_from([6, 8, 12, 16]), window=st.one_of(st.none(), st.integers(0, 6)),
       sink_chunks=st.integers(0, 2), seed=st.integers(0, 2**31))
def test_chunked_with_cache_equals_masked_full_pass(chunk_frames, chunks, height, width, heads, head_dim, window,
                                                    sink_chunks, seed):
    """With and without a window and sink frames: the bounded cache (the sink's keys moved to sit before
    the window) equals the masked pass over the whole video."""
    frames, sink_frames = chunk_frames * chunks, chunk_frames * sink_chunks
    window_frames = None if window is None else sink_frames + chunk_frames + window
    q, k, v = qkv(frames * height * width, heads, head_dim, seed)
    grid = (frames, height, width)
    want = causal.full_pass_attention(q, k, v, grid, chunk_frames, window_frames, sink_frames)
    for attend in (causal.attention, causal.fast_attention):
        got = causal.chunked_video_attention(q, k, v, grid, chunk_frames, window_frames, sink_frames, attend=attend)
        torch.testing.assert_close(got, want, rtol=0, atol=EXACT)


@given(frames=st.integers(1, 12), tokens_per_frame=st.integers(1, 3), chunk_frames=st.integers(1, 3),
       window=st.one_of(st.none(), st.integers(0, 5)), sink_chunks=st.integers(0, 2))
def test_mask_matches_its_definition(frames, tokens_per_frame, chunk_frames, window, sink_chunks):
    sink_frames = chunk_frames * sink_chunks
    window_frames = None if window is None else sink_frames + chunk_frames + window
    mask = causal.block_causal_mask(frames, tokens_per_frame, chunk_frames, window_frames, sink_frames)
    for i in range(frames * tokens_per_frame):
        for j in range(frames * tokens_per_frame):
            fi, fj = i // tokens_per_frame, j // tokens_per_frame
            chunk_end = (fi // chunk_frames + 1) * chunk_frames
            recent = window_frames is None or fj >= chunk_end - (window_frames - sink_frames)
            visible = fj < chunk_end and (fj < sink_frames or recent)
            assert bool(mask[i, j]) == visible


def test_a_long_stream_keeps_the_sink_and_stays_bounded():
    """Sink 2 chunks + window 5 chunks of 4 tokens: after 200 chunks the cache holds tokens 0..7 (the sink)
    and the last 12 tokens, in that order, at the same storage, with bookkeeping for those chunks only."""
    cache = causal.KVCache.for_video(frames=400, tokens_per_frame=2, window_frames=10, sink_frames=4)
    for c in range(200):
        chunk = (c * 4, (c + 1) * 4)
        k = torch.arange(*chunk, dtype=torch.float64).view(-1, 1, 1, 1).expand(-1, 1, 1, 6)
        cache.extend(k, k, chunk)
        cache.commit(chunk)
        if c == 0:
            storage = cache.kv.data_ptr()
    values = cache.kv[:cache.length, 1, 0, 0, 0].tolist()
    assert values == list(range(8)) + list(range(800 - 12, 800))
    assert cache.kv.shape[0] == 20 and cache.kv.data_ptr() == storage and len(cache.chunks) == 2 + 3
    cache.rewind()
    assert cache.length == 8 and cache.chunks == [(0, 4), (4, 8)]


def test_cache_keeps_exactly_the_window_and_uncommitted_passes_leave_it_alone():
    chunk_tokens = 6
    cache = causal.KVCache(capacity_tokens=10, window_tokens=10)
    for c in range(4):
        chunk = (c * chunk_tokens, (c + 1) * chunk_tokens)
        k = torch.arange(chunk[0], chunk[1], dtype=torch.float64).view(-1, 1, 1, 1)
        kv = cache.extend(k + 0.5, k + 0.5, chunk)               # a denoising pass: not kept
        assert kv.shape[0] == min(10, chunk[1])                  # sees the last 10 tokens at most
        cache.extend(k, k, chunk)                                # the clean pass: kept
        cache.commit(chunk)
        held = cache.kv[:cache.length, 0].flatten().tolist()
        assert held == list(range(max(0, chunk[1] - 10), chunk[1]))  # the last 10 committed tokens
    assert cache.kept_from == 4 * chunk_tokens - 10 and cache.held_length() == cache.length


def test_bad_inputs_are_rejected():
    q, k, v = qkv(12, 1, 8, 0)
    with pytest.raises(ValueError, match="window_frames=2 must be >= sink_frames=0 \\+ chunk_frames=3"):
        causal.chunked_video_attention(q, k, v, (3, 2, 2), 3, window_frames=2)
    with pytest.raises(ValueError, match="sink_frames=2 must be whole chunks"):
        causal.chunked_video_attention(q, k, v, (3, 2, 2), 3, window_frames=6, sink_frames=2)
    with pytest.raises(ValueError, match="not a whole number of chunks"):
        causal.chunked_video_attention(q, k, v, (3, 2, 2), 2)
    k, v = k.transpose(0, 1), v.transpose(0, 1)                  # token-major [12, 1, 1, 8]
    cache = causal.KVCache(capacity_tokens=5)
    with pytest.raises(ValueError, match="exceed the capacity"):
        cache.extend(k, v, (0, 12))
    with pytest.raises(ValueError, match="tokens given for a held range"):
        cache.extend(k, v, (0, 11))
    cache = causal.KVCache(capacity_tokens=50)
    cache.extend(k, v, (0, 12))
    with pytest.raises(ValueError, match="KVCache holds"):
        cache.extend(torch.zeros(12, 1, 2, 8, dtype=torch.float64), torch.zeros(12, 1, 2, 8), (0, 12))


def test_reset_keeps_the_storage_and_make_room_moves_data_once():
    cache = causal.KVCache(capacity_tokens=12, window_tokens=12)
    for c in range(3):
        chunk = (c * 6, (c + 1) * 6)
        k = torch.arange(*chunk, dtype=torch.float64).view(-1, 1, 1, 1)
        cache.extend(k, k, chunk)
        cache.commit(chunk)
    storage = cache.kv.data_ptr()
    for _ in range(2):                                            # every pass over chunk 3 may ask; one moves
        cache.make_room((18, 24))
        assert cache.kv[:cache.length, 0].flatten().tolist() == list(range(12, 18))
    cache.reset()
    assert (cache.length, cache.kept_from, cache.chunks, cache.held) == (0, 0, [], [])
    kv = cache.extend(torch.ones(6, 1, 1, 1, dtype=torch.float64), torch.ones(6, 1, 1, 1, dtype=torch.float64), (0, 6))
    assert kv.shape[0] == 6 and cache.kv.data_ptr() == storage  # same memory: CUDA graphs keep reading it
