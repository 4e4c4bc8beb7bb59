"""A pool of gloo ranks, started once per world size and reused by every test example.

Starting 8 processes costs ~13 s on the 2-core CI machine (torchrun or spawn); forking costs ~0.2 s. The
ranks are forked from the pytest process (with one OpenMP thread, set in conftest before torch is
imported, since a forked child can deadlock in a multi-threaded matmul), join one gloo process group
through stage 03's `init_distributed`, and then wait for work: `pool.run(fn, *args)` sends the same call
to every rank and returns the per-rank results in rank order. `fn` must be a module-level function.

A call that raises on any rank raises `RankError` here with every rank's message. If ranks raised
differently, or a rank did not answer in time (a collective mismatch), the pool is discarded and the
next `get_pool` starts a fresh one, so one broken example cannot poison the rest. Once one rank has
failed, the others get a few seconds: a rank that failed before a collective, leaving its peers waiting
in it, is reported in seconds rather than after the collective timeout (Hypothesis shrinks such a
failure through many examples).
"""
import importlib
import multiprocessing
import multiprocessing.connection
import os
import socket
import time
import traceback

COLLECTIVE_TIMEOUT_S = 60   # gloo gives up on a mismatched collective after this
REPLY_TIMEOUT_S = 180       # the parent gives up on a rank after this
STRAGGLER_GRACE_S = 5       # once a rank has failed, the others have this long to answer; then the pool goes


class RankError(Exception):
    def __init__(self, errors):
        self.errors = errors  # {rank: (exception type name, message, traceback)}
        first = next(iter(errors.values()))
        super().__init__(f"{len(errors)} rank(s) raised; rank {next(iter(errors))}: {first[0]}: {first[1]}\n{first[2]}")

    @property
    def messages(self):
        return {rank: f"{kind}: {msg}" for rank, (kind, msg, _) in self.errors.items()}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, conn):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    torch.set_num_threads(1)
    torch.cuda.is_available = lambda: False  # gloo ranks on the CPU on a GPU box too: CUDA cannot follow a fork
    sp = importlib.import_module("03_sequence_parallel")
    sp.init_distributed(timeout_s=COLLECTIVE_TIMEOUT_S)
    while True:
        msg = conn.recv()
        if msg is None:
            break
        fn, args, kwargs = msg
        try:
            conn.send(("ok", fn(*args, **kwargs)))
        except BaseException as e:  # report everything, keep serving
            conn.send(("err", (type(e).__name__, str(e), traceback.format_exc())))
    torch.distributed.destroy_process_group()


class RankPool:
    def __init__(self, world_size):
        self.world_size = world_size
        ctx = multiprocessing.get_context("fork")
        port = _free_port()
        self.conns, self.procs = [], []
        for rank in range(world_size):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(rank, world_size, port, child_end), daemon=True)
            proc.start()
            child_end.close()
            self.conns.append(parent_end)
            self.procs.append(proc)
        self.alive = True

    def run(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on every rank; the list of results in rank order."""
        for conn in self.conns:
            conn.send((fn, args, kwargs))
        replies, waiting = {}, dict(enumerate(self.conns))
        give_up = time.monotonic() + REPLY_TIMEOUT_S
        while waiting:
            for conn in multiprocessing.connection.wait(list(waiting.values()), timeout=0.2):
                rank = self.conns.index(conn)
                replies[rank] = conn.recv()
                del waiting[rank]
                if replies[rank][0] == "err":   # the others get a few seconds to fail the same way
                    give_up = min(give_up, time.monotonic() + STRAGGLER_GRACE_S)
            if waiting and time.monotonic() > give_up:
                self.close()
                errors = {rank: payload for rank, (status, payload) in replies.items() if status == "err"}
                if errors:              # one rank failed while the others wait in a collective for it
                    raise RankError(errors)
                raise TimeoutError(f"ranks {sorted(waiting)} did not answer {fn.__name__} within {REPLY_TIMEOUT_S} s "
                                   "(a hung collective?); the pool was discarded")
        errors = {rank: payload for rank, (status, payload) in replies.items() if status == "err"}
        if errors:
            if len(errors) != self.world_size or len({(e[0], e[1]) for e in errors.values()}) > 1:
                self.close()  # ranks diverged: their collectives may be out of step
            raise RankError(errors)
        return [replies[rank][1] for rank in range(self.world_size)]

    def close(self):
        if not self.alive:
            return
        self.alive = False
        for conn in self.conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()


_pools = {}


def get_pool(world_size):
    pool = _pools.get(world_size)
    if pool is None or not pool.alive:
        pool = _pools[world_size] = RankPool(world_size)
    return pool


def close_all():
    for pool in _pools.values():
        pool.close()
    _pools.clear()
