"""Stage 01 properties: Wan 3D RoPE against its formula, and the precomputed table."""
import importlib
import math

import pytest
import torch
from hypothesis import given, strategies as st

from support.harness import check

rope = importlib.import_module("01_rope")

EXACT = 1e-12  # float64 throughout: only rounding separates the versions

head_dims = st.integers(3, 24).map(lambda n: 2 * n)  # even, >= 6


def rope_by_formula(x, grid, start_frame, theta=10000.0):
    """Rotate token by token, pair by pair, straight from the definition (the slow, obvious version)."""
    frames, height, width = grid
    pairs = x.shape[-1] // 2
    t_pairs, hw_pairs = pairs - 2 * (pairs // 3), pairs // 3
    out = x.clone()
    for n in range(x.shape[1]):
        f, rest = divmod(n, height * width)
        h, w = divmod(rest, width)
        for i in range(pairs):
            if i < t_pairs:
                pos, j, part = start_frame + f, i, 2 * t_pairs
            elif i < t_pairs + hw_pairs:
                pos, j, part = h, i - t_pairs, 2 * hw_pairs
            else:
                pos, j, part = w, i - t_pairs - hw_pairs, 2 * hw_pairs
            angle = pos * theta ** (-2 * j / part)
            a, b = x[:, n, :, 2 * i], x[:, n, :, 2 * i + 1]
            out[:, n, :, 2 * i] = a * math.cos(angle) - b * math.sin(angle)
            out[:, n, :, 2 * i + 1] = a * math.sin(angle) + b * math.cos(angle)
    return out


def randn(*shape, seed):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@given(head_dim=head_dims, frames=st.integers(1, 3), height=st.integers(1, 4), width=st.integers(1, 4),
       start_frame=st.integers(0, 50), seed=st.integers(0, 2**31))
def test_table_and_on_the_fly_equal_the_formula(head_dim, frames, height, width, start_frame, seed):
    x = randn(2, frames * height * width, 2, head_dim, seed=seed)
    want = rope_by_formula(x, (frames, height, width), start_frame)
    table = rope.RopeTable(head_dim, start_frame + frames, height, width, dtype=torch.float64)
    torch.testing.assert_close(rope.apply_rope(x, *table.chunk_rows(start_frame, frames)), want, rtol=0, atol=EXACT)
    torch.testing.assert_close(rope.causal_rope(x, (frames, height, width), start_frame), want, rtol=0, atol=EXACT)


@given(head_dim=head_dims, frames=st.integers(1, 8), height=st.integers(1, 6), width=st.integers(1, 6),
       start_frame=st.integers(0, 1000), seed=st.integers(0, 2**31))
def test_rotation_preserves_norms(head_dim, frames, height, width, start_frame, seed):
    x = randn(1, frames * height * width, 3, head_dim, seed=seed)
    y = rope.causal_rope(x, (frames, height, width), start_frame)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=0, atol=EXACT)


@given(head_dim=head_dims, data=st.data(), seed=st.integers(0, 2**31))
def test_dot_product_depends_only_on_position_difference(head_dim, data, seed):
    """q at (f,h,w) and k at (f',h',w') give the same q.k as both shifted by one (df, dh, dw)."""
    F, H, W = 12, 7, 7
    pos = st.tuples(st.integers(0, 5), st.integers(0, 3), st.integers(0, 3))
    p_q, p_k, shift = data.draw(pos), data.draw(pos), data.draw(pos)
    table = rope.RopeTable(head_dim, F, H, W, dtype=torch.float64)
    q, k = randn(1, 1, 1, head_dim, seed=seed), randn(1, 1, 1, head_dim, seed=seed + 1)

    def rotated(x, f, h, w):
        token = (f * H + h) * W + w
        return rope.apply_rope(x, *table.rows(token, token + 1))

    def dot(pq, pk):
        return (rotated(q, *pq) * rotated(k, *pk)).sum()

    moved = lambda p: tuple(a + b for a, b in zip(p, shift))
    torch.testing.assert_close(dot(moved(p_q), moved(p_k)), dot(p_q, p_k), rtol=0, atol=1e-10)


@given(head_dim=head_dims, frames=st.integers(2, 9), height=st.integers(1, 4), width=st.integers(1, 4),
       data=st.data(), seed=st.integers(0, 2**31))
def test_chunk_with_start_frame_equals_slice_of_whole_video(head_dim, frames, height, width, data, seed):
    s = data.draw(st.integers(0, frames - 1))
    n = data.draw(st.integers(1, frames - s))
    tpf = height * width
    x = randn(1, frames * tpf, 2, head_dim, seed=seed)
    whole = rope.causal_rope(x, (frames, height, width), 0)
    chunk = rope.causal_rope(x[:, s * tpf:(s + n) * tpf], (n, height, width), s)
    torch.testing.assert_close(chunk, whole[:, s * tpf:(s + n) * tpf], rtol=0, atol=EXACT)


def test_table_shard_rows_are_the_chunk_rows_sliced():
    table = rope.RopeTable(16, 5, 2, 3)
    cos, sin = table.chunk_rows(2, 2)
    cos_shard, sin_shard = table.chunk_rows(2, 2, shard=(4, 9))
    assert torch.equal(cos_shard, cos[4:9]) and torch.equal(sin_shard, sin[4:9])


@pytest.mark.parametrize("head_dim", [7, 4, 0])
def test_head_dim_that_cannot_split_is_rejected(head_dim):
    with pytest.raises(ValueError, match="head_dim must be even and >= 6"):
        rope.RopeTable(head_dim, 2, 2, 2)


@given(head_dim=head_dims, table_frames=st.integers(1, 4), frames=st.integers(1, 3), height=st.integers(1, 3),
       width=st.integers(1, 3), start_frame=st.integers(0, 3000), seed=st.integers(0, 2**31))
def test_rows_past_the_tables_time_rows_equal_the_formula(head_dim, table_frames, frames, height, width, start_frame,
                                                          seed):
    """Positions never run out: a chunk at or past the table's time rows (upstream fails past 1024) gets the
    rows of the same formula, and a chunk straddling the table's end too."""
    x = randn(1, frames * height * width, 2, head_dim, seed=seed)
    table = rope.RopeTable(head_dim, table_frames, height, width, dtype=torch.float64)
    want = rope_by_formula(x, (frames, height, width), start_frame)
    torch.testing.assert_close(rope.apply_rope(x, *table.chunk_rows(start_frame, frames)), want, rtol=0, atol=EXACT)
    start = max(0, table_frames - 1)
    straddling = rope.apply_rope(x, *table.chunk_rows(start, frames))
    torch.testing.assert_close(straddling, rope_by_formula(x, (frames, height, width), start), rtol=0, atol=EXACT)


@given(head_dim=head_dims, start_frame=st.integers(0, 2000), moved=st.integers(0, 2000), seed=st.integers(0, 2**31))
def test_rotate_time_moves_a_rotated_key_by_whole_frames(head_dim, start_frame, moved, seed):
    x = randn(1, 6, 2, head_dim, seed=seed)
    at = lambda f: rope.causal_rope(x, (1, 2, 3), f)
    torch.testing.assert_close(rope.rotate_time(at(start_frame), moved), at(start_frame + moved), rtol=0, atol=1e-10)
    assert (rope.rotate_time(at(start_frame), 1) - at(start_frame)).abs().max() > 1e-3


def test_a_negative_start_frame_is_rejected():
    with pytest.raises(ValueError, match="time positions start at 0"):
        rope.RopeTable(16, 4, 2, 2).chunk_rows(-1, 2)
    with pytest.raises(ValueError, match="time positions start at 0"):
        rope.causal_rope(torch.zeros(1, 8, 1, 16), (2, 2, 2), -1)


def test_shape_mismatches_are_rejected():
    table = rope.RopeTable(16, 2, 2, 2)
    with pytest.raises(ValueError, match="has 7 tokens but grid"):
        rope.causal_rope(torch.zeros(1, 7, 1, 16), (2, 2, 2), 0)
    with pytest.raises(ValueError, match="apply_rope"):
        rope.apply_rope(torch.zeros(1, 3, 1, 16), *table.chunk_rows(0, 1))
    with pytest.raises(ValueError, match="outside a chunk"):
        table.chunk_rows(0, 1, shard=(2, 5))


def test_check_fails_loudly():
    with pytest.raises(AssertionError, match="exceeds tolerance"):
        check("x", torch.ones(3), torch.zeros(3), 1e-3)
    with pytest.raises(AssertionError):
        check("nan", torch.tensor([float("nan")]), torch.zeros(1), 1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a host wait exists only with a GPU")
def test_rows_past_the_table_and_sink_moves_never_wait_for_the_gpu():
    """What a long stream does every chunk (time rows past the table, the sink's keys turned) makes no
    blocking copy from the host."""
    table = rope.RopeTable(12, 4, 2, 3, device="cuda")
    keys = torch.randn(10, 1, 2, 12, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        table.time_rows(6, 9)
        rope.rotate_time(keys, 5)
    finally:
        torch.cuda.set_sync_debug_mode(0)
