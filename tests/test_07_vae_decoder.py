"""Stage 07 properties: the causal decoder streamed chunk by chunk equals decoding the whole video; N ranks
decoding bands of rows equal one process; the decoder equals diffusers' AutoencoderKLWan; Wan2.1's and
diffusers' files load strictly."""
import importlib
import itertools
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given, strategies as st

from conftest import WORLD_SIZES
from rank_pool import RankError, get_pool
from support.harness import BadInput
from wan_vae_reference import decode as reference_decode

sp = importlib.import_module("03_sequence_parallel")
dec = importlib.import_module("07_vae_decoder")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXACT64 = 1e-12   # float64, the same convolutions over other batch shapes and row bands


def tiny_decoder(seed=0, dtype=torch.float64):
    vae = dec.build_decoder("tiny", dtype, "cpu", seed)
    for p in vae.parameters():     # gammas start at ones, biases at zero: make every weight matter
        torch.nn.init.normal_(p, std=0.3)
    return vae


def latents(frames, rows, columns, seed, batch=1):
    return torch.randn(batch, 16, frames, rows, columns, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(seed))


def decode_in_chunks(vae, z, sizes, bands=None, forget=False, graphs=None):
    """Decode z chunk by chunk (`sizes` latent frames each), keeping the time caches unless `forget`."""
    bands = bands or dec.RowBands(z.shape[3])
    decoder, out, first = dec.FrameDecoder(vae, bands, graphs), [], 0
    for size in sizes:
        if forget:
            decoder = dec.FrameDecoder(vae, bands)
        out.append(decoder(z[:, :, first:first + size]))
        first += size
    return torch.cat(out, dim=2)


def chunk_sizes(draw, frames):
    cuts = sorted(draw(st.sets(st.integers(1, frames - 1), max_size=frames - 1))) if frames > 1 else []
    return [b - a for a, b in zip([0, *cuts], [*cuts, frames])]


@given(data=st.data(), frames=st.integers(1, 7), rows=st.integers(1, 4), columns=st.integers(1, 5),
       seed=st.integers(0, 2**31), batch=st.integers(1, 2))
def test_streamed_chunk_by_chunk_equals_the_whole_video(data, frames, rows, columns, seed, batch):
    vae, z = tiny_decoder(seed % 7), latents(frames, rows, columns, seed, batch)
    whole = decode_in_chunks(vae, z, [frames])
    assert whole.shape == (batch, 3, 4 * frames - 3, 8 * rows, 8 * columns)
    sizes = chunk_sizes(data.draw, frames)
    torch.testing.assert_close(decode_in_chunks(vae, z, sizes), whole, rtol=0, atol=EXACT64)
    torch.testing.assert_close(decode_in_chunks(vae, z, [1] * frames), whole, rtol=0, atol=EXACT64)


@given(data=st.data(), frames=st.integers(1, 6), rows=st.integers(1, 3), columns=st.integers(1, 4),
       seed=st.integers(0, 2**31))
def test_streamed_frames_equal_an_independent_whole_video_decoder(data, frames, rows, columns, seed):
    """Against tests/wan_vae_reference.py, written from Wan2.1's definition (channels first, padded, nearest
    2x then a 3x3 convolution), the whole video at once."""
    vae, z = tiny_decoder(seed % 5), latents(frames, rows, columns, seed)
    want = reference_decode(vae.state_dict(), vae.config, z)
    got = decode_in_chunks(vae, z, chunk_sizes(data.draw, frames))
    assert 0.05 < (want.abs() < 1).double().mean()                   # not all clamped
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_a_chunk_that_forgets_the_time_cache_is_caught():
    """The planted bug: each chunk decoded with fresh time caches (and its first frame treated as the
    video's first). The comparison above must see it."""
    vae, z = tiny_decoder(), latents(6, 2, 3, 0)
    whole = decode_in_chunks(vae, z, [6])
    assert (decode_in_chunks(vae, z, [3, 3], forget=True)[:, :, -12:] - whole[:, :, -12:]).abs().max() > 1e-2


def test_a_restarted_cache_decodes_a_new_video_as_a_fresh_one():
    """CUDA graphs keep one cache dict across videos: restart() must zero the time caches in place, combine
    the phase weights again (here the weights change between videos) and mark the video not begun."""
    vae, first, second = tiny_decoder(), latents(5, 2, 3, 0), latents(4, 2, 3, 1)
    decoder = dec.FrameDecoder(vae, dec.RowBands(2))
    decoder(first[:, :, :2])
    decoder(first[:, :, 2:])
    kept = {key: value for key, value in decoder.cache.items() if isinstance(value, torch.Tensor)}
    with torch.no_grad():
        for p in vae.parameters():
            p.mul_(1.1)
    dec.restart(decoder.cache)
    got = torch.cat([decoder(second[:, :, :1]), decoder(second[:, :, 1:])], dim=2)
    torch.testing.assert_close(got, decode_in_chunks(vae, second, [1, 3]), rtol=0, atol=0)
    assert all(decoder.cache[key] is value for key, value in kept.items())      # the same storage


def test_first_latent_frame_gives_one_frame_and_every_later_gives_four():
    vae = tiny_decoder()
    assert [decode_in_chunks(vae, latents(f, 1, 1, 0), [f]).shape[2] for f in (1, 2, 3, 21)] == [1, 5, 9, 81]


@given(frames=st.integers(1, 3), rows=st.integers(1, 4), columns=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_the_upsampling_conv_equals_2x_nearest_then_its_3x3_conv(frames, rows, columns, seed):
    """The resample conv runs on the grid before 2x, an output channel per pixel phase: it equals its
    definition (Wan2.1's nn.Upsample, nearest, then nn.Conv2d)."""
    torch.manual_seed(seed)
    layer = dec.Resample(6, "upsample2d").double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 6, frames, rows, columns, dtype=torch.float64)
    conv = layer.resample[1]
    up = x.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
    want = torch.nn.functional.conv3d(up, conv.weight[:, :, None], conv.bias, padding=(0, 1, 1))
    torch.testing.assert_close(layer(x, {}, dec.RowBands(rows)), want, rtol=0, atol=EXACT64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton passes run on a GPU")
@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 2**-7), (torch.float32, 1e-5)])
def test_the_gpu_passes_equal_their_torch_formulas(dtype, tolerance):
    """Norm + SiLU into a view of a padded buffer (with a shift), bias + residual: as on the CPU, to one
    rounding of the output; nothing written outside the view."""
    cl = torch.channels_last_3d
    for C, rows in ((96, 0), (192, 1), (384, 1)):
        x = (torch.randn(1, C, 3, 6, 10, device="cuda", dtype=dtype) * 3).contiguous(memory_format=cl)
        gamma, shift = torch.rand(C, 1, 1, 1, device="cuda", dtype=dtype) + 0.5, torch.randn_like(x[0, :, 0, 0, 0])
        buffer = torch.zeros(1, C, 5, 6 + 2 * rows, 10, device="cuda", dtype=dtype).contiguous(memory_format=cl)
        dec.norm_silu_into(buffer[:, :, 2:, rows:rows + 6], x, gamma, shift)
        want = torch.nn.functional.silu(dec.rms_norm(x + shift.view(-1, 1, 1, 1), gamma))
        torch.testing.assert_close(buffer[:, :, 2:, rows:rows + 6], want, rtol=tolerance, atol=tolerance)
        assert buffer[:, :, :2].abs().max() == 0 and buffer[:, :, 2:, :rows].abs().sum() == 0
        residual, bias = torch.randn_like(x), torch.randn_like(shift)
        assert torch.equal(dec.add_bias(x.clone(), bias, residual), (x + bias.view(-1, 1, 1, 1)) + residual)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a host wait exists only with a GPU")
def test_a_later_chunk_never_waits_for_the_gpu():
    """Decoding a chunk after the first makes no blocking copy or sync (one would stall the host, and
    the pipeline behind it, every chunk); a copy of host data fails here."""
    vae, bands = dec.build_decoder("tiny", torch.bfloat16, "cuda", 0), dec.RowBands(4)
    decoder, z = dec.FrameDecoder(vae, bands), torch.randn(1, 16, 6, 4, 6, device="cuda")
    decoder(z[:, :, :3])
    torch.cuda.set_sync_debug_mode("error")
    try:
        decoder(z[:, :, 3:])
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_videos_equal_eager_ones_bit_for_bit(dtype):
    """Three videos on one DecoderGraphs (eager and capture in the first, replays after), on a side stream
    with cuDNN's search on, as the pipeline runs them; the last replay makes no host wait. A decoder whose
    video a newer one restarted is refused; another frame size, and back, makes new graphs."""
    torch.manual_seed(0)
    vae, bands = dec.build_decoder("tiny", dtype, "cuda", 0), dec.RowBands(4)
    benchmark = torch.backends.cudnn.benchmark
    for p in vae.parameters():
        torch.nn.init.normal_(p, std=0.3)
    graphs, side, sizes = dec.DecoderGraphs(vae), torch.cuda.Stream(), [1, 2, 3, 3, 1]
    torch.backends.cudnn.benchmark = True
    try:
        with torch.cuda.stream(side):
            for seed in range(3):
                gen = torch.Generator("cuda").manual_seed(seed)
                z = torch.randn(1, 16, sum(sizes), 4, 6, device="cuda", dtype=dtype, generator=gen)
                want = decode_in_chunks(vae, z, sizes)
                decoder, got = dec.FrameDecoder(vae, bands, graphs), []
                for first, size in zip(itertools.accumulate([0, *sizes]), sizes):
                    torch.cuda.set_sync_debug_mode("error" if seed == 2 and first > 0 else 0)
                    got.append(decoder(z[:, :, first:first + size]))
                torch.cuda.set_sync_debug_mode(0)
                assert torch.equal(torch.cat(got, dim=2), want)
            dec.FrameDecoder(vae, bands, graphs)
            with pytest.raises(RuntimeError, match="one video at a time"):
                decoder(z[:, :, :1])
            for rows in (3, 4):                           # another frame size, and back: new graphs each time
                z = torch.randn(1, 16, 4, rows, 6, device="cuda", dtype=dtype, generator=gen)
                want = decode_in_chunks(vae, z, [1, 3], dec.RowBands(rows))
                got = decode_in_chunks(vae, z, [1, 3], dec.RowBands(rows), graphs=graphs)
                assert torch.equal(got, want)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        torch.backends.cudnn.benchmark = benchmark


def run_sharded(frames, rows, columns, seed, sizes, broken=False):
    """On every rank: the video decoded chunk by chunk in bands of rows over all the job's ranks."""
    mesh = sp.SPMesh.get(sp.world()[0], 1)
    bands = (BrokenHalo if broken else dec.RowBands).for_job(rows, mesh)
    return decode_in_chunks(tiny_decoder(seed % 5), latents(frames, rows, columns, seed), sizes, bands)


class BrokenHalo(dec.RowBands):
    """A planted off-by-one: the neighbours get the row next to the edge row instead of the edge row."""

    def halo(self, x, rows=1):
        if x.shape[3] < 2:
            return super().halo(x, rows)
        sent = x.clone()
        sent[:, :, :, 0], sent[:, :, :, -1] = x[:, :, :, 1], x[:, :, :, -2]
        out = super().halo(sent, rows)
        out[:, :, :, rows:-rows] = x                   # this rank's own rows stay right
        return out


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@given(data=st.data(), frames=st.integers(1, 6), extra_rows=st.integers(0, 3), columns=st.integers(1, 4),
       seed=st.integers(0, 2**31))
def test_bands_on_n_ranks_equal_one_process(world_size, data, frames, extra_rows, columns, seed):
    """Uneven bands down to one latent row per rank (eight output rows), several chunks."""
    rows = world_size + extra_rows
    sizes = chunk_sizes(data.draw, frames)
    want = decode_in_chunks(tiny_decoder(seed % 5), latents(frames, rows, columns, seed), [frames])
    for got in get_pool(world_size).run(run_sharded, frames, rows, columns, seed, sizes):
        torch.testing.assert_close(got, want, rtol=0, atol=EXACT64)


def test_an_off_by_one_halo_is_caught():
    want = decode_in_chunks(tiny_decoder(3), latents(3, 5, 3, 3), [3])
    for got in get_pool(2).run(run_sharded, 3, 5, 3, 3, [3], broken=True):
        assert (got - want).abs().max() > 1e-3


def test_fewer_rows_than_ranks_is_one_line_on_every_rank():
    with pytest.raises(RankError) as info:
        get_pool(4).run(run_sharded, 1, 3, 2, 0, [1])
    messages = info.value.messages
    assert len(set(messages.values())) == 1, messages
    assert "3 latent rows cannot feed 4 ranks (a height of at least 32 pixels can)" in messages[0]


def test_the_names_are_wan21s_and_the_size_is_the_release():
    names = set(dec.WanVAEDecoder(dec.DECODER_PRESETS["wan2.1"]).state_dict())
    for name in ["conv2.weight", "decoder.conv1.bias", "decoder.middle.0.residual.0.gamma",
                 "decoder.middle.1.to_qkv.weight", "decoder.middle.2.residual.6.weight",
                 "decoder.upsamples.3.time_conv.weight", "decoder.upsamples.3.resample.1.weight",
                 "decoder.upsamples.4.shortcut.weight", "decoder.upsamples.11.resample.1.bias",
                 "decoder.upsamples.14.residual.6.weight", "decoder.head.0.gamma", "decoder.head.2.weight"]:
        assert name in names, name
    assert "decoder.upsamples.11.time_conv.weight" not in names and "decoder.upsamples.15.residual.0.gamma" not in names
    count = sum(p.numel() for p in dec.WanVAEDecoder(dec.DECODER_PRESETS["wan2.1"]).parameters())
    assert count == 73_295_603


def test_a_wan21_vae_file_loads_strictly_without_its_encoder(tmp_path):
    source = tiny_decoder(1)
    state = {**source.state_dict(), "encoder.conv1.weight": torch.zeros(1), "conv1.bias": torch.zeros(1)}
    torch.save(state, tmp_path / "Wan2.1_VAE.pth")
    loaded = dec.build_decoder("tiny", torch.float64, "cpu", 2, str(tmp_path / "Wan2.1_VAE.pth"))
    for name, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    state.pop("decoder.middle.1.proj.bias")
    state["decoder.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(BadInput, match=r"missing key decoder\.middle\.1\.proj\.bias; unexpected key decoder\.extra"):
        dec.build_decoder("tiny", torch.float64, "cpu", 2, str(tmp_path / "bad.pth"))


def test_the_decoder_equals_diffusers_autoencoder_kl_wan(tmp_path, monkeypatch):
    """Against diffusers' own decoder (skipped without diffusers), from its own saved release folder, in
    float64. diffusers upsamples through float32 (a cast for bfloat16's sake); nearest-neighbour upsampling
    only copies values, so for this comparison its upsampler runs in the input's dtype."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.autoencoders import autoencoder_kl_wan
    monkeypatch.setattr(autoencoder_kl_wan.WanUpsample, "forward", torch.nn.Upsample.forward)
    torch.manual_seed(0)
    theirs = diffusers.AutoencoderKLWan(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1).double().eval()
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.3)
    theirs.save_pretrained(tmp_path / "release" / "vae")
    ours = dec.build_decoder("tiny", torch.float64, "cpu", 1, str(tmp_path / "release"))
    z = latents(5, 4, 6, 0)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1, 1)
                 for v in (theirs.config.latents_mean, theirs.config.latents_std))
    with torch.no_grad():
        want = theirs.decode(z * std + mean, return_dict=False)[0]
    torch.testing.assert_close(decode_in_chunks(ours, z, [3, 2]), want, rtol=0, atol=EXACT64)


def test_the_command_decodes_the_stream_into_frames(tmp_path):
    out = tmp_path / "frames.pt"
    proc = subprocess.run([sys.executable, "07_vae_decoder.py", "--frames", "6", "--height", "32", "--width", "48",
                           "--dtype", "float64", "--decoder-dtype", "float64", "--output", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].startswith("  first decoded frame ") and "the first chunk's 9 frames" in lines[1], lines
    assert "; all 21 frames in " in lines[1], lines
    assert float(lines[2].split("max error ")[1]) < EXACT64, lines
    saved = torch.load(out)["frames"]
    assert saved.shape == (21, 32, 48, 3) and saved.dtype == torch.uint8


def test_frames_go_into_an_mp4_as_they_come(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    import imageio.v3 as iio
    from support.extras import VideoWriter
    writer = VideoWriter(str(tmp_path / "clip.mp4"))
    for t in (9, 12):
        writer.write(torch.rand(3, t, 16, 32) * 2 - 1)
    writer.close()
    assert writer.count == 21 and iio.imread(tmp_path / "clip.mp4").shape == (21, 16, 32, 3)



def test_an_mp4_cut_off_mid_stream_plays_every_second_written_before(tmp_path):
    """The writer and its encoder killed (SIGKILL: nothing gets to close the file) after 96 frames: the
    fragmented mp4 still opens and holds the frames of its finished fragments."""
    pytest.importorskip("imageio_ffmpeg")
    import imageio.v3 as iio
    code = ("import sys, time, torch\nfrom support.extras import VideoWriter\n"
            f"writer = VideoWriter({str(tmp_path / 'cut.mp4')!r})\n"
            "for _ in range(8):\n    writer.write(torch.rand(3, 12, 32, 48) * 2 - 1)\n"
            "while writer.count < 96:\n    time.sleep(0.05)\n"
            "print('written', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"
    time.sleep(1)
    encoders = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert encoders                                      # ffmpeg runs in a process group of its own
    for pid in [*encoders, proc.pid]:
        os.kill(int(pid), signal.SIGKILL)
    proc.wait()
    assert iio.imread(tmp_path / "cut.mp4").shape[0] >= 64          # 4 of the 6 one-second fragments, at least
