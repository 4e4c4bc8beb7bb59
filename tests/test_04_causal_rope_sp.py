"""Stage 04 properties: Causal-RoPE SP == all-gather baseline == single-process causal RoPE."""
import importlib

import pytest
import torch
from hypothesis import given, strategies as st

from conftest import WORLD_SIZES
from rank_pool import get_pool

rope = importlib.import_module("01_rope")
sp = importlib.import_module("03_sequence_parallel")
crsp = importlib.import_module("04_causal_rope_sp")

EXACT = 1e-12  # float64: the same angles, computed from the same positions


def chunk_input(grid, heads, head_dim, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, grid[0] * grid[1] * grid[2], heads, head_dim, dtype=torch.float64, generator=gen)


def rotate_shard(grid, video_frames, start_frame, heads, head_dim, seed):
    mesh = sp.SPMesh.get(ring_degree=1)  # RoPE does not split heads: any world size works
    length = grid[0] * grid[1] * grid[2]
    shard = mesh.token_shard(length)
    x_local = chunk_input(grid, heads, head_dim, seed)[:, slice(*shard)]
    table = rope.RopeTable(head_dim, video_frames, grid[1], grid[2], dtype=torch.float64)
    return (crsp.rope_allgather_baseline(x_local, mesh, grid, start_frame),
            crsp.causal_rope_sp_positions(x_local, grid, start_frame, shard),
            crsp.causal_rope_sp(x_local, table, start_frame, grid[0], shard))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@given(data=st.data(), chunk_frames=st.integers(1, 4), height=st.integers(1, 5), width=st.integers(1, 5),
       heads=st.integers(1, 3), head_dim=st.sampled_from([6, 8, 16, 32]), seed=st.integers(0, 2**31))
def test_causal_rope_sp_equals_baseline_equals_one_process(world_size, data, chunk_frames, height, width, heads,
                                                           head_dim, seed):
    video_frames = data.draw(st.integers(chunk_frames, 40), label="video_frames")
    start_frame = data.draw(st.integers(0, video_frames - chunk_frames), label="start_frame")
    grid = (chunk_frames, height, width)
    per_rank = get_pool(world_size).run(rotate_shard, grid, video_frames, start_frame, heads, head_dim, seed)
    want = rope.causal_rope(chunk_input(grid, heads, head_dim, seed), grid, start_frame)
    for version in range(3):
        got = torch.cat([outs[version] for outs in per_rank], dim=1)
        torch.testing.assert_close(got, want, rtol=0, atol=EXACT)


def test_shard_positions_are_the_global_time_index():
    frame, row, column = crsp.shard_positions((3, 4, 5), start_frame=7, shard=(18, 23))
    assert frame.tolist() == [7, 7, 8, 8, 8]            # tokens 18, 19 end frame 7; 20.. start frame 8
    assert row.tolist() == [3, 3, 0, 0, 0] and column.tolist() == [3, 4, 0, 1, 2]


def rotate_past_table(start_frame):
    mesh = sp.SPMesh.get(ring_degree=1)
    table = rope.RopeTable(8, 6, 2, 2, dtype=torch.float64)
    shard = mesh.token_shard(12)
    x = torch.randn(1, 12, 1, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(start_frame))
    return crsp.causal_rope_sp(x[:, slice(*shard)], table, start_frame, 3, shard), rope.causal_rope(x, (3, 2, 2),
                                                                                                   start_frame)


@pytest.mark.parametrize("start_frame", [4, 6, 2000])
def test_a_chunk_past_the_tables_time_rows_is_rotated_from_the_global_time_index(start_frame):
    per_rank = get_pool(2).run(rotate_past_table, start_frame)
    got = torch.cat([mine for mine, _ in per_rank], dim=1)
    torch.testing.assert_close(got, per_rank[0][1], rtol=0, atol=EXACT)
