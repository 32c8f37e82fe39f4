import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback-only test clusters; see ray-mlflow-notes
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance with small, explicit resources, shut down after the session.

    `address="local"` always starts a new instance, never joining another cluster on this machine.
    """
    import ray

    ray.init(address="local", num_cpus=4, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def one_thread():
    """As in a Ray Train worker (cpus_per_worker = 1); also much faster than two threads on a busy 2-core box."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
