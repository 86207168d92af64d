"""What the tests share: the one tiny config, generated photographs and shards of them, weight files in the
real formats, and real processes (launch lines, a free port, their environment, running and killing them).

Imported as a plain module (pytest puts tests/ on sys.path); fixtures stay in conftest.py.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vae_scale import kernels
from vae_scale.config import Config, load_config
from vae_scale.data.shards import write_shards
from vae_scale.eval.lpips import LPIPS_FILE, VGG16_FILE
from vae_scale.formats.checkpoint import latest_checkpoint
from vae_scale.models.sd import VAE
from vae_scale.train.objective import VAELoss

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "accelerate"

TINY = [
    "model.block_out_channels=[8,16]",
    "model.layers_per_block=1",
    "model.latent_channels=4",
    "model.norm_num_groups=4",
    "data.resolution=32",
    "data.batch_size=4",
    "data.workers=0",
    "optim.lr=1e-3",
    "log.wandb=disabled",
    "log.every=1",
    "log.images_every=0",
]
"""A two-level model of 44k parameters on 32 px crops: a training step takes milliseconds."""


def tiny_config(run_dir: Path, data, *extra: str) -> Config:
    """TINY training on `data` (shards, or "synthetic") into run_dir; extra overrides win."""
    return load_config(None, [*TINY, f"run.dir={run_dir}", f"data.train={data}", *extra])


def tiny_vae(seed: int = 0, *extra: str) -> VAE:
    """TINY's model without its attention block, initialised from `seed`."""
    torch.manual_seed(seed)
    return VAE(load_config(None, [*TINY, "model.mid_block_attention=false", *extra]).model)


KERNEL_TEST = [
    pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed"),
    pytest.mark.usefixtures("nan_kernel_outputs"),
]
"""The marks of a module testing a Triton kernel against its reference: it needs triton, and every buffer a
kernel must fill starts as NaN (so an element it misses fails the comparison). On a CPU the kernels run
through the interpreter (conftest.py sets TRITON_INTERPRET=1)."""


# --------------------------------------------------------------------------------------------------------
# Data and weight files


def write_photo_like_images(
    folder: Path, n: int, sizes=((56, 48), (56, 56), (56, 64)), seed: int = 0, prefix: str = "img"
) -> Path:
    """n PNGs PREFIXnn.png of smooth colour gradients plus noise, their (w, h) taken in turn from sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (c + 1) + yy * (3 - c) + 20 * i) % 256 for c in range(3)], -1)
        img = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{prefix}{i:02d}.png")
    return folder


def photo_like_shards(root: Path, n: int, sizes=((56, 48), (56, 56), (56, 64)), **options) -> Path:
    """Real PNG shards (root/out) of n photo-like images (root/src); options go to write_shards."""
    src = write_photo_like_images(root / "src", n, sizes)
    write_shards(str(src), root / "out", image_format="png", seed=0, progress=False, **options)
    return root / "out"


def uneven_val_shards(root: Path) -> Path:
    """Real PNG shards of 20 photo-like images, 5 of them validation: with batch 2 on two ranks, one rank
    has a validation batch more (what the lockstep of sharded evaluation is for)."""
    out = photo_like_shards(root, 20, max_per_shard=4, val_fraction=0.25)
    assert json.loads((out / "index.json").read_text())["splits"]["val"]["samples"] == 5
    return out


def checkpoint_file(run_dir: Path, name: str = "vae.safetensors") -> dict[str, torch.Tensor]:
    """A safetensors file of a run's newest complete checkpoint."""
    return load_file(latest_checkpoint(run_dir) / name)


def one_line_error(capsys, *names: str) -> str:
    """The captured stderr, asserted to be one line, no traceback, naming each of `names`."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for name in names:
        assert name in err, (name, err)
    return err


TRUE_ZERO_GRADIENT = ("to_k.bias",)
"""Weights whose true gradient is zero: a key bias shifts every logit of a query alike, which softmax
ignores. Adam turns the rounding noise there into full-size steps, so two runs that round differently
part there by a step's size whatever else they agree on."""

SAME_TRAINING = 2e-2
"""The largest RMS difference between two runs' weights, over the RMS of their move from the start, that
still counts as the same training rounded differently.

Two runs that differ only in the order of fp32 sums (DDP against FSDP, one process against two, AVX2
against AVX-512 kernels) compute gradients that differ by ~1e-6 relative, and Adam's normalised step turns
that into ~1e-6 of the step: the RMS ratio is ~1e-6, except at weights whose gradient is itself within
rounding of zero, where the step can flip sign. Those must be fewer than SAME_TRAINING**2 = 0.04% of the
weights to pass. A wrong gradient (a micro-batch skipped, a unit's second use missing, a gradient not
reduced across ranks) turns the direction of every step, and the ratio is of order 1 (over 0.1)."""


def training_gap(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict[str, torch.Tensor]
) -> tuple[float, float]:
    """(RMS of a - b, RMS of b - start) over every weight but TRUE_ZERO_GRADIENT's, in float64."""
    assert a.keys() == b.keys() == start.keys(), sorted(set(a) ^ set(b) | set(b) ^ set(start))[:5]
    names = [n for n in b if not n.endswith(TRUE_ZERO_GRADIENT)]
    names = [n for n in names if b[n].is_floating_point()]  # not BatchNorm's step counter

    def flat(w: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([w[n].double().flatten() for n in names])

    def rms(t: torch.Tensor) -> float:
        return t.square().mean().sqrt().item()

    return rms(flat(a) - flat(b)), rms(flat(b) - flat(start))


def initial_weights(overrides: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The weights a run of `overrides` starts from, by checkpoint file stem ("vae", "loss", and
    "discriminator" when on), drawn in the trainer's order from train.seed."""
    cfg = load_config(None, overrides)
    torch.manual_seed(cfg.train.seed)
    vae = VAE(cfg.model)
    criterion = VAELoss(cfg.loss, image_channels=cfg.model.in_channels)
    out = {"vae": vae.state_dict(), "loss": criterion.likelihood_state()}
    if criterion.discriminator is not None:
        out["discriminator"] = criterion.discriminator.state_dict()
    return out


def assert_same_training(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict[str, torch.Tensor], what: str
) -> None:
    """Two runs' weights are the same training up to rounding (SAME_TRAINING says why the bound holds)."""
    gap, moved = training_gap(a, b, start)
    assert moved > 0, f"{what}: the weights never moved from the start"
    assert gap < SAME_TRAINING * moved, f"{what}: RMS difference {gap:.2e} against an RMS move of {moved:.2e}"


VGG_CONVS = [(3, 64), (64, 64), "M", (64, 128), (128, 128), "M", (128, 256), (256, 256), (256, 256), "M",
             (256, 512), (512, 512), (512, 512), "M", (512, 512), (512, 512), (512, 512)]  # fmt: skip
"""torchvision's vgg16 feature convolutions as (in, out) channels, "M" a max-pool."""


def write_lpips_weights(folder: Path) -> Path:
    """Random LPIPS weights in the real formats (torchvision's vgg16 state dict, classifier included, and
    lpips' v0.1 vgg.pth) in folder, which is returned."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    vgg, index = {}, 0
    for item in VGG_CONVS:
        if item == "M":
            index += 1
            continue
        cin, cout = item
        vgg[f"features.{index}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * math.sqrt(2 / (9 * cin))
        vgg[f"features.{index}.bias"] = 0.01 * torch.randn(cout, generator=g)
        index += 2  # conv, ReLU
    vgg["classifier.6.bias"] = torch.zeros(1000)  # the real file has a classifier too; it must be ignored
    torch.save(vgg, folder / VGG16_FILE)
    heads = {
        f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
        for k, c in enumerate([64, 128, 256, 512, 512])
    }
    torch.save(heads, folder / LPIPS_FILE)
    return folder


def tiny_diffusers_vae(folder: Path, **config) -> dict:
    """A random-weight diffusers AutoencoderKL (f2, 4 latent channels) saved with save_pretrained; its
    config.json as a dict."""
    from diffusers import AutoencoderKL  # seconds to import: only the tests that use it pay

    torch.manual_seed(0)
    kwargs = {
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 4,
        "sample_size": 64,
        "scaling_factor": 0.18215,
        **config,
    }
    AutoencoderKL(**kwargs).save_pretrained(folder)
    return json.loads((folder / "config.json").read_text())


# --------------------------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    """A TCP port nobody listens on now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    """The environment of a launched process: this checkout first, this interpreter's scripts (accelerate,
    torchrun) on PATH, one thread per process (TEST_THREADS when set), W&B offline, the real Triton
    compiler."""
    e = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": os.environ.get("TEST_THREADS", "1"),
        "WANDB_MODE": "offline",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        **extra,
    }
    e.pop("TRITON_INTERPRET", None)
    return e


def accelerate_launch(
    config: str, nproc: int, args: list[str], *launch_flags: str, program=("-m", "vae_scale", "train")
) -> list[str]:
    """`accelerate launch --config_file launch/accelerate/CONFIG PROGRAM ARGS`, on a free port; the program
    is `-m vae_scale train` unless given (a module as ("-m", name), or a script's path)."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(LAUNCH / config),
        "--num_processes",
        str(nproc),
        "--main_process_port",
        str(free_port()),
        *launch_flags,
        *program,
        *args,
    ]


def launch_args(config: Path, *extra: str):
    """What `accelerate launch --config_file CONFIG EXTRA -m vae_scale train` resolves to (no processes)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(
        ["--config_file", str(config), *extra, "-m", "vae_scale", "train"]
    )
    args, _, _ = _validate_launch_command(args)
    return args


def train_command(args: list[str], nproc: int = 1) -> list[str]:
    """`vae-scale train ARGS` in a process of its own, or in nproc gloo processes (cpu-2proc.yaml)."""
    if nproc == 1:
        return [sys.executable, "-m", "vae_scale", "train", *args]
    return accelerate_launch("cpu-2proc.yaml", nproc, args)


def run(cmd: list[str], timeout: int = 300, ok: bool = True) -> subprocess.CompletedProcess:
    """Run a command to its end; with ok=True, fail the test (showing stderr's tail) unless it exits 0."""
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def start(cmd: list[str], environ: dict[str, str] | None = None, cwd=None, new_session: bool = True):
    """Start cmd with the launch environment (or `environ`), stdout and stderr piped as text; in a session
    of its own unless new_session=False, so that a signal to its process group reaches only it and its
    children (as Ctrl-C, `timeout` and SLURM signal a job)."""
    return subprocess.Popen(
        cmd,
        env=environ or env(),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=new_session,
    )


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a running launcher and all below it (torchrun's workers have sessions of their own)."""
    if proc.poll() is not None:
        return
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.kill()
    proc.kill()
    proc.wait()


# --------------------------------------------------------------------------------------------------------
# A non-finite step, injected from the tests

NONFINITE_TRAIN = ROOT / "tests" / "nonfinite_train.py"
"""`vae-scale train` with a non-finite loss at one step on one rank (see that file)."""


def poison_loss(target, step: int, rank: int = 0) -> None:
    """Make the training loss NaN at `step` on `rank` (every time that step is taken, as after a rollback),
    by wrapping Trainer.forward_loss on `target`: the Trainer class (every trainer of this process) or one
    trainer. The step then goes through the trainer's real finite check, skip and rollback."""
    forward = target.forward_loss

    def forward_loss(*args, **kwargs):
        trainer = target if not isinstance(target, type) else args[0]
        x_hat, posterior, loss, logs = forward(*args, **kwargs)
        if trainer.step == step and trainer.acc.process_index == rank:
            loss = loss * float("nan")
        return x_hat, posterior, loss, logs

    target.forward_loss = forward_loss


def nonfinite_train_command(
    args: list[str], step: int, rank: int = 0, nproc: int = 1, config: str = "cpu-2proc.yaml"
) -> list[str]:
    """train_command's `vae-scale train ARGS` with the loss made non-finite at `step` on `rank` (poison_loss);
    nproc > 1 launches it under accelerate with launch/accelerate/CONFIG."""
    poisoned = [f"--nonfinite-step={step}", f"--nonfinite-rank={rank}", *args]
    if nproc == 1:
        return [sys.executable, str(NONFINITE_TRAIN), *poisoned]
    return accelerate_launch(config, nproc, poisoned, program=(str(NONFINITE_TRAIN),))
