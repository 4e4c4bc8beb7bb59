"""Shared test set-up: one thread per process (set before torch loads), Hypothesis profile, rank pools."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # forked ranks must not inherit an OpenMP pool

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

torch.set_num_threads(1)

# Multi-process examples take a variable time: no deadline. Examples stay few but varied; the
# distributed properties run on pools of ranks that outlive the examples.
settings.register_profile("default", deadline=None, max_examples=25, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

WORLD_SIZES = (1, 2, 3, 4, 8)


@pytest.fixture(scope="session", autouse=True)
def _close_pools():
    yield
    import rank_pool
    rank_pool.close_all()
