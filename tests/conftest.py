"""pytest configuration.

TRITON_INTERPRET must be set before any @triton.jit runs, so it is decided here, at collection
time: with no visible CUDA GPU, Triton kernels run on CPU tensors through the interpreter.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# benchmarks/gpu_check.sh sets this: a GPU test that skips fails instead, unless it declares an
# optional dependency (@pytest.mark.optional_dep("flash_attn")), so that a run where CUDA, a kernel
# module or the CUDA build is missing cannot report ok.
GPU_STRICT = os.environ.get("MMFAST_GPU_STRICT", "0") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped on CPU-only machines)")
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")
    config.addinivalue_line("markers", "distributed: spawns gloo processes")
    config.addinivalue_line(
        "markers", "optional_dep(name): needs an optional package; may skip under MMFAST_GPU_STRICT=1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; runs in benchmarks/gpu_check.sh")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if GPU_STRICT and rep.skipped and "gpu" in item.keywords and item.get_closest_marker("optional_dep") is None:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"MMFAST_GPU_STRICT=1: this GPU test skipped, which counts as a failure: {reason}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny shapes (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    threads on shared CI cores only oversubscribe them (one module: 6 s with one thread, 40 s without)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def at_most_two_threads():
    """Small shapes on shared CI cores: at most two intra-op threads while the test runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    yield
    torch.set_num_threads(threads)
