"""Shared test set-up: marker skips with reasons, and an in-process Megatron world of one."""

from __future__ import annotations

import os
import shutil

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    has_mpi = shutil.which("mpiexec") is not None or os.path.exists(
        os.path.join(os.path.dirname(os.sys.executable), "mpiexec")
    )
    te_reason = None
    if any("te" in item.keywords for item in items):
        from megatron_lm2.specs import te_available

        if not te_available():
            te_reason = "Transformer Engine does not import on this machine (needs CUDA; pip install -e .[gpu])"
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; this machine has none"))
        if "te" in item.keywords and te_reason:
            item.add_marker(pytest.mark.skip(reason=te_reason))
        if "mpi" in item.keywords and not has_mpi:
            item.add_marker(pytest.mark.skip(reason="needs mpiexec (pip install -e .[mpi])"))


@pytest.fixture
def one_thread():
    """Small tensors: extra threads only contend with the other processes on a 2-core box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def megatron_world():
    """torch.distributed + Megatron parallel state for one process (TP=1, PP=1)."""
    from megatron_lm2 import distributed
    from megatron_lm2.testing import free_port

    saved = dict(os.environ)
    os.environ["MASTER_PORT"] = str(free_port())
    distributed.initialize(seed=1234)
    # The process group is up; don't leak RANK/WORLD_SIZE/MASTER_PORT (a port this process now
    # holds) into subprocesses that later tests start (launch scripts, the quickstart).
    os.environ.clear()
    os.environ.update(saved)
    yield
    distributed.destroy()
