"""The stages' commands on input a CPU can show: bfloat16 runs, the real model stops with one line where
there is no GPU, Ctrl-C ends every rank with one line from rank 0 (exit code 130) and no half-written
output."""
import importlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from support import extras

sf = importlib.import_module("06_self_forcing_pipeline")
dec = importlib.import_module("07_vae_decoder")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def command(*argv, timeout=60):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=ENV)


def test_bfloat16_runs_on_the_cpu(tmp_path):
    proc = command("06_self_forcing_pipeline.py", "--dtype", "bfloat16", "--frames", "3",
                   "--output", str(tmp_path / "latents.pt"))
    assert proc.returncode == 0, proc.stderr
    assert torch.load(tmp_path / "latents.pt")["latents"].isfinite().all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="shows the machine without a GPU")
@pytest.mark.parametrize("argv, message", [
    (["--preset", "wan-1.3b"], "error: no GPU here: this CPU run needs about 949.9 TFLOP"),
    (["--preset", "wan-1.3b", "--height", "16", "--width", "16", "--frames", "3"],
     "error: no GPU here: --preset wan-1.3b is the real model, slow on a CPU; --allow-cpu runs it anyway"),
    (["--frames", "300", "--height", "512", "--width", "512"], "error: no GPU here: this CPU run needs about"),
    (["--exchange", "symm"], "error: --exchange symm needs GPUs"),
])
def test_a_run_too_big_for_the_cpu_stops_with_one_line(argv, message):
    proc = command("07_vae_decoder.py", *argv)
    assert proc.returncode == 2 and proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(message), proc.stderr


def test_a_frames_file_too_large_to_keep_is_refused_for_a_stream(capsys):
    with pytest.raises(SystemExit):
        dec.parser().parse_args(["--preset", "wan-1.3b", "--frames", "300", "--allow-cpu"])
    assert capsys.readouterr().err == ("error: --output out/frames.pt would hold 6.7 GiB in memory until the run "
                                       "ends (at most 4); a stream this long: --output none, with --video to write "
                                       "the frames as they come\n")
    dec.parser().parse_args(["--preset", "wan-1.3b", "--frames", "300", "--allow-cpu", "--output", "none"])


def test_more_ranks_than_latent_rows_is_a_bad_flag(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(SystemExit):
        dec.parser().parse_args(["--height", "16", "--width", "16", "--frames", "3"])
    assert "cannot feed 4 ranks" in capsys.readouterr().err


def interrupt(argv, tmp_path):
    """Start a long run, wait for its first line (set-up done, work starting), send SIGINT, wait for the end."""
    out = tmp_path / "frames.pt"
    proc = subprocess.Popen([*argv, "--frames", "60", "--height", "256", "--width", "256", "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
    assert proc.stdout.readline().startswith("note: this CPU run needs")
    time.sleep(1)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert not os.listdir(tmp_path), os.listdir(tmp_path)        # nothing written, not even a temporary file
    return proc.returncode, stderr.splitlines(), time.monotonic() - sent


def test_ctrl_c_ends_a_run_with_one_line(tmp_path):
    code, lines, seconds = interrupt([sys.executable, "07_vae_decoder.py"], tmp_path)
    assert code == 130 and lines == ["interrupted (Ctrl-C): stopped; tensor outputs are written whole or not at all"]
    assert seconds < 3


def test_ctrl_c_on_torchrun_ends_every_rank_with_one_line(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    code, lines, seconds = interrupt([*torchrun, "07_vae_decoder.py"], tmp_path)
    ours = [line for line in lines if not line.startswith(("W1", "E1", "I1"))]     # torchrun's log lines
    assert ours.count("interrupted (Ctrl-C): stopped; tensor outputs are written whole or not at all") == 1, lines
    assert not [line for line in lines if "07_vae_decoder.py" in line], lines     # no rank's traceback
    assert seconds < 5


def test_a_full_disk_stops_the_stream_at_once_with_one_line(monkeypatch, tmp_path):
    """The mp4 fails after its second write (ENOSPC): the stream stops at the next chunk, not at its end."""
    import errno
    from support import extras
    from support.harness import BadInput

    class FullDisk:
        writes = 0

        def __init__(self, path):
            self.path, self.count, self.error = path, 0, None

        def write(self, pixels):
            FullDisk.writes += 1
            self.count += pixels.shape[1]
            if FullDisk.writes == 2:
                self.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        failure = extras.VideoWriter.failure
    monkeypatch.setattr(extras, "VideoWriter", FullDisk)
    monkeypatch.setattr(extras, "extras_problem", lambda *args: None)       # as if imageio were installed
    with pytest.raises(BadInput) as info:
        dec.main(["--frames", "300", "--window-frames", "9", "--video", str(tmp_path / "v.mp4"), "--output", "none"])
    assert str(info.value) == (f"--video {tmp_path / 'v.mp4'}: writing failed ([Errno 28] No space left on device); "
                               "the file keeps the frames encoded before it (9)")
    assert FullDisk.writes == 2


def test_ctrl_c_during_a_stream_leaves_a_playable_mp4_of_what_was_made(tmp_path):
    """Two ranks streaming into an mp4, interrupted: one line says how many frames the file keeps, and it
    plays them."""
    pytest.importorskip("imageio_ffmpeg")
    import imageio.v3 as iio
    video = tmp_path / "stream.mp4"
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "07_vae_decoder.py", "--frames",
            "3000", "--window-frames", "12", "--sink-frames", "3", "--switch", "30", "--output", "none",
            "--video", str(video)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
    deadline = time.monotonic() + 60
    while not (video.exists() and video.stat().st_size > 20000) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    ours = [line for line in stderr.splitlines() if line.startswith("interrupted")]
    assert len(ours) == 1, stderr
    kept = int(ours[0].split("keeps the ")[1].split(" frames")[0])
    assert ours[0] == ("interrupted (Ctrl-C): stopped; tensor outputs are written whole or not at all; "
                       f"{video} keeps the {kept} frames made before the stop (playable)")
    time.sleep(1)                                   # the encoder finishes the file once the rank has gone
    assert kept >= 32 and iio.imread(video).shape[0] == kept


@pytest.mark.parametrize("stage", ["01_rope.py", "02_causal_attention.py", "03_sequence_parallel.py",
                                   "04_causal_rope_sp.py", "05_fused_comm.py"])
def test_every_stage_runs_its_self_check_and_answers_help(stage):
    assert command(stage, "--help").returncode == 0
    proc = command(stage)
    assert proc.returncode == 0 and "max error" in proc.stdout, proc.stderr


def test_a_video_that_is_not_an_mp4_is_a_bad_flag(capsys, monkeypatch):
    monkeypatch.setattr(extras, "missing", lambda packages: [])      # as where the optional packages are
    with pytest.raises(SystemExit):
        dec.parser().parse_args(["--video", "out/clip"])
    assert capsys.readouterr().err == ("error: --video out/clip: give a file name ending in .mp4 (a fragmented "
                                       "H.264 MP4 is written)\n")
