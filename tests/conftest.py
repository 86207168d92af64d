"""Test setup shared by every test module.

Triton kernels run on CPU tensors through the interpreter, which must be switched on before triton is
first imported. On a machine with a CUDA device the real kernels run instead (the `gpu` tests).
"""

import os
import pathlib

if not pathlib.Path("/dev/nvidia0").exists() and not pathlib.Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `make test` runs two pytest-xdist workers on two cores: one thread each (for the processes the tests start
# too), or each worker's torch thread pool oversubscribes the cores and a 20 s test takes minutes.
# TEST_THREADS=N gives the tests and the processes they start N threads instead: a thread count splits a
# convolution's sums differently, so `TEST_THREADS=2 make test-numerics` checks the tolerances against
# that rounding too.
if os.environ.get("TEST_THREADS"):
    os.environ["OMP_NUM_THREADS"] = os.environ["TEST_THREADS"]
elif os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from support import write_lpips_weights  # noqa: E402

from vae_scale.kernels import common as kernel_common  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(trylast=True)  # after pytest's tmp_path plugin has made the run's temporary folder
def pytest_configure(config):
    """One inductor cache for this run, shared by its workers and every process they start.

    Inductor's default on-disk cache (/tmp/torchinductor_<user>) outlives the run and is shared by every
    process of the machine: a run with other kernel settings (ATEN_CPU_CAPABILITY=avx2, another torch)
    would load code compiled by this one. A folder of the run's own keeps that out, while the run's
    compile tests still reuse each other's kernels (the same tiny model's convolutions and norms compile
    to the same C++): inductor's cache is safe for concurrent processes. Set by the controlling process
    before xdist starts its workers, which inherit it."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    folder = config._tmp_path_factory.getbasetemp() / "inductor-cache"
    folder.mkdir(exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)


@pytest.fixture(scope="session")
def lpips_dir(tmp_path_factory):
    """A folder of random LPIPS weights in the real file formats (torchvision's vgg16, lpips' vgg.pth)."""
    return write_lpips_weights(tmp_path_factory.mktemp("lpips"))


@pytest.fixture
def nan_kernel_outputs(monkeypatch):
    """Every buffer a Triton kernel must fill starts as NaN, so an element it misses fails a comparison."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kernel_common, "empty", nan_empty)
