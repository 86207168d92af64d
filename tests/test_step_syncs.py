"""The training step's traffic between host and device: one device-to-host sync per step (the ranks'
agreement), no blocking host-to-device copy, and at most one sync more on a step that writes a metrics row;
with and without the discriminator, gradient accumulation and fp16's loss scaler.

These run on the CPU, where no transfer is visible as such: a tensor is on the host and the device at once.
HostTraffic therefore counts the calls that would move data between the two on a GPU, whatever the device:

- a device-to-host sync is every `aten._local_scalar_dense` (what `.item()`, `float(t)`, `int(t)`, `bool(t)`
  and `if t:` dispatch to), and every `Tensor.tolist()`, `.numpy()` and `.cpu()` (on a CPU they dispatch
  no op at all, so they are caught at the torch-function level);
- a blocking host-to-device copy is every tensor made from Python data with a device named
  (`torch.tensor(v, device=d)`, `torch.as_tensor`, `torch.asarray`: pageable memory, copied while the host
  waits), and every `Tensor.to(device)` / `.cuda()` without non_blocking=True of a tensor made from Python
  data without a device. Such a tensor stays on the host and costs nothing until it moves; moving it with
  non_blocking=True (from pinned memory on a GPU) lets the host run on. A `.to(device)` of any other tensor
  is taken to be on the device already, a no-op on a GPU (clip_grad_norm_ makes such calls). Fills with a
  Python scalar (`torch.full`, `t * 2.0`) pass the scalar as a kernel argument: no copy, not counted.

The step counted is the trainer's own (`Trainer.train_step`, then `Trainer._log` for a metrics row), on a
tiny model with the fused AdamW the trainer builds on every device (a for-loop AdamW keeps its step counts
on the host and reads them with `.item()`, which this would count although a GPU run would not sync on
them). Every step of a short run is counted, the first included.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from support import tiny_config
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from vae_scale.config import load_config
from vae_scale.train.trainer import Trainer

_SYNC_METHODS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}
_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray}
_MOVES = {torch.Tensor.to, torch.Tensor.cuda}


def _where() -> str:
    """The innermost frame of vae_scale (or of the caller) that made the call, for the failure message."""
    frames = [f for f in traceback.extract_stack()[:-3] if "vae_scale" in f.filename]
    f = frames[-1] if frames else traceback.extract_stack()[-4]
    return f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.line}"


def _names_a_device(args: tuple, kwargs: dict) -> bool:
    """Whether a Tensor.to / .cuda call names a device (not only a dtype or a memory format)."""
    if kwargs.get("device") is not None:
        return True
    return any(isinstance(a, (torch.device, str, int)) and not isinstance(a, bool) for a in args[1:])


class _Functions(TorchFunctionMode):
    def __init__(self, traffic: HostTraffic):
        super().__init__()
        self.traffic = traffic

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNC_METHODS:
            self.traffic.syncs.append(f"{func.__name__} at {_where()}")
        elif func in _FROM_DATA and kwargs.get("device") is not None:
            self.traffic.copies.append(f"{func.__name__}(..., device=) at {_where()}")
        elif func in _MOVES and id(args[0]) in self.traffic.host and _names_a_device(args, kwargs):
            if not kwargs.get("non_blocking", False):
                self.traffic.copies.append(f"{func.__name__} of a host tensor at {_where()}")
        out = func(*args, **kwargs)
        if func in _FROM_DATA and kwargs.get("device") is None:
            self.traffic.host[id(out)] = out
        return out


class _Dispatch(TorchDispatchMode):
    def __init__(self, traffic: HostTraffic):
        super().__init__()
        self.traffic = traffic

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.traffic.syncs.append(f"_local_scalar_dense at {_where()}")
        return func(*args, **(kwargs or {}))


class HostTraffic:
    """Counts, inside `with traffic:`, the syncs and blocking copies a GPU would make (module docstring)."""

    def __init__(self):
        self.syncs: list[str] = []
        self.copies: list[str] = []
        self.host: dict[int, torch.Tensor] = {}  # made from Python data without a device, by id (kept alive)
        self._modes = (_Functions(self), _Dispatch(self))

    def __enter__(self) -> HostTraffic:
        self.syncs.clear()
        self.copies.clear()
        self.host.clear()
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self.host.clear()


def test_the_counter_sees_what_a_gpu_would_sync_on_and_copy():
    """HostTraffic counts each kind of call it is meant to, once, and not the calls that move nothing."""
    t = torch.randn(3)
    with HostTraffic() as traffic:
        t.sum().item(), float(t[0]), bool(t[1] > 0), t.tolist(), t.numpy(), t.cpu()
    assert len(traffic.syncs) == 6, traffic.syncs
    with HostTraffic() as traffic:
        torch.tensor(1.0, device=t.device), torch.as_tensor([1.0], device=t.device)
        host = torch.tensor([2.0, 3.0])  # stays on the host until it moves
        host.to(t.device), host.to(t.device, non_blocking=True), host.to(torch.float64)
        t.to(t.device), torch.full((), 2.0, device=t.device), t * 2.0
    assert len(traffic.copies) == 3 and not traffic.syncs, (traffic.copies, traffic.syncs)


CASES = {
    "plain": [],
    "everything": [  # the discriminator with its adaptive weight, accumulation, a learned scale, EMA
        "train.grad_accum=2",
        "loss.disc_weight=0.5",
        "loss.disc_start=0",
        "loss.disc_layers=2",
        "loss.disc_channels=16",
        "loss.kl_warmup_steps=10",
        "loss.recon=gaussian",
        "optim.ema_decay=0.9",
    ],
    "clips": [  # wan-tiny on synthetic clips with the 3D discriminator and EMA
        "data.frames=5",
        "data.resolution=16",
        "data.batch_size=2",
        "loss.disc_weight=0.5",
        "loss.disc_start=0",
        "loss.disc_layers=2",
        "loss.disc_channels=8",
        "optim.ema_decay=0.9",
    ],
}


def _config(run_dir, case: str):
    """TINY on synthetic images, or wan-tiny on synthetic clips, for two steps."""
    if case == "clips":
        run = ["data.train=synthetic", "data.workers=0", "log.wandb=disabled", "log.every=1"]
        run += ["log.images_every=0", f"run.dir={run_dir}", "train.steps=2"]
        return load_config("wan-tiny", [*run, *CASES[case]])
    return tiny_config(run_dir, "synthetic", "train.steps=2", *CASES[case])


@pytest.mark.parametrize("case", list(CASES))
def test_a_step_syncs_once_and_copies_nothing_and_a_logged_step_syncs_once_more(tmp_path, case):
    trainer = Trainer(_config(tmp_path / "run", case))
    try:
        if case == "everything":  # accelerate keeps a GradScaler for fp16 on GPUs only: a real one here
            trainer.acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        traffic = HostTraffic()
        for step in range(2):  # the first step creates the optimizer's state; the second is any later one
            with traffic:
                logs, _ = trainer.train_step()
            assert len(traffic.syncs) == 1 and not traffic.copies, (step, traffic.syncs, traffic.copies)
            with traffic:
                trainer.train_log.add(logs, finite=trainer.consecutive_skips == 0, x=trainer.last_x)
                row = trainer._log()
            assert len(traffic.syncs) <= 1 and not traffic.copies, (step, traffic.syncs, traffic.copies)
            assert trainer.consecutive_skips == 0 and row["loss"] == row["loss"]  # a finite, applied step
            assert {"kl_channel/0", "lr", "data/samples", "grad_norm"} <= set(row)
            if case == "everything":
                assert {"d_weight", "d_loss", "logvar"} <= set(row)
            if case == "clips":
                assert trainer.last_x.ndim == 5 and {"d_weight", "d_loss"} <= set(row)
    finally:
        trainer.close()
