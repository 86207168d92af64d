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


@pytest.fixture(autouse=True)
def own_inductor_cache(request):
    """A test marked `compiles` gets an inductor cache of its own, under its temporary folder.

    Inductor's on-disk cache (/tmp/torchinductor_<user> by default) is shared by every process of the
    machine: a run with other kernel settings (ATEN_CPU_CAPABILITY=avx2, another torch) would otherwise
    load code compiled by this one. Processes the test starts inherit the folder through the environment.
    """
    if "compiles" not in request.keywords:
        yield
        return
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    with temporary_cache_dir(str(request.getfixturevalue("tmp_path") / "inductor-cache")):
        yield


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
