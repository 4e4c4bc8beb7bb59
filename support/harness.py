"""Self-checks, the command line and where a rank runs: the small harness every stage uses."""
import argparse
import os
import sys
import threading

import torch


def check(name, got, want, tol):
    """Max abs error of `got` against `want`; raises if it exceeds `tol` (self-checks must fail loudly)."""
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    if not err <= tol:  # also catches NaN
        raise AssertionError(f"{name}: max error {err:.3e} exceeds tolerance {tol:.1e}")
    return err


class BadInput(ValueError):
    """A wrong flag, file or configuration, not a bug: a stage reports it in one line, with no traceback."""


class Parser(argparse.ArgumentParser):
    """The stages' argument parser: a bad flag ends the process with one line, 'error: ...' (exit code 2).
    `check(args)` runs after parsing: it returns a message for flags that do not fit together, or None."""

    def __init__(self, doc, check=None):
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        self.check = check

    def error(self, message):
        self.exit(2, f"error: {message}\n")

    def parse_args(self, *args, **kwargs):
        parsed = super().parse_args(*args, **kwargs)
        problem = self.check(parsed) if self.check else None
        if problem:
            self.error(problem)
        return parsed


def positive(text):
    """argparse type: an integer >= 1."""
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative(text):
    """argparse type: an integer >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def run_main(main):
    """Run a stage's main(). BadInput (which every rank raises alike, before any collective) ends this rank
    with one line 'error: ...' and exit code 2; any other exception is a bug and keeps its traceback."""
    try:
        main()
    except BadInput as e:
        sys.stderr.write(f"error: {e}\n")         # one write: the lines of several ranks do not interleave
        sys.stderr.flush()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        raise SystemExit(2)


def is_rank_zero():
    """Rank 0 of a torchrun job, or a single process (no process group needed)."""
    return int(os.environ.get("RANK", "0")) == 0


def choose_device(ranks_on_node, gpus, local_rank, needs_gpus=None):
    """Where one rank runs: (device, note). Every rank of a node gets the same answer from the same counts.

    * At least one GPU per rank on this node: rank r takes GPU r (note None).
    * No GPU at all: the CPU (gloo), note None.
    * Fewer GPUs than ranks: a run that needs the GPUs (`needs_gpus` names it, e.g. "--bench") raises
      BadInput naming the counts and the --nproc_per_node that fits; anything else runs on the CPU (gloo)
      with a note saying why, which rank 0 prints.
    """
    if gpus >= ranks_on_node and gpus > 0:
        return torch.device(f"cuda:{local_rank}"), None
    if gpus == 0:
        return torch.device("cpu"), None
    counts = f"{ranks_on_node} ranks on this node but {gpus} GPU(s)"
    if needs_gpus:
        raise BadInput(f"{needs_gpus} needs one GPU per rank: {counts}; "
                       f"run torchrun --nproc_per_node={gpus} (or fewer)")
    return torch.device("cpu"), (f"note: {counts}: every rank runs on the CPU (gloo); "
                                 f"--nproc_per_node={gpus} or fewer puts one rank on each GPU")


class Deadline:
    """Ends this process with one clear line if a block of work has not finished in time (a captured NCCL
    exchange that hangs must not hang silently). Every rank runs its own timer, so every rank says it."""

    def __init__(self, seconds, what, advice="", rank=0):
        self.seconds, self.what, self.advice, self.rank = seconds, what, advice, rank

    def expired(self):
        advice = f"; {self.advice}" if self.advice else ""
        print(f"error: rank {self.rank}: {self.what} did not finish within {self.seconds:.0f} s{advice}",
              file=sys.stderr, flush=True)
        os._exit(3)

    def __enter__(self):
        self.timer = threading.Timer(self.seconds, self.expired)
        self.timer.daemon = True
        self.timer.start()

    def __exit__(self, *exc):
        self.timer.cancel()
