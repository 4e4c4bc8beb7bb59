"""The command line of stages 06 (latents) and 07 (frames): the main job, --bench and --verify.

The stages pass themselves in (`main(sf)` from 06, `main(sf, dec)` from 07): a stage that runs as a script
is the module `__main__`, and importing it again by name would load a second copy of it, whose CUDA-graph
cache nobody clears at exit."""
import dataclasses
import os
import statistics

import torch
import torch.distributed as dist

from support import extras, files
from support.harness import BadInput, Parser, check, non_negative, positive
from support.timing import Clock, Timings, host_and_kernel_ms, relative_rms, time_ms
from support.weights import load_text


def build_parser(sf, dec=None):
    def check(args):
        return flag_problem(sf, args)
    parser = Parser(sf.__doc__ if dec is None else dec.__doc__, check)
    parser.add_argument("--bench", action="store_true",
                        help="time chunk forward, first chunk, whole video (random weights; use --preset wan-1.3b)")
    parser.add_argument("--verify", action="store_true",
                        help="GPU: check CUDA-graph == eager latents, and N GPUs == 1 GPU (float32 and bfloat16)")
    parser.add_argument("--profile", action="store_true",
                        help="bench: profile one chunk forward on rank 0, eager and graphed (host vs kernel time)")
    parser.add_argument("--profile-dir", default=None, help="bench --profile: also write the profiler tables here")
    parser.add_argument("--warmup", type=non_negative, default=5, help="bench: untimed chunk forwards")
    parser.add_argument("--repeats", type=positive, default=20, help="bench: timed chunk forwards")
    parser.add_argument("--warmup-videos", type=non_negative, default=1,
                        help="bench: untimed videos (compile, capture)")
    parser.add_argument("--video-repeats", type=positive, default=5, help="bench: timed videos")
    parser.add_argument("--preset", choices=sorted(sf.PRESETS), default="tiny")
    parser.add_argument("--frames", type=positive, default=21, help="latent frames (21 = 81 video frames)")
    parser.add_argument("--height", type=positive, default=None, help="video height in pixels (preset default)")
    parser.add_argument("--width", type=positive, default=None, help="video width in pixels (preset default)")
    parser.add_argument("--window-frames", type=positive, default=None, help="local attention window (latent frames)")
    parser.add_argument("--seed", type=non_negative, default=0)
    parser.add_argument("--checkpoint", help="Wan2.1 / Self-Forcing .pt, safetensors or a diffusers release "
                                             "(random weights when absent)")
    parser.add_argument("--use-ema", action="store_true", help="take 'generator_ema' from a Self-Forcing file")
    parser.add_argument("--text-embedding", help="tensor file [L, 4096] or [B, L, 4096] of umT5 features")
    parser.add_argument("--prompt", help="a text prompt, encoded with the umT5 of --wan-folder (optional packages)")
    parser.add_argument("--wan-folder", help="a local Wan2.1 diffusers release (text_encoder/, tokenizer/)")
    parser.add_argument("--output", default="out/latents.pt" if dec is None else "out/frames.pt",
                        help="where the latents (06) or the decoded frames (07) are saved")
    parser.add_argument("--ring", type=positive, default=None,
                        help="ring degree (default: most Ulysses the heads allow)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32", "float64"], default=None,
                        help="default bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--mode", choices=sf.fused.MODES, default="fused")
    parser.add_argument("--no-graph", action="store_true",
                        help="GPU: launch every kernel from Python instead of replaying CUDA graphs")
    parser.add_argument("--exchange", choices=["nccl", "symm"], default="nccl",
                        help="GPU: the Ulysses all-to-all as NCCL calls, or as peer copies into symmetric memory")
    parser.add_argument("--graph-timeout", type=float, default=300,
                        help="seconds a CUDA graph capture and its first replay may take before every rank stops")
    if dec is not None:
        add_decoder_flags(parser, dec)
    return parser


def flag_spelling(name, value):
    """A setting named as its flag: --window-frames 2; settings that are no flag are named by value."""
    flags = {"frames", "height", "width", "window_frames"}
    return f"--{name.replace('_', '-')} {value}" if name in flags else f"{value}"


def video_spec(sf, args):
    """The video the flags ask for: the preset's size unless --height / --width say otherwise."""
    height, width = sf.PRESET_SIZE[args.preset]
    return sf.VideoSpec(args.frames, args.height or height, args.width or width, window_frames=args.window_frames)


def flag_problem(sf, args):
    """What is wrong with the flags alone (a message), so that every rank fails alike before any set-up.
    The video's rules are VideoSpec.problem's, spelled as flags."""
    problem = video_spec(sf, args).problem(spell=flag_spelling)
    if problem:
        return problem
    heads = sf.PRESETS[args.preset].num_heads
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.ring is not None and (world_size % args.ring or heads % (world_size // args.ring)):
        return (f"--ring {args.ring} does not fit {world_size} rank(s): the ring degree must divide the world "
                f"size, and the rest (the Ulysses degree) the {heads} heads; choose from "
                f"{[r for _, r in sf.sp.factorizations(world_size, heads)]}")
    if not args.graph_timeout > 0:
        return f"--graph-timeout must be a positive number of seconds, got {args.graph_timeout}"
    problem = extras.extras_problem(args.prompt, args.wan_folder, args.text_embedding, getattr(args, "video", None))
    if problem:
        return problem
    if not torch.cuda.is_available():
        if args.exchange == "symm":
            return "--exchange symm needs GPUs (symmetric memory is CUDA memory)"
        if args.verify:
            return "--verify compares GPU runs; on CPU the tests prove the same (python -m pytest)"
    return None


def needs_gpus(args):
    """The flag that makes this run need a GPU per rank (where there are GPUs at all), or None."""
    for flag, on in (("--bench", args.bench), ("--verify", args.verify), ("--exchange symm", args.exchange == "symm"),
                     ("--preset wan-1.3b", args.preset == "wan-1.3b")):
        if on:
            return flag
    return None


def main(sf, dec=None):
    args = build_parser(sf, dec).parse_args()
    device = sf.sp.init_distributed(needs_gpus=needs_gpus(args))
    if dec is not None and device.type == "cuda":
        torch.backends.cudnn.benchmark = True     # the decoder's conv shapes repeat every chunk: pick the fastest
    dtype = chosen_dtype(args.dtype, device)
    heads = sf.PRESETS[args.preset].num_heads
    mesh = sf.sp.SPMesh.get(*sf.sp.mesh_shape(sf.sp.world()[0], heads, args.ring), device=device)
    if args.exchange == "symm":
        mesh.use_symmetric_memory()
    options = sf.RunOptions(args.mode, device.type == "cuda" and not args.no_graph, args.graph_timeout)
    bench = bench_main if dec is None else frames_bench
    job = bench if args.bench else verify_main if args.verify else video_main
    job(Job(sf, dec, args, video_spec(sf, args), device, mesh, dtype, options))
    sf.finish(args.graph_timeout)


def chosen_dtype(name, device):
    """A --dtype flag's torch dtype; unset, bfloat16 on GPU and float32 on CPU."""
    return getattr(torch, name or ("bfloat16" if device.type == "cuda" else "float32"))


class Job:
    """One run's stage modules, flags and set-up, as the jobs below take them."""

    def __init__(self, sf, dec, args, video, device, mesh, dtype, options):
        self.sf, self.dec, self.args, self.video = sf, dec, args, video
        self.device, self.mesh, self.dtype, self.options = device, mesh, dtype, options

    @property
    def show(self):
        return self.mesh.rank == 0

    def describe(self):
        a, m = self.args, self.mesh
        gpu = torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu"
        return (f"{a.preset}, {m.world_size} x {gpu} (ulysses {m.ulysses_degree} x ring {m.ring_degree}), "
                f"{self.dtype}, {self.video.frames} latent frames at {self.video.height}x{self.video.width}"
                f"{', CUDA graphs' if self.options.graphs else ''}")


# ----------------------------------------------------------------------------- the main job

def read_inputs(job):
    """The model, the decoder (07) and the text features, checked on every rank, with the outputs on rank 0
    (the rank that writes) tried by creating them, before any work: every rank then ends with the same
    one-line error, or all go on."""
    a, sf, mesh = job.args, job.sf, job.mesh
    outputs = [("--output", a.output)] + ([("--video", a.video)] if getattr(a, "video", None) else [])
    problem = None
    if mesh.rank == 0:
        problem = next(filter(None, (files.output_problem(path, flag) for flag, path in outputs)), None)
    model = text = decoder = None
    try:
        model = sf.build_model(a.preset, job.dtype, job.device, a.seed, a.checkpoint, a.use_ema)
        text = load_text(a.text_embedding, model.config, 1, a.seed)
        if job.dec is not None:
            decoder = job.dec.build_decoder(decoder_preset(a), decoder_dtype(job), job.device, a.seed, a.vae)
    except BadInput as e:
        problem = problem or str(e)
    agree(job, problem)
    return model, text, decoder


def stage_name(module):
    return os.path.splitext(os.path.basename(module.__file__))[0]


def agree(job, problem):
    """Every rank raises the same one-line BadInput if any rank has a problem (one process: its own line)."""
    if job.mesh.world_size > 1:
        job.mesh.agree(stage_name(job.dec or job.sf), problem)
    elif problem:
        raise BadInput(problem)


def save_on_rank_zero(job, result, problem=None):
    """Rank 0 saves result() to --output; a failed save, or rank 0's earlier `problem` (an mp4 that could not
    be written), ends every rank with its one line, after the result is kept."""
    if job.mesh.rank == 0:
        try:
            files.save(result(), job.args.output)
        except BadInput as e:
            problem = problem or str(e)
    agree(job, problem)


def time_stream(chunks, device, wait_each=False):
    """Drain a stream of chunks; returns (the chunks, seconds from the call to each chunk's hand-out on the
    device's timeline). wait_each: the host also waits for every chunk (as a consumer that copies each chunk
    to the host must), to measure what that costs."""
    clock, kept = Clock(device), []
    for chunk in chunks:
        clock.record()
        if wait_each and device.type == "cuda":
            torch.cuda.synchronize()
        kept.append(chunk)
    return kept, clock.seconds()


def video_main(job):
    """The main job: a video (after an untimed warm-up one on GPU), its first chunk's latency and its whole
    time, measured when the GPU has finished the work they name; then the latents are saved. Stage 07's
    main job decodes the chunks into frames as they come (frames_main)."""
    a, sf, mesh, video = job.args, job.sf, job.mesh, job.video
    estimate = cpu_estimate(sf, sf.PRESETS[a.preset], video) if job.device.type == "cpu" else None
    if estimate and job.show:
        print(estimate, flush=True)
    model, text, decoder = read_inputs(job)
    if a.prompt:
        clock = Clock(job.device)
        text = extras.prompt_features(a.wan_folder, a.prompt, model.config.text_len, job.device, mesh)
        if job.show:
            print(f"prompt: {text.shape[1]} umT5 tokens in {clock.mark():.1f} s (not in the figures below)")
    if job.dec is not None:
        return frames_main(job, model, text, decoder)
    run = lambda: sf.stream(model, text, video, mesh, a.seed, job.options)
    warmup_s = warm_up(job, lambda: list(run()))
    chunks, marks = time_stream(run(), job.device)
    latents = torch.cat(chunks, dim=2)
    save_on_rank_zero(job, lambda: {"latents": latents.cpu(), "frames": video.frames, "height": video.height,
                                    "width": video.width, "seed": a.seed, "preset": a.preset})
    if job.show:
        print(f"{stage_name(sf)}: {job.describe()}")
        if warmup_s is not None:
            print(f"  warm-up (compile, CUDA graph capture, one untimed video) {warmup_s:.1f} s")
        print(f"  first chunk {marks[0] * 1e3:.1f} ms, total {marks[-1]:.3f} s, {video.video_frames} video frames "
              f"-> {video.video_frames / marks[-1]:.1f} FPS (latents); latents {tuple(latents.shape)} saved to "
              f"{a.output}")
    compare_with_one_process(job, lambda one: sf.generate(model, text, first_chunk_video(sf, video), one, a.seed,
                                                          job.options), latents[:, :, :sf.CHUNK_FRAMES], "latents")


def warm_up(job, fn):
    """On GPU, run fn once untimed (compile, capture, as a server would before its first request)."""
    if job.device.type != "cuda":
        return None
    clock = Clock(job.device)
    fn()
    return clock.mark()


def first_chunk_video(sf, video):
    return sf.VideoSpec(sf.CHUNK_FRAMES, video.height, video.width, window_frames=video.window_frames)


def compare_with_one_process(job, run_alone, sharded, what):
    """With several ranks on the tiny preset (cheap there): the first chunk's result against one process."""
    if job.mesh.world_size == 1 or job.args.preset != "tiny":
        return
    alone = run_alone(job.sf.sp.SPMesh(1, 1, job.device, local=True))
    error = check(f"{what} on {job.mesh.world_size} ranks vs one process", sharded, alone,
                  tolerance(sharded.dtype))
    if job.show:
        print(f"  first chunk's {what} on {job.mesh.world_size} ranks vs one process: max error {error:.1e} "
              f"({sharded.dtype})")


def tolerance(dtype):
    """What the main jobs' self-checks accept: reordered sums in float64 and float32; in bfloat16, a few
    roundings of values up to ~1 (pixels) or ~3 (latents)."""
    return {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 5e-2)


def cpu_estimate(sf, config, video):
    """A warning line for a CPU run far beyond the tiny preset's default (its work and memory), else None."""
    flops = video_flops(sf, config, video)
    scale = video_flops(sf, sf.PRESETS["tiny"], sf.VideoSpec(21, *sf.PRESET_SIZE["tiny"]))
    if flops < 100 * scale:
        return None
    weights = (config.num_layers * (8 * config.dim ** 2 + 2 * config.dim * config.ffn_dim)
               + config.text_dim * config.dim)
    cache = config.num_layers * video.frames * video.tokens_per_frame * 2 * config.dim
    gib = 4 * (weights + cache) / 2**30
    return (f"note: this CPU run needs about {flops / 1e12:,.1f} TFLOP and {gib:.1f} GiB of float32 weights "
            f"and cache ({flops / scale:,.0f}x the tiny preset's default run); at a few tens of GFLOP/s that "
            f"is about {flops / 30e9 / 60:,.0f} min. A GPU, or a smaller --height/--width/--frames, fits better.")


# ----------------------------------------------------------------------------- benchmark

def bench_main(job):
    """Times at the preset's full shapes with random weights; every rank runs, rank 0 prints. Compilation and
    graph capture happen in the warm-up videos, before any clock starts."""
    a, sf, video, device = job.args, job.sf, job.video, job.device
    model = sf.build_model(a.preset, job.dtype, device, a.seed)
    text = load_text(None, model.config, 1, a.seed).to(device)     # as a GPU text encoder would hand it over
    run = lambda: sf.stream(model, text, video, job.mesh, a.seed, job.options)
    warmup_s, first_s, total_s = time_videos(run, device, a.warmup_videos, a.video_repeats)
    tokens = video.chunk_frames * video.tokens_per_frame
    if job.show:
        print(f"06 --bench: {job.describe()} ({tokens} tokens per chunk), mode {a.mode}, "
              f"exchange {sf.exchange_name(job.mesh)}")
        print(f"  warm-up ({a.warmup_videos} video(s): compile, capture) {warmup_s:.2f} s, not timed below")
    timings = Timings(device, job.show, a.warmup, a.repeats)
    config = sf.PRESETS[a.preset]
    chunk_tflop = forward_flops(config, tokens, tokens) / 1e12
    video_tflop = video_flops(sf, config, video) / 1e12
    waited = time_videos(run, device, 0, a.video_repeats, wait_each=True) if device.type == "cuda" else None
    with torch.no_grad(), sf.attention_backends(device):
        # one forward of the first chunk through the forward the videos used, timed last, with the GPU busy
        # for seconds already (timed right after compilation, on an idle GPU, it reads high)
        one_forward = first_chunk_forward(job, model, text, job.options.graphs)
        ms = time_ms(one_forward, device, a.warmup, a.repeats)
        timings.add("chunk forward (empty cache)", ms, f"{chunk_tflop / ms * 1e3:6.1f} TFLOP/s of "
                    f"{chunk_tflop:.2f} TFLOP (median of {a.repeats})")
    timings.add("first chunk (4 steps)", first_s * 1e3, "from the call: incl. text K/V, cache set-up")
    timings.add("whole video", total_s * 1e3, f"{video_tflop / total_s:6.1f} TFLOP/s of {video_tflop:.1f} TFLOP "
                f"(median of {a.video_repeats})")
    if waited:
        timings.add("whole video, host waiting for each chunk", waited[2] * 1e3,
                    f"first chunk {waited[1] * 1e3:.1f} ms", versus="whole video")
    if job.show:
        peak = (f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
                if device.type == "cuda" else "")
        print(f"  frames per second {video.video_frames / total_s:.1f} ({video.video_frames} video frames, "
              f"latents){peak}")
    if a.profile and device.type == "cuda":
        with torch.no_grad(), sf.attention_backends(device):
            profiled = [("eager", first_chunk_forward(job, model, text, False))]
            profiled += [("CUDA graph", first_chunk_forward(job, model, text, True))] if job.options.graphs else []
            for label, fn in profiled:
                report_profile(label, host_and_kernel_ms(fn), job.mesh, a.profile_dir)


def time_videos(run, device, warmups, repeats, wait_each=False):
    """(warm-up seconds, median seconds to the first chunk, median seconds per video) of `repeats` drained
    streams run() after `warmups` untimed ones, on the device's timeline (time_stream)."""
    clock = Clock(device)
    for _ in range(warmups):
        list(run())
    warmup_s = clock.mark()
    marks = [time_stream(run(), device, wait_each)[1] for _ in range(repeats)]
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
        with open(os.path.join(folder, f"profile_{mesh.world_size}gpu_{label.replace(' ', '_')}.txt"), "w") as f:
            f.write(table_text)


def first_chunk_forward(job, model, text, graphs, timestep=1000.0):
    """A call running one forward of the video's first chunk (empty cache) on fixed random tokens, through
    what stream() uses (graphs: the same GraphedForward, kept across videos); its output is the flow."""
    sf, video, device = job.sf, job.video, job.device
    table = sf.video_rope_table(model, video, device)
    layout = sf.fused.ShardLayout(job.mesh, table, 0, video.chunk_frames)
    gen = torch.Generator(device).manual_seed(0)                       # the same tokens at every call
    x = torch.randn(1, layout.n_local, 4 * model.config.in_dim, device=device, generator=gen)
    t = torch.full((1, video.chunk_frames), timestep, device=device)
    options = dataclasses.replace(job.options, graphs=graphs)
    forward = sf.chunk_forward(model, job.mesh, table, 1, video.window_frames, options)
    forward.state.start(model.text_context(text.to(device)))
    return lambda: forward(x, t, layout)


def forward_flops(config, tokens, visible_keys):
    """Multiply-adds x 2 of one forward of a ModelConfig over `tokens` tokens attending to `visible_keys`
    keys: the linear layers (text K/V excluded: computed once per video), self- and cross-attention.
    Head and embeddings are ~0.1%."""
    linear = 2 * tokens * (6 * config.dim ** 2 + 2 * config.dim * config.ffn_dim)   # q k v o, cross q o, ffn
    attention = 4 * tokens * (visible_keys + config.text_len) * config.dim      # QK^T, PV: self + cross
    return config.num_layers * (linear + attention)


def video_flops(sf, config, video):
    """forward_flops of a whole video: 4 denoising passes per chunk, and a clean-context pass for all but the
    last (without a window: every chunk sees all earlier ones)."""
    n, total = video.chunk_frames * video.tokens_per_frame, 0
    for c in range(video.num_chunks):
        passes = len(sf.DENOISING_STEPS) + (c + 1 < video.num_chunks)
        total += passes * forward_flops(config, n, (c + 1) * n)
    return total


# ----------------------------------------------------------------------------- GPU verification

def verify_main(job):
    """On the GPU(s) of this job: CUDA-graph latents == eager latents, and (with several ranks) the job's
    latents == one GPU's (rank 0 runs the single-GPU reference alone while the others wait). Exits non-zero
    on failure. Runs bfloat16 and float32 whatever --dtype says."""
    a, sf, mesh, video, device = job.args, job.sf, job.mesh, job.video, job.device
    bf16, f32 = (sf.build_model(a.preset, d, device, a.seed) for d in (torch.bfloat16, torch.float32))
    text = load_text(a.text_embedding, bf16.config, 1, a.seed)
    run = lambda model, on, graphs: sf.generate(model, text, video, on, a.seed,
                                                sf.RunOptions(a.mode, graphs, a.graph_timeout))
    graph16, eager16 = run(bf16, mesh, True), run(bf16, mesh, False)
    graph32, eager32 = run(f32, mesh, True), run(f32, mesh, False)
    one16, one32 = graph16, graph32
    # one forward (first chunk, empty cache) both ways: shows whether a single pass already differs
    with torch.no_grad(), sf.attention_backends(device):
        flows = [first_chunk_forward(job, bf16, text, graphs, 937.5)().clone() for graphs in (True, False)]
    if mesh.world_size > 1:
        if mesh.rank == 0:
            one = sf.sp.SPMesh(1, 1, device, local=True)
            one16, one32 = run(bf16, one, True), run(f32, one, True)
        dist.barrier()
    if mesh.rank != 0:
        return
    # float32 shows that two ways compute the same function (1e-5: reordered sums over 14 forwards); in
    # bfloat16 a library may pick another kernel (another summation order) for a captured call, and 14
    # forwards of a random-weight model amplify that, so bfloat16 runs must only be no further apart than
    # bfloat16 is from float32
    bf16_noise = relative_rms(one16, one32)
    rows = [("one forward, CUDA graph vs eager, bfloat16", relative_rms(*flows), float("inf")),
            ("CUDA graph vs eager, float32", relative_rms(graph32, eager32), 1e-5),
            ("CUDA graph vs eager, bfloat16", relative_rms(graph16, eager16), bf16_noise)]
    if mesh.world_size > 1:
        rows += [(f"{mesh.world_size} GPUs vs 1 GPU, float32", relative_rms(graph32, one32), 1e-5),
                 (f"{mesh.world_size} GPUs vs 1 GPU, bfloat16", relative_rms(graph16, one16), bf16_noise)]
    rows.append(("(1 GPU: bfloat16 vs float32)", bf16_noise, float("inf")))
    print(f"06 --verify: {a.preset}, {mesh.world_size} x {torch.cuda.get_device_name()} (ulysses "
          f"{mesh.ulysses_degree} x ring {mesh.ring_degree}), {video.frames} latent frames at "
          f"{video.height}x{video.width}, exchange {sf.exchange_name(mesh)}; relative RMS of the latents")
    failed = [name for name, err, bound in rows if not err <= bound]
    for name, err, bound in rows:
        bound_text = f"(bound {bound:.1e})" if bound != float("inf") else ""
        print(f"  {name:<42s} {err:9.2e}   {bound_text}{'  FAILED' if name in failed else ''}")
    if failed:
        raise SystemExit(f"06 --verify failed: {failed}")


# ----------------------------------------------------------------------------- stage 07: frames

def add_decoder_flags(parser, dec):
    parser.add_argument("--decoder", choices=sorted(dec.DECODER_PRESETS), default=None,
                        help="the VAE decoder's shape (default: tiny for --preset tiny, else wan2.1)")
    parser.add_argument("--vae", help="Wan2.1_VAE.pth, or a diffusers release (or its vae/ folder): the decoder's "
                                      "weights (random when absent)")
    parser.add_argument("--decoder-dtype", choices=["bfloat16", "float32", "float64"], default=None,
                        help="default bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--video", help="also write the frames as they come to this mp4 (optional packages)")
    parser.add_argument("--overlap", action="store_true",
                        help="GPU: decode each chunk on a CUDA stream of its own, beside the DiT's next chunk")


def decoder_preset(args):
    return args.decoder or ("tiny" if args.preset == "tiny" else "wan2.1")


def decoder_dtype(job):
    return chosen_dtype(job.args.decoder_dtype, job.device)


def time_frames(job, model, text, vae, overlap, writer=None):
    """One video, chunk by chunk into frames: (the frames, host seconds from the call to each chunk's frames
    on the host, seconds to the end, the writer's last frame encoded). The host holds the frames at each
    mark, so a mark is a true latency whichever CUDA stream decoded them. The writer is closed at the end;
    what went wrong with it, if anything, is in writer.problem."""
    bands = job.dec.RowBands.for_job(job.video.latent_height, job.mesh)
    clock, frames, marks = Clock(job.device), [], []
    chunks = job.sf.stream(model, text, job.video, job.mesh, job.args.seed, job.options)
    for pixels in job.dec.decode_stream(job.dec.FrameDecoder(vae, bands), chunks, overlap):
        marks.append(clock.host_seconds())
        if writer:
            writer.write(pixels[0])
        frames.append(pixels)
    if writer:
        writer.problem = writer.close()
    return frames, marks, clock.host_seconds()


def frames_main(job, model, text, vae):
    """Stage 07's main job: the video's frames as they are made (after an untimed warm-up video on GPU), the
    first decoded frame's latency and the whole video's time, with the mp4 written as frames arrive."""
    a, mesh, video = job.args, job.mesh, job.video
    overlap = job.device.type == "cuda" and a.overlap
    warmup_s = warm_up(job, lambda: time_frames(job, model, text, vae, overlap))
    writer = extras.VideoWriter(a.video) if a.video and mesh.rank == 0 else None
    frames, marks, total = time_frames(job, model, text, vae, overlap, writer)
    pixels = torch.cat(frames, dim=2)                                          # [B, 3, T, H, W]
    save_on_rank_zero(job, lambda: {"frames": extras.to_uint8(pixels[0]), "fps": 16, "seed": a.seed,
                                    "preset": a.preset}, writer and writer.problem)
    if job.show:
        print(f"{stage_name(job.dec)}: {job.describe()}, decoder {decoder_preset(a)} ({vae.dtype}"
              f"{', overlapped on its own CUDA stream' if overlap else ''})")
        if warmup_s is not None:
            print(f"  warm-up (compile, CUDA graph capture, one untimed video) {warmup_s:.1f} s")
        print(f"  first decoded frame {marks[0] * 1e3:.1f} ms after the call, the first chunk's "
              f"{frames[0].shape[2] + frames[1].shape[2]} frames {marks[1] * 1e3:.1f} ms; "
              f"all {pixels.shape[2]} frames in {total:.3f} s -> {pixels.shape[2] / total:.1f} FPS, decoded "
              f"frames [{pixels.shape[2]}, {pixels.shape[3]}, {pixels.shape[4]}, 3] saved to {a.output}"
              f"{f', mp4 {a.video}' if writer else ''}")
    if a.preset == "tiny":    # cheap here: decoding the whole video in one call gives the same frames
        latents = job.sf.generate(model, text, video, mesh, a.seed, job.options)
        bands = job.dec.RowBands.for_job(video.latent_height, mesh)
        whole = job.dec.FrameDecoder(vae, bands)(latents).cpu()
        error = check("streamed vs whole decode", pixels, whole, tolerance(vae.dtype))
        if job.show:
            print(f"  streamed chunk by chunk vs the whole video decoded at once: max error {error:.1e}")
    compare_with_one_process(job, lambda one: one_process_frames(job, model, text, vae, one),
                             pixels[:, :, :4 * job.sf.CHUNK_FRAMES - 3], "frames")


def one_process_frames(job, model, text, vae, mesh):
    latents = job.sf.generate(model, text, first_chunk_video(job.sf, job.video), mesh, job.args.seed, job.options)
    return job.dec.FrameDecoder(vae, job.dec.RowBands(job.video.latent_height))(latents).cpu()


def frames_bench(job):
    """Stage 07 --bench: the DiT and the decoder, random weights (or --vae): decode per chunk, the first
    decoded frame from the call and the whole video end to end, with and without the overlap; bf16 pixels
    against float32's."""
    a, sf, dec, video, device, mesh = job.args, job.sf, job.dec, job.video, job.device, job.mesh
    model = sf.build_model(a.preset, job.dtype, device, a.seed)
    text = load_text(None, model.config, 1, a.seed).to(device)
    vae = dec.build_decoder(decoder_preset(a), decoder_dtype(job), device, a.seed, a.vae)
    bands = dec.RowBands.for_job(video.latent_height, mesh)
    gen = torch.Generator(device).manual_seed(a.seed)
    latents = torch.randn(1, 16, video.chunk_frames, video.latent_height, video.latent_width, device=device,
                          generator=gen)
    timings = Timings(device, job.show, a.warmup, a.repeats)
    if job.show:
        print(f"07 --bench: {job.describe()}, decoder {decoder_preset(a)} ({vae.dtype}, "
              f"{sum(p.numel() for p in vae.parameters()) / 1e6:.1f} M parameters), bands of rows "
              f"{[b - f for f, b in bands.bounds]}")
    fresh = lambda z: dec.FrameDecoder(vae, bands)(z)
    timings.add("decode the first chunk", time_ms(lambda: fresh(latents), device, a.warmup, min(a.repeats, 5)),
                f"{4 * video.chunk_frames - 3} frames, fresh time caches")
    timings.add("decode its first latent frame alone",
                time_ms(lambda: fresh(latents[:, :, :1]), device, a.warmup, min(a.repeats, 5)),
                "1 frame: the first a viewer sees")
    decoder = dec.FrameDecoder(vae, bands)
    decoder(latents)
    timings.time("decode a later chunk", lambda: decoder(latents), f"{4 * video.chunk_frames} frames")
    if not extras.missing(["diffusers"]) and mesh.world_size == 1 and a.vae is None and decoder_preset(a) == "wan2.1":
        diffusers_decode_rows(timings, latents, vae.dtype, device, a)
    clock = Clock(device)
    for _ in range(a.warmup_videos):
        for overlap in (False, True):
            time_frames(job, model, text, vae, overlap)
    if job.show:
        print(f"  warm-up ({a.warmup_videos} video(s) each way: compile, capture) {clock.mark():.1f} s, "
              "not timed below")
    for overlap in (False, True) if device.type == "cuda" else (False,):
        runs = [time_frames(job, model, text, vae, overlap) for _ in range(a.video_repeats)]
        first_s = statistics.median(marks[0] for _, marks, _ in runs)
        total_s = statistics.median(total for _, _, total in runs)
        how = "decode overlapped" if overlap else "decode after each chunk"
        timings.add(f"first decoded frame, {how}", first_s * 1e3, "from the call (text features given)")
        timings.add(f"whole video end to end, {how}", total_s * 1e3,
                    f"{video.video_frames / total_s:.1f} FPS in decoded frames (median of {a.video_repeats})")
    if job.show and device.type == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    if vae.dtype != torch.float32:   # the decoder's dtype against float32, on the same two chunks
        f32 = dec.build_decoder(decoder_preset(a), torch.float32, device, a.seed, a.vae)
        two = torch.randn(1, 16, 2 * video.chunk_frames, video.latent_height, video.latent_width, device=device,
                          generator=gen)
        ours, want = (torch.cat([dec.FrameDecoder(m, bands)(two[:, :, c:c + video.chunk_frames]).float()
                                 for c in (0, video.chunk_frames)], dim=2) for m in (vae, f32))
        if job.show:
            print(f"  pixels, {vae.dtype} vs float32 (2 chunks, values in [-1, 1]): max abs error "
                  f"{(ours - want).abs().max().item():.3e}, relative RMS {relative_rms(ours, want):.2e}, "
                  f"8-bit values that differ {(extras.to_uint8(ours[0]) != extras.to_uint8(want[0])).float().mean().item():.2%}")


def diffusers_decode_rows(timings, latents, dtype, device, args):
    """The baseline, where diffusers is installed: its AutoencoderKLWan (Wan2.1's configuration, random
    weights) decoding the same latents latent frame by latent frame with its feature cache, as its own
    decode() does, first chunk and a later one."""
    import diffusers
    vae = diffusers.AutoencoderKLWan().to(device, dtype).eval()
    stats = [torch.tensor(v, device=device, dtype=dtype).view(1, -1, 1, 1, 1)
             for v in (vae.config.latents_mean, vae.config.latents_std)]
    x = vae.post_quant_conv(latents.to(dtype) * stats[1] + stats[0])

    @torch.no_grad()
    def frames(first_chunk):
        if first_chunk:
            vae.clear_cache()
        out = []
        for i in range(x.shape[2]):
            vae._conv_idx = [0]
            out.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                   first_chunk=first_chunk and i == 0))
        return torch.cat(out, dim=2).clamp(-1, 1)
    timings.time(f"diffusers {diffusers.__version__}: decode the first chunk", lambda: frames(True),
                 versus="decode the first chunk")
    frames(True)
    timings.time(f"diffusers {diffusers.__version__}: decode a later chunk", lambda: frames(False),
                 versus="decode a later chunk")
