"""The pre-flight memory estimate against a real training step's peak memory on this CPU."""

import os
import subprocess
import sys
import textwrap

import pytest

from vae_scale.config import load_config
from vae_scale.preflight import WillNotFit, estimate_memory, preflight

# Peak resident memory of a process over two real training steps, less what it held before the model
# existed (after a throwaway step, so lazily loaded libraries are not counted). A fixed mmap threshold
# (glibc otherwise raises it after frees and keeps freed tensors in the heap) makes every tensor an mmap
# that goes back to the OS when freed, so RSS tracks live memory.
MEASURE = textwrap.dedent("""
    import gc, re, sys, torch
    torch.set_num_threads(1)
    from vae_scale.config import load_config
    from vae_scale.model import VAE
    from vae_scale.parallel import prepare_model
    from vae_scale.preflight import estimate_memory
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


def test_preflight_says_what_the_launch_does():
    cfg = load_config("sd-f8", ["train.grad_accum=2"])
    import torch

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

    import vae_scale.preflight as pf

    monkeypatch.setattr(pf, "device_memory", lambda device: 2 * 2**30)  # a 2 GiB device
    with pytest.raises(
        WillNotFit, match="does not fit the device's 2.0 GiB; try model.gradient_checkpointing=true"
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
