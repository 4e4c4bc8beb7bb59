"""Self-checks, the command line and where a rank runs: the small harness every stage uses."""
import argparse
import os
import signal
import sys
import threading
import time

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
    Each of `checks` (a list; a program adding flags appends its own) runs after parsing: check(args) returns
    a message for flags that do not fit together, or None."""

    def __init__(self, doc, *checks):
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        self.checks = list(checks)

    def error(self, message):
        self.exit(2, f"error: {message}\n")

    def parse_args(self, *args, **kwargs):
        parsed = super().parse_args(*args, **kwargs)
        problem = next(filter(None, (check(parsed) for check in self.checks)), None)
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
    """Run a program's main(). BadInput (which every rank raises alike, before any collective) ends this rank
    with one line 'error: ...' and exit code 2; Ctrl-C ends it within a second (stop_on_interrupt); a
    collective broken by a rank that died ends it with one line from rank 0 (exit code 1); any other
    exception is a bug and keeps its traceback."""
    stop_on_interrupt()
    try:
        main()
    except BadInput as e:
        sys.stderr.write(f"error: {e}\n")         # one write: the lines of several ranks do not interleave
        sys.stderr.flush()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        raise SystemExit(2)
    except KeyboardInterrupt as e:
        interrupted(STOPS[e.args[0] if e.args else signal.SIGINT])
    except BrokenPipeError:          # the output was piped into a reader that has stopped (head): not a bug
        os._exit(141)
    except RuntimeError as e:
        if not peer_gone(e):
            raise
        interrupted(f"a peer rank has gone: {str(e).splitlines()[0][:160]}", code=1)


def peer_gone(error):
    """Whether a collective failed because another rank's process went away (gloo's connection to it
    reset or closed, or a backend error in a job whose rank died), not because of this rank's own code."""
    lost = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")
    backend = getattr(torch.distributed, "DistBackendError", ())
    return torch.distributed.is_initialized() and (
        isinstance(error, backend) or any(message in str(error) for message in lost))


_interrupt = threading.Lock()
STOPS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM: the job is being stopped, or a peer rank died"}


def stop_on_interrupt(grace_s=1.0):
    """Ctrl-C (SIGINT; torchrun sends it to every rank) or SIGTERM (what torchrun sends the other ranks when
    one dies) ends this process with exit code 130 and one line from rank 0. Python raises in the main
    thread only between bytecodes, and a rank can sit in a collective for as long as its peers take to
    leave: so the signal also wakes a thread (through the wakeup fd, written whichever thread the signal
    lands on), which ends the process after grace_s."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)

    def stop(signum, frame):
        raise KeyboardInterrupt(signum)
    for signum in STOPS:
        signal.signal(signum, stop)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def watch():
        while (signum := os.read(read_fd, 1)[0]) not in STOPS:
            pass
        time.sleep(grace_s)
        interrupted(STOPS[signum])
    threading.Thread(target=watch, daemon=True).start()


def interrupted(why="Ctrl-C", code=130):
    """Remove half-written outputs, finish the streamed ones (an mp4 keeps what was made), say so once (rank
    0), and leave at once with `code`: os._exit, since a clean exit would wait for peers in a collective and
    print their tracebacks."""
    from support.files import on_interrupt, remove_unfinished
    _interrupt.acquire()
    remove_unfinished()
    notes = [note for note in (finish() for finish in list(on_interrupt)) if note]
    if is_rank_zero():
        kept = "".join(f"; {note}" for note in notes)
        stop = f"interrupted ({why}): stopped; tensor outputs are written whole or not at all{kept}\n"
        sys.stderr.write(stop)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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
