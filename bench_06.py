"""Times stage 06 at a preset's full shapes, random weights (or --checkpoint): a chunk forward, the first
chunk, the whole video (and with the host waiting for every chunk); --profile: host vs kernel time per
forward (rank 0).
Compilation and graph capture happen in untimed warm-up videos first. Every rank runs, rank 0 prints.

Uses
    05_fused_comm: ShardLayout
    06_self_forcing_pipeline: parser, set_up, build_job_model, stream, time_stream, attention_backends,
        video_rope_table, chunk_forward, forward_flops, video_flops, exchange_name, finish

Run
    python bench_06.py --preset wan-1.3b --profile --video-repeats 3            one GPU
    torchrun --nproc_per_node=2 bench_06.py --preset wan-1.3b --profile        Ulysses 2
    python bench_06.py                                                         tiny preset, CPU
"""
import dataclasses
import importlib
import os
import statistics

import torch

from support.harness import non_negative, positive, run_main
from support.timing import Clock, Timings, host_and_kernel_ms, time_ms
from support.weights import load_text

fused = importlib.import_module("05_fused_comm")
sf = importlib.import_module("06_self_forcing_pipeline")


def parser():
    p = sf.parser(__doc__)
    bench = add_timing_flags(p)
    bench.add_argument("--profile", action="store_true",
                       help="profile one chunk forward on rank 0, eager and graphed (host vs kernel time)")
    bench.add_argument("--profile-dir", default=None, help="--profile: also write the profiler tables here")
    p.checks.append(lambda args: args.profile_dir and not args.profile
                    and "--profile-dir is written only with --profile")
    return p


def add_timing_flags(p):
    """How many runs are untimed and timed (bench_07 takes the same flags); returns the flags' group."""
    bench = p.add_argument_group("the benchmark")
    bench.add_argument("--warmup", type=non_negative, default=5, help="untimed calls before each timed row")
    bench.add_argument("--repeats", type=positive, default=20, help="timed calls per row")
    bench.add_argument("--warmup-videos", type=non_negative, default=1,
                       help="untimed videos (compile, capture)")
    bench.add_argument("--video-repeats", type=positive, default=5, help="timed videos")
    return bench


def first_chunk_forward(run, model, text, graphs, timestep=1000.0):
    """A call running one forward of the video's first chunk (empty cache) on fixed random tokens, through
    what stream() uses (graphs: the same GraphedForward, kept across videos); it returns the flow."""
    video, device = run.video, run.device
    table = sf.video_rope_table(model, video, device)
    layout = fused.ShardLayout(run.mesh, table, 0, video.chunk_frames)
    gen = torch.Generator(device).manual_seed(0)                       # the same tokens at every call
    x = torch.randn(1, layout.n_local, 4 * model.config.in_dim, device=device, generator=gen)
    t = torch.full((1, video.chunk_frames), timestep, device=device)
    options = dataclasses.replace(run.options, graphs=graphs)
    forward = sf.chunk_forward(model, run.mesh, table, 1, video.cache_plan, options)
    forward.state.start(model.text_context(text.to(device)))
    return lambda: forward(x, t, layout)


def time_videos(videos, device, warmups, repeats, wait_each=False):
    """(warm-up seconds, median seconds to the first chunk, median seconds per video) of `repeats` drained
    streams videos() after `warmups` untimed ones, on the device's timeline."""
    clock = Clock(device)
    for _ in range(warmups):
        list(videos())
    warmup_s = clock.mark()
    marks = [sf.time_stream(videos(), device, wait_each)[1] for _ in range(repeats)]
    return warmup_s, statistics.median(m[0] for m in marks), statistics.median(m[-1] for m in marks)


def report_profile(label, profile, mesh, folder):
    """Print (rank 0) one profiled forward's host, wall and kernel times; write the profiler table to
    folder."""
    host, wall, kernels, table_text = profile
    if mesh.rank != 0:
        return
    print(f"  profile, rank 0, {label:<10s}  per forward: host {host:6.2f} ms to enqueue, "
          f"wall {wall:6.2f} ms, GPU kernels {kernels:6.2f} ms")
    if folder:
        os.makedirs(folder, exist_ok=True)
        name = f"profile_{mesh.world_size}gpu_{label.replace(' ', '_')}.txt"
        with open(os.path.join(folder, name), "w") as f:
            f.write(table_text)


def main(argv=None):
    run = sf.set_up(parser().parse_args(argv), "bench_06", needs_gpus="bench_06.py")
    a, video, device = run.args, run.video, run.device
    model = sf.build_job_model(run)
    text = load_text(None, model.config, 1, a.seed).to(device)     # as a GPU text encoder would hand it over
    videos = lambda: sf.stream(model, text, video, run.mesh, a.seed, run.options)
    warmup_s, first_s, total_s = time_videos(videos, device, a.warmup_videos, a.video_repeats)
    tokens = video.chunk_frames * video.tokens_per_frame
    if run.show:
        print(f"bench_06: {run.describe()} ({tokens} tokens per chunk), mode {a.mode}, "
              f"exchange {sf.exchange_name(run.mesh)}")
        print(f"  warm-up ({a.warmup_videos} video(s): compile, capture) {warmup_s:.2f} s, not timed below")
    timings = Timings(device, run.show, a.warmup, a.repeats)
    chunk_tflop = sf.forward_flops(model.config, tokens, tokens) / 1e12
    video_tflop = sf.video_flops(model.config, video) / 1e12
    waited = (time_videos(videos, device, 0, a.video_repeats, wait_each=True) if device.type == "cuda"
              else None)
    with torch.no_grad(), sf.attention_backends(device):
        # one forward of the first chunk through the forward the videos used, timed last, with the GPU busy
        # for seconds already (timed right after compilation, on an idle GPU, it reads high)
        ms = time_ms(first_chunk_forward(run, model, text, run.options.graphs), device, a.warmup, a.repeats)
        timings.add("chunk forward (empty cache)", ms, f"{chunk_tflop / ms * 1e3:6.1f} TFLOP/s of "
                    f"{chunk_tflop:.2f} TFLOP (median of {a.repeats})")
    timings.add("first chunk (4 steps)", first_s * 1e3, "from the call: incl. text K/V, cache set-up")
    timings.add("whole video", total_s * 1e3, f"{video_tflop / total_s:6.1f} TFLOP/s of {video_tflop:.1f} "
                f"TFLOP (median of {a.video_repeats})")
    if waited:
        timings.add("whole video, host waiting for each chunk", waited[2] * 1e3,
                    f"first chunk {waited[1] * 1e3:.1f} ms", versus="whole video")
    if run.show:
        peak = (f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
                if device.type == "cuda" else "")
        print(f"  frames per second {video.video_frames / total_s:.1f} ({video.video_frames} video frames, "
              f"latents){peak}")
    if a.profile and device.type == "cuda":
        with torch.no_grad(), sf.attention_backends(device):
            profiled = [("eager", first_chunk_forward(run, model, text, False))]
            if run.options.graphs:
                profiled.append(("CUDA graph", first_chunk_forward(run, model, text, True)))
            for label, fn in profiled:
                report_profile(label, host_and_kernel_ms(fn), run.mesh, a.profile_dir)
    sf.finish(a.graph_timeout)


if __name__ == "__main__":
    run_main(main)
