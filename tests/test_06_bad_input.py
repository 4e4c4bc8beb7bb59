"""Bad input to stage 06 ends every rank with one line, before any work; nothing is left behind."""
import importlib
import os
import stat
import subprocess
import sys

import pytest
import torch

from rank_pool import RankError, get_pool
from support import extras, files

sp = importlib.import_module("03_sequence_parallel")
sf = importlib.import_module("06_self_forcing_pipeline")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("argv, message", [
    (["--height", "0"], "argument --height: expected a positive integer, got '0'"),
    (["--height", "-16"], "argument --height: expected a positive integer, got '-16'"),
    (["--ring", "0"], "argument --ring: expected a positive integer, got '0'"),
    (["--height", "40"], "--height 40 must be a multiple of 16"),
    (["--frames", "7"], "--frames 7 must be a multiple of 3"),
    (["--window-frames", "2"], "--window-frames 2 must be >= --sink-frames 0 + 3"),
    (["--window-frames", "6", "--sink-frames", "6"], "--window-frames 6 must be >= --sink-frames 6 + 3"),
    (["--sink-frames", "2"], "--sink-frames 2 must be whole chunks: a multiple of 3"),
    (["--switch", "0"], "argument --switch: expected FRAME or FRAME=FILE with a latent frame >= 1, got '0'"),
    (["--switch", "9="], "argument --switch: expected FRAME or FRAME=FILE"),
    (["--switch", "x=a.pt"], "argument --switch: expected FRAME or FRAME=FILE"),
    (["--switch", "9", "--switch", "6"], "--switch frames must increase, got 9 then 6"),
    (["--switch", "4", "--switch", "5"], "--switch frames 4 and 5 would both begin with the chunk at frame 6"),
    (["--prompt", "a fox", "--wan-folder", "w", "--switch", "9"], "--switch with --prompt takes FRAME=TEXT"),
    (["--frames", "12000", "--preset", "wan-1.3b", "--allow-cpu"],
     "--output out/latents.pt would hold 4.5 GiB in memory until the run ends (at most 4); a stream this long: "
     "--output none"),
    (["--graph-timeout", "0"], "--graph-timeout must be a number of seconds from 1 to 1000000"),
    (["--graph-timeout", "inf"], "--graph-timeout must be a number of seconds from 1 to 1000000"),
    (["--seed", str(2**64)], f"--seed {2**64} is too large"),
    (["--output", ""], "--output is empty"),
    (["--wan-folder", "x"], "--wan-folder is read only with --prompt"),
    (["--use-ema"], "--use-ema picks the EMA weights of a --checkpoint: give one"),
    (["--switch", "40"], "--switch 40 is past the video's last latent frame, 20"),
    (["--rebuild-sink"], "--rebuild-sink rebuilds the sink at a switch: it needs --sink-frames"),
    (["--prompt", "a fox", "--text-embedding", "t.pt"], "give --prompt or --text-embedding, not both"),
    (["--attention", "flash-attn-4", "--mode", "unfused"], "--attention flash-attn-4 runs in --mode fused"),
])
def test_a_bad_flag_is_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        sf.parser().parse_args(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="here a GPU may run it")
@pytest.mark.parametrize("argv", [["--attention", "flash-attn-4"], ["--attention", "flash-attn-4", "--dtype",
                                                                     "float32", "--preset", "wan-1.3b"]])
def test_flash_attention_4_without_a_hopper_gpu_is_one_line(argv, capsys):
    with pytest.raises(SystemExit) as info:
        sf.parser().parse_args(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "--attention flash-attn-4 needs a Hopper" in err


def test_flash_attention_4_refuses_what_it_cannot_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *device: (9, 0))
    assert "not torch.float32 heads of 128" in extras.flash_attention_4_problem(torch.float32, 128)
    assert "not torch.bfloat16 heads of 12" in extras.flash_attention_4_problem(torch.bfloat16, 12)
    problem = extras.flash_attention_4_problem(torch.bfloat16, 128)
    assert problem is None or "pip install flash-attn-4" in problem


def test_a_ring_that_does_not_fit_the_ranks_names_the_choices(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        sf.parser().parse_args(["--ring", "3"])
    assert "--ring 3 does not fit 2 rank(s)" in capsys.readouterr().err


def bad_files(tmp):
    os.makedirs(tmp, exist_ok=True)
    files = {"garbage": os.path.join(tmp, "garbage.pt"), "empty": os.path.join(tmp, "empty.pt"),
             "dict": os.path.join(tmp, "dict.pt"), "folder": os.path.join(tmp, "folder"),
             "under_a_file": os.path.join(tmp, "garbage.pt", "latents.pt")}
    with open(files["garbage"], "w") as f:
        f.write("not a checkpoint")
    open(files["empty"], "w").close()
    torch.save({"a": torch.zeros(2)}, files["dict"])
    os.makedirs(files["folder"], exist_ok=True)
    return files


def read_inputs_on_rank(overrides):
    """Stage 06's input checks on this rank, with the default flags except `overrides`."""
    args = sf.parser().parse_args([])
    vars(args).update(overrides)
    sf.read_inputs(sf.Run("06_self_forcing_pipeline", args, sf.video_spec(args), torch.device("cpu"),
                          sp.SPMesh.get(2, 1), torch.float32, sf.RunOptions(graphs=False)))
    return "ok"


@pytest.mark.parametrize("what, overrides, message", [
    ("garbage checkpoint", {"checkpoint": "garbage"}, "garbage.pt: not a torch checkpoint (torch.load raised"),
    ("empty checkpoint", {"checkpoint": "empty"}, "empty.pt: not a torch checkpoint (torch.load raised EOFError)"),
    ("missing checkpoint", {"checkpoint": "missing"}, "missing.pt: no such file"),
    ("text is a dict", {"text_embedding": "dict"}, "dict.pt holds a dict; expected a tensor [L, 32]"),
    ("text is garbage", {"text_embedding": "garbage"}, "garbage.pt: not a torch tensor file"),
    ("output is a folder", {"output": "folder"}, "folder is a directory; give a file name"),
    ("output under a file", {"output": "under_a_file"}, "cannot create a file under"),
])
def test_bad_files_stop_every_rank_with_the_same_line(tmp_path, what, overrides, message):
    files = bad_files(str(tmp_path))
    files["missing"] = str(tmp_path / "missing.pt")
    with pytest.raises(RankError) as info:
        get_pool(2).run(read_inputs_on_rank, {k: files[v] for k, v in overrides.items()})
    messages = info.value.messages
    assert sorted(messages) == [0, 1] and len(set(messages.values())) == 1, messages
    assert messages[0].startswith("BadInput: 06_self_forcing_pipeline: rank 0: ") and message in messages[0], messages
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_the_command_prints_one_line_and_no_traceback(tmp_path):
    garbage = bad_files(str(tmp_path))["garbage"]
    proc = subprocess.run([sys.executable, "06_self_forcing_pipeline.py", "--checkpoint", garbage,
                           "--output", str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: --checkpoint {garbage}: not a torch checkpoint (torch.load raised "
                                        "UnpicklingError)"], proc.stderr
    assert not (tmp_path / "out.pt").exists()


def test_a_special_file_is_written_in_place(tmp_path):
    files.save({"latents": torch.zeros(1)}, os.devnull)
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    files.save({"latents": torch.ones(1)}, str(tmp_path / "a" / "latents.pt"))
    assert torch.load(tmp_path / "a" / "latents.pt")["latents"].item() == 1 and os.listdir(tmp_path / "a") == ["latents.pt"]


def test_a_cpu_run_far_beyond_the_tiny_preset_says_so():
    assert sf.cpu_estimate(sf.PRESETS["tiny"], sf.VideoSpec(21, 64, 96))[0] is None
    line, minutes = sf.cpu_estimate(sf.PRESETS["wan-1.3b"], sf.VideoSpec(21, 480, 832))
    assert line.startswith("this CPU run needs about") and "TFLOP" in line and "GiB" in line and minutes > 100


def test_a_misspelt_setting_is_an_error_not_a_default():
    """The settings are dataclasses: an unknown name fails at once instead of being dropped."""
    with pytest.raises(TypeError, match="text_lenght"):
        sf.ModelConfig(dim=48, ffn_dim=96, num_heads=4, num_layers=2, text_lenght=16)
    with pytest.raises(TypeError, match="window"):
        sf.VideoSpec(6, 32, 32, window=6)
    assert sf.VideoSpec(6, 32, 48, window_frames=3).grid == (6, 2, 3)
