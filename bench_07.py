"""Times stage 07 at a preset's full shapes, random weights (or --checkpoint, --vae): decoding a chunk (the
first, its first latent frame alone, a later one), the first decoded frame from the call and the whole
video end to end, with and without the decode overlapped on its own CUDA stream; the decoder's pixels
against float32's; diffusers' AutoencoderKLWan on the same latents where diffusers is installed.

Uses
    06_self_forcing_pipeline: set_up, build_job_model, finish
    07_vae_decoder: parser, decoder_preset, build_job_decoder, RowBands, FrameDecoder, job_graphs, time_frames

Run
    python bench_07.py --preset wan-1.3b --video-repeats 5                        one GPU
    torchrun --nproc_per_node=2 bench_07.py --preset wan-1.3b                     bands of 30 latent rows
"""
import importlib
import statistics

import torch

from bench_06 import add_timing_flags
from support import extras
from support.harness import run_main
from support.timing import Clock, Timings, relative_rms, time_ms
from support.weights import load_text

sf = importlib.import_module("06_self_forcing_pipeline")
dec = importlib.import_module("07_vae_decoder")


def main(argv=None):
    p = dec.parser()
    p.description = __doc__
    add_timing_flags(p)
    run = sf.set_up(p.parse_args(argv), "bench_07", needs_gpus="bench_07.py")
    a, video, device, mesh = run.args, run.video, run.device, run.mesh
    model = sf.build_job_model(run)
    text = load_text(None, model.config, 1, a.seed).to(device)
    vae = dec.build_job_decoder(run)
    bands = dec.RowBands.for_job(video.latent_height, mesh)
    gen = torch.Generator(device).manual_seed(a.seed)
    latents = torch.randn(1, 16, video.chunk_frames, video.latent_height, video.latent_width, device=device,
                          generator=gen)
    timings = Timings(device, run.show, a.warmup, a.repeats)
    if run.show:
        print(f"bench_07: {run.describe()}, decoder {dec.decoder_preset(a)} ({vae.dtype}, "
              f"{sum(p.numel() for p in vae.parameters()) / 1e6:.1f} M parameters), bands of rows "
              f"{[b - f for f, b in bands.bounds]}")
    graphs = dec.job_graphs(run, vae, bands)
    ways = ((" (CUDA graphs)", graphs), (" (eager)", None)) if graphs else (("", None),)
    for how, store in ways:
        time_chunks(timings, video, vae, bands, store, latents, how)
        if store is not None:
            store.drop()                               # their memory back for the eager runs and videos
    wan21 = a.vae is None and dec.decoder_preset(a) == "wan2.1"
    if not extras.missing(["diffusers"]) and mesh.world_size == 1 and wan21:
        diffusers_decode_rows(timings, latents, vae.dtype, device, ways[0][0])
    time_videos(run, timings, model, text, vae)
    if vae.dtype != torch.float32:   # the decoder's dtype against float32, on the same two chunks
        two = torch.randn(1, 16, 2 * video.chunk_frames, video.latent_height, video.latent_width,
                          device=device, generator=gen)
        ours, want = (torch.cat([dec.FrameDecoder(m, bands)(two[:, :, c:c + video.chunk_frames]).float()
                                 for c in (0, video.chunk_frames)], dim=2)
                      for m in (vae, dec.build_job_decoder(run, torch.float32)))
        differ = (extras.to_uint8(ours[0]) != extras.to_uint8(want[0])).float().mean().item()
        if run.show:
            print(f"  pixels, {vae.dtype} vs float32 (2 chunks, values in [-1, 1]): max abs error "
                  f"{(ours - want).abs().max().item():.3e}, relative RMS {relative_rms(ours, want):.2e}, "
                  f"8-bit values that differ {differ:.2%}")
    sf.finish(a.graph_timeout)


def time_chunks(timings, video, vae, bands, graphs, latents, how):
    """A fresh video's first chunk, its first latent frame alone, a later chunk."""
    device, warmup, repeats = latents.device, timings.warmup, min(timings.repeats, 5)
    fresh = lambda z: dec.FrameDecoder(vae, bands, graphs)(z)
    timings.add(f"decode the first chunk{how}",
                time_ms(lambda: fresh(latents), device, warmup, repeats),
                f"{4 * video.chunk_frames - 3} frames, fresh time caches")
    timings.add(f"decode its first latent frame alone{how}",
                time_ms(lambda: fresh(latents[:, :, :1]), device, warmup, repeats),
                "1 frame: the first a viewer sees")
    decoder = dec.FrameDecoder(vae, bands, graphs)
    decoder(latents)
    timings.time(f"decode a later chunk{how}", lambda: decoder(latents), f"{4 * video.chunk_frames} frames")


def time_videos(run, timings, model, text, vae):
    """The first decoded frame from the call and the whole video end to end, decoding after each chunk and
    (GPU) overlapped, after untimed warm-up videos each way."""
    a, device = run.args, run.device
    clock = Clock(device)
    for _ in range(a.warmup_videos):
        for overlap in (False, True):
            dec.time_frames(run, model, text, vae, overlap, run.video)
    if run.show:
        print(f"  warm-up ({a.warmup_videos} video(s) each way: compile, capture) {clock.mark():.1f} s, "
              "not timed below")
    for overlap in (False, True) if device.type == "cuda" else (False,):
        runs = [dec.time_frames(run, model, text, vae, overlap, run.video) for _ in range(a.video_repeats)]
        first_s = statistics.median(marks[0] for _, marks, _ in runs)
        total_s = statistics.median(total for _, _, total in runs)
        how = "decode overlapped" if overlap else "decode after each chunk"
        timings.add(f"first decoded frame, {how}", first_s * 1e3, "from the call (text features given)")
        timings.add(f"whole video end to end, {how}", total_s * 1e3,
                    f"{run.video.video_frames / total_s:.1f} FPS in decoded frames (median of "
                    f"{a.video_repeats})")
    if run.show and device.type == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def diffusers_decode_rows(timings, latents, dtype, device, how):
    """The baseline: diffusers' AutoencoderKLWan (Wan2.1's configuration, random weights) decoding the same
    latents latent frame by latent frame with its feature cache, as its own decode() does."""
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
                 versus=f"decode the first chunk{how}")
    frames(True)
    timings.time(f"diffusers {diffusers.__version__}: decode a later chunk", lambda: frames(False),
                 versus=f"decode a later chunk{how}")


if __name__ == "__main__":
    run_main(main)
