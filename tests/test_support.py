"""The support package's rules that the CPU can show: where a rank runs, outputs tried before the run and
never lost after it, and device-timeline clocks."""
import ast
import errno
import glob
import os
import re
import subprocess
import sys

import pytest
import torch

from support import files
from support.harness import BadInput, choose_device
from support.timing import Clock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("ranks, gpus, rank, needs, device, note", [
    (1, 0, 0, None, "cpu", None),
    (8, 0, 3, "--bench", "cpu", None),                # no GPU at all: everything runs on the CPU
    (1, 1, 0, None, "cuda:0", None),
    (2, 8, 1, "--bench", "cuda:1", None),
    (8, 8, 7, None, "cuda:7", None),
    (8, 1, 5, None, "cpu", "note: 8 ranks on this node but 1 GPU(s): every rank runs on the CPU (gloo); "
                           "--nproc_per_node=1 or fewer puts one rank on each GPU"),
    (3, 2, 0, None, "cpu", "note: 3 ranks on this node but 2 GPU(s)"),
])
def test_where_a_rank_runs(ranks, gpus, rank, needs, device, note):
    got, got_note = choose_device(ranks, gpus, rank, needs)
    assert got == torch.device(device)
    assert (got_note is None) if note is None else got_note.startswith(note)


@pytest.mark.parametrize("needs", ["--bench", "--verify", "--preset wan-1.3b"])
def test_a_run_that_needs_the_gpus_stops_when_they_are_too_few(needs):
    with pytest.raises(BadInput) as info:
        choose_device(8, 1, 0, needs)
    assert str(info.value) == (f"{needs} needs one GPU per rank: 8 ranks on this node but 1 GPU(s); "
                               "run torchrun --nproc_per_node=1 (or fewer)")


def test_an_output_is_tried_by_creating_it(tmp_path):
    assert files.output_problem(str(tmp_path / "new" / "deeper" / "x.pt")) is None
    assert os.listdir(tmp_path) == []                              # nothing left behind, not even folders
    existing = tmp_path / "kept.pt"
    existing.write_bytes(b"abc")
    assert files.output_problem(str(existing)) is None and existing.read_bytes() == b"abc"
    assert "is a directory" in files.output_problem(str(tmp_path))
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    assert "cannot create a file under" in files.output_problem(str(blocked / "x.pt"))


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_a_folder_that_refuses_new_files_is_found_before_the_run():
    """/proc passes a permission check for root but refuses new files: only trying finds that."""
    assert files.output_problem("/proc/x.pt") == ("--output /proc/x.pt: cannot create a file under /proc "
                                                  "(No such file or directory)")


def test_the_command_stops_before_any_work_on_an_output_it_cannot_create():
    proc = subprocess.run([sys.executable, "06_self_forcing_pipeline.py", "--output", "/proc/x.pt"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["error: --output /proc/x.pt: cannot create a file under /proc "
                                        "(No such file or directory)"]


def test_a_save_that_fails_after_the_run_keeps_the_result(tmp_path, monkeypatch):
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        if str(f).startswith(str(tmp_path)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(BadInput) as info:
        files.save({"latents": torch.arange(3.0)}, str(tmp_path / "latents.pt"))
    message = str(info.value)
    assert "\n" not in message and "writing failed after the run (No space left on device)" in message
    kept = message.split("kept in ")[1].split(" instead")[0]
    assert torch.equal(torch.load(kept)["latents"], torch.arange(3.0))
    os.remove(kept)
    assert os.listdir(tmp_path) == []                              # no temporary file left behind


def test_a_cpu_clock_marks_in_order():
    clock = Clock("cpu")
    clock.record()
    clock.record()
    first, second = clock.seconds()
    assert 0 <= first <= second


def test_a_minute_report_has_one_row_per_minute_of_video(capsys):
    from support.timing import MinuteReport
    report = MinuteReport(fps=16, device="cpu")
    for chunk in range(1, 200):                       # 12 frames every half second: 24 FPS
        report.add(12, chunk * 0.5)
    assert len(report.rows) == 199 * 12 // 960 and all(abs(fps - 24) < 0.5 for fps, _, _ in report.rows)
    assert capsys.readouterr().out.startswith("  minute 1 of video (960 frames): 24.")


def stage_aliases():
    """The names stages give each other: `sf = importlib.import_module("06_self_forcing_pipeline")`."""
    names = set()
    for path in glob.glob(os.path.join(ROOT, "[0-9][0-9]_*.py")) + glob.glob(os.path.join(ROOT, "bench_*.py")):
        for node in ast.parse(open(path).read()).body:
            if isinstance(node, ast.Assign) and "import_module" in ast.unparse(node.value):
                names.add(node.targets[0].id)
    return names


def test_support_is_generic():
    """support/ names no stage, imports none, is handed none: no stage module name in its source, no
    import_module, no parameter or name spelt like a stage's alias; and it imports with every stage blocked."""
    aliases = stage_aliases()
    assert {"sp", "sf", "dec"} <= aliases
    for path in glob.glob(os.path.join(ROOT, "support", "*.py")):
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            assert not (isinstance(node, ast.Constant) and isinstance(node.value, str)
                        and re.search(r"\b\d\d_[a-z]", node.value)), (path, node.value)
            assert not (isinstance(node, ast.Attribute) and node.attr == "import_module"), path
            assert not (isinstance(node, ast.arg) and node.arg in aliases), (path, node.arg)
            assert not (isinstance(node, ast.Name) and node.id in aliases), (path, node.id)
    stages = [os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "[0-9][0-9]_*.py"))]
    blocked = f"import sys; sys.modules.update(dict.fromkeys({stages!r})); " + "; ".join(
        f"import support.{os.path.basename(p)[:-3]}" for p in glob.glob(os.path.join(ROOT, "support", "*.py")))
    proc = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
