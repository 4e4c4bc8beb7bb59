"""The test harness itself: a rank that fails alone, before a collective, is reported in seconds."""
import importlib
import time

import pytest
import torch

from rank_pool import STRAGGLER_GRACE_S, RankError, get_pool

sp = importlib.import_module("03_sequence_parallel")


def fail_on_rank_1_then_wait_in_a_collective():
    if sp.world()[1] == 1:
        raise ValueError("rank 1 rejects its input")
    torch.distributed.barrier()                     # the others wait here for rank 1, which never comes


def test_one_rank_failing_before_a_collective_surfaces_in_seconds():
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        get_pool(4).run(fail_on_rank_1_then_wait_in_a_collective)
    assert time.monotonic() - start < STRAGGLER_GRACE_S + 10
    assert info.value.messages == {1: "ValueError: rank 1 rejects its input"}
    assert get_pool(4).run(sp.world) == [(4, rank) for rank in range(4)]   # a fresh pool serves the next call
