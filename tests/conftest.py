import sys
from pathlib import Path

import pytest
import torch

# Test helpers (agd_reference, fakedata, helpers) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's in-process training: small models step fastest on one
    thread, each torchrun worker gets one (OMP_NUM_THREADS=1), and on a busy machine more threads
    than free cores make PyTorch's CPU kernels many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_rank(monkeypatch):
    """A 1-rank FSDP job in this process, as `agd train --fsdp` starts one without a launcher;
    closed again after the test."""
    import torch.distributed as dist

    from test_distributed import LAUNCHER_VARS
    from torch_agd.train.dist import DistEnv

    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    env = DistEnv.create(cpu=True, fsdp=True)
    yield env
    env.close()
    assert not dist.is_initialized()
