"""Stage 04 -- Causal-RoPE SP: each rank rotates its own tokens from the global time index.

The idea
    The baseline all-gathers a chunk, rotates all of it and keeps its slice: the whole chunk crosses the
    network and world_size times the needed tokens are rotated. Causal-RoPE SP needs no communication: token i
    of a rank's shard first..end-1 of a chunk from frame start_frame is global token g = start_frame*H*W +
    first + i, at (frame, row, column) = (g // (H*W), g % (H*W) // W, g % W), which alone sets its rotation.
Shapes: x_local [batch, n_local, heads, head_dim], this rank's contiguous shard of the chunk
Uses
    01_rope: RopeTable, apply_rope, axis_angles, axis_pairs, causal_rope, head_dim_flag
    03_sequence_parallel: SPMesh, gather_tokens, init_distributed, finish_distributed
Run
    python 04_causal_rope_sp.py     prints each version's max error vs one-process causal RoPE, median times
    torchrun --nproc_per_node=4 04_causal_rope_sp.py [--height 60 --width 104 --heads 12 --head-dim 128]"""
import importlib

import torch

from support.harness import check, non_negative, Parser, positive, run_main
from support.timing import Timings

rope = importlib.import_module("01_rope")
sp = importlib.import_module("03_sequence_parallel")


def rope_allgather_baseline(x_local, mesh, grid, start_frame):     # all-gather, rotate all, keep my slice
    length = grid[0] * grid[1] * grid[2]
    whole = sp.gather_tokens(x_local, mesh, length)                     # [B, length, H, D]: the traffic
    first, end = mesh.token_shard(length)
    return rope.causal_rope(whole, grid, start_frame)[:, first:end]


def shard_positions(grid, start_frame, shard):          # (frame, row, column) of my tokens, from global g
    _, height, width = grid
    g = start_frame * height * width + torch.arange(*shard)
    return g // (height * width), g % (height * width) // width, g % width


def causal_rope_sp_positions(x_local, grid, start_frame, shard):   # angles from the positions, no table
    t_pairs, h_pairs, w_pairs = rope.axis_pairs(x_local.shape[-1])
    frame, row, column = shard_positions(grid, start_frame, shard)
    angles = torch.cat([rope.axis_angles(frame, t_pairs), rope.axis_angles(row, h_pairs),
                        rope.axis_angles(column, w_pairs)], dim=-1).to(x_local.device)
    return rope.apply_rope(x_local, angles.cos(), angles.sin())


def causal_rope_sp(x_local, table, start_frame, num_frames, shard):   # my rows of the table: no trig
    return rope.apply_rope(x_local, *table.chunk_rows(start_frame, num_frames, shard))


def main():
    parser = Parser(__doc__, rope.head_dim_flag)
    parser.add_argument("--chunk-frames", type=positive, default=3)
    parser.add_argument("--video-frames", type=positive, default=21,
                        help="time rows of the RoPE table (later frames' rows are made as asked)")
    parser.add_argument("--start-frame", type=non_negative, default=9)
    parser.add_argument("--height", type=positive, default=6)
    parser.add_argument("--width", type=positive, default=7)
    parser.add_argument("--heads", type=positive, default=4)
    parser.add_argument("--head-dim", type=positive, default=32)
    parser.add_argument("--seed", type=non_negative, default=0)
    args = parser.parse_args()
    device = sp.init_distributed()
    mesh = sp.SPMesh.get(ring_degree=1)
    dtype = torch.float64 if device.type == "cpu" else torch.bfloat16
    tol = 1e-12 if dtype == torch.float64 else 4e-2   # bf16 values reach ~8: half an ulp there is 1.6e-2
    start, grid = args.start_frame, (args.chunk_frames, args.height, args.width)
    length = args.chunk_frames * args.height * args.width
    gen = torch.Generator().manual_seed(args.seed)
    chunk = torch.randn(1, length, args.heads, args.head_dim, dtype=torch.float64, generator=gen)
    chunk = chunk.to(device, dtype)
    shard = mesh.token_shard(length)
    x_local = chunk[:, slice(*shard)].contiguous()
    table = rope.RopeTable(args.head_dim, args.video_frames, args.height, args.width, device=device,
                           dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    want = rope.causal_rope(chunk.double(), grid, start)[:, slice(*shard)]
    versions = {
        "all-gather baseline": lambda: rope_allgather_baseline(x_local, mesh, grid, start),
        "Causal-RoPE SP (positions)": lambda: causal_rope_sp_positions(x_local, grid, start, shard),
        "Causal-RoPE SP (table slice)": lambda: causal_rope_sp(x_local, table, start, grid[0], shard),
    }
    if mesh.rank == 0:
        print(f"04_causal_rope_sp: {mesh.world_size} rank(s), {device.type}, {dtype}, chunk {grid} = "
              f"{length} tokens x {args.heads} heads x {args.head_dim}, start_frame {start}; median times")
    timings = Timings(device, show=mesh.rank == 0)
    for name, fn in versions.items():
        err = check(name, fn(), want, tol)
        timings.time(name, fn, note=f"max error {err:.1e}",
                     versus=None if name == "all-gather baseline" else "all-gather baseline")
    sp.finish_distributed()


if __name__ == "__main__":
    run_main(main)
