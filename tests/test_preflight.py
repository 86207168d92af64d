"""The pre-flight memory estimate against a real training step's peak memory on this CPU."""

import os
import subprocess
import sys
import textwrap

import pytest

from vae_scale.config import load_config
from vae_scale.train.preflight import WillNotFit, estimate_memory, preflight

# Peak resident memory of a process over two real training steps, less what it held before the model
# existed (after a throwaway step, so lazily loaded libraries are not counted). A fixed mmap threshold
# (glibc otherwise raises it after frees and keeps freed tensors in the heap) makes every tensor an mmap
# that goes back to the OS when freed, so RSS tracks live memory.
MEASURE = textwrap.dedent("""
    import gc, re, sys, torch
    torch.set_num_threads(1)
    from vae_scale.config import load_config
    from vae_scale.models.sd import VAE
    from vae_scale.train.wrapping import prepare_model
    from vae_scale.train.preflight import estimate_memory
    cfg = load_config("demo", sys.argv[1:])
    est = estimate_memory(cfg).total
    x = torch.rand(cfg.data.batch_size, 3, cfg.data.resolution, cfg.data.resolution) * 2 - 1

    def steps(n):
        vae = prepare_model(VAE(cfg.model))
        opt = torch.optim.AdamW(vae.parameters())
        for _ in range(n):
            post = vae.encode(x)
            z, kl = post.sample_kl()
            ((vae.decode(z) - x).abs().mean() + kl.mean()).backward()
            opt.step()
            opt.zero_grad()

    def status(key):
        return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    steps(1)  # a throwaway run first: libraries and kernels that load lazily are not training memory
    gc.collect()
    base = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    steps(2)
    print(est, status("VmHWM") - base)
""")


MODEL = ["model.block_out_channels=[32,64,64]", "model.norm_num_groups=16", "model.mid_block_attention=false"]


@pytest.mark.parametrize(
    "overrides",
    [
        [*MODEL, "data.resolution=64", "data.batch_size=4"],
        [*MODEL, "data.resolution=128", "data.batch_size=8"],
    ],
)
def test_memory_estimate_is_within_25_percent_of_measured_peak(overrides):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, *overrides], capture_output=True, text=True, check=True, env=env
    )
    estimated, measured = map(int, out.stdout.split())
    assert measured > 50 * 2**20  # activations dominate, so the comparison means something
    assert 0.75 <= estimated / measured <= 1.25, (estimated, measured)


def test_checkpointing_and_sharding_lower_the_estimate():
    plain = estimate_memory(load_config("sd-f8"))
    checkpointed = estimate_memory(load_config("sd-f8", ["model.gradient_checkpointing=true"]))
    assert checkpointed.activations < 0.6 * plain.activations
    assert checkpointed.parameters == plain.parameters
    sharded = estimate_memory(load_config("xl"), world_size=8, fsdp=True)
    assert sharded.parameters < estimate_memory(load_config("xl")).parameters / 4


def test_preflight_says_what_the_launch_does(monkeypatch):
    import torch

    import vae_scale.train.preflight as pf

    # What the lines say, not whether the run fits: that depends on the host's free memory at the moment
    # (test_will_not_fit_stops_with_a_suggestion pins it to test the refusal).
    monkeypatch.setattr(pf, "device_memory", lambda device: 2**40)
    cfg = load_config("sd-f8", ["train.grad_accum=2"])

    lines = preflight(
        cfg,
        world_size=4,
        device=torch.device("cpu"),
        kernels_backend="torch",
        n_params=83_653_863,
        batches_per_epoch=100,
        fsdp=False,
    )
    text = "\n".join(lines)
    assert "8 per process x 4 processes x 2 accumulation = 64 images per step at 256 px" in text
    assert "83,653,863" in text and "auto -> torch" in text and "100 steps per epoch" in text
    assert "GiB estimated" in text


def test_will_not_fit_stops_with_a_suggestion(monkeypatch):
    import torch

    import vae_scale.train.preflight as pf

    monkeypatch.setattr(pf, "device_memory", lambda device: 2 * 2**30)  # 2 GiB free for the process
    with pytest.raises(
        WillNotFit,
        match="fit the 2.0 GiB of host memory free per process; try model.gradient_checkpointing=true",
    ):
        preflight(
            load_config("sd-f8"),
            world_size=1,
            device=torch.device("cpu"),
            kernels_backend="torch",
            n_params=1,
            batches_per_epoch=1,
            fsdp=False,
        )


# --------------------------------------------------------------------------------------------------------
# What can fail at step N, found before step 1


def _empty_tar(path):
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    tarfile.open(path, "w").close()
    return path


def test_every_missing_thing_is_named_before_start(tmp_path, monkeypatch):
    import wandb

    from vae_scale.train.checks import check_run

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no W&B login on this machine
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached VGG16 / Inception
    # An earlier run in this process leaves wandb's settings singleton in conftest's WANDB_MODE=offline, in
    # which login() asks for no key; a fresh process (what the check is for) has none.
    wandb.teardown()
    empty_val = _empty_tar(tmp_path / "shards" / "val-000000.tar")
    cfg = load_config(
        "demo",
        [
            "data.train=synthetic",  # the demo preset leaves it to the command line
            "eval.every=5",
            f"data.val={empty_val}",
            "log.wandb=online",
            "loss.perceptual_weight=1",
            "eval.metrics=[psnr,rfid]",
            f"model.init_from={tmp_path / 'no-such-vae'}",
        ],
    )
    problems = check_run(cfg).problems
    assert len(problems) == 5, problems
    val, wandb, lpips, rfid, init = problems
    assert "data.val" in val and "holds no samples" in val and "eval.every=0" in val
    assert "log.wandb=online" in wandb and "WANDB_API_KEY" in wandb
    assert "loss.lpips_path" in lpips
    assert "rfid" in rfid and "--inception-path" in rfid
    assert "model.init_from" in init and "no-such-vae" in init


def test_nothing_is_named_when_everything_is_there(tmp_path, monkeypatch):
    from support import write_photo_like_images

    from vae_scale.data.shards import write_shards
    from vae_scale.train.checks import check_run

    write_photo_like_images(tmp_path / "photos", 8)
    write_shards(str(tmp_path / "photos"), tmp_path / "shards", size=32, val_fraction=0.25, progress=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # checked on this machine only, never sent
    run = ["data.train=synthetic", f"run.dir={tmp_path / 'run'}"]
    cfg = load_config("demo", [*run, "eval.every=5", f"data.val={tmp_path / 'shards'}", "log.wandb=online"])
    assert check_run(cfg).problems == []
    # Without eval, an empty data.val is nobody's problem.
    cfg = load_config("demo", [*run, "eval.every=0", "data.val=", "log.wandb=disabled"])
    assert check_run(cfg).problems == []
