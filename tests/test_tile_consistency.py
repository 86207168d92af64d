"""tile_consistency: tiled against untiled reconstructions, against the model's own tiled decode, exact over
batches, the seam measure against an independent mask, selectable by name."""

import re

import numpy as np
import pytest
import torch
from support import tiny_vae

from vae_scale.commands.evaluate import format_table
from vae_scale.config import EvalConfig
from vae_scale.eval.metrics import METRICS, MetricError, evaluate, psnr
from vae_scale.eval.tile_consistency import default_tile, seam_mask
from vae_scale.models.tiling import Tiling


@pytest.fixture(scope="module")
def vae():
    return tiny_vae(2).eval()  # f2, 4 latent channels


def images(n: int, h: int = 32, w: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.numerics
def test_tile_consistency_is_the_psnr_of_the_models_tiled_decode(vae):
    x = images(3)
    cfg = EvalConfig(consistency_tile=8)  # 4 latent positions, diffusers' per-tile pass, overlap 0.25
    got = evaluate(vae, [{"images": x[:2], "count": 2}, {"images": x[2:], "count": 1}],
                   metrics=["tile_consistency"], device="cpu", config=cfg)  # fmt: skip
    tiling = Tiling(tile=8, overlap=0.25, norm="tile")
    with torch.no_grad():
        z = vae.encode(x).mode()
        untiled = vae.decode(z).clamp(-1, 1)
        tiled = vae.decode(z, tiled=tiling).clamp(-1, 1)
        round_trip = vae.decode(vae.encode(x, tiled=tiling).mode(), tiled=tiling).clamp(-1, 1)
    # Guards the wrong pair compared (input for untiled: ~10 dB here), a mean of batch means (2 + 1),
    # the round trip untiled: >= 0.1 dB. The same fp32 ops on batches of 2 + 1 against 3: ~1e-6 relative.
    assert got["tile_consistency"] == pytest.approx(psnr(tiled, untiled).mean().item(), rel=1e-5)
    assert got["tile_consistency/encode_decode"] == pytest.approx(
        psnr(round_trip, untiled).mean().item(), rel=1e-5
    )
    assert 5 < got["tile_consistency"] < 60  # per-tile statistics: a visible difference, not rounding

    # The seam measure from an independent mask: seams every 6 px (stride 3 latent positions), +-2 px.
    err = ((tiled - untiled) / 2).double().square().mean(1).numpy()  # (n, H, W)
    ys, xs = np.arange(32) + 0.5, np.arange(24) + 0.5
    near_y = np.min(np.abs(ys[:, None] - np.arange(6, 32, 6)[None]), 1) < 2
    near_x = np.min(np.abs(xs[:, None] - np.arange(6, 24, 6)[None]), 1) < 2
    mask = near_y[:, None] | near_x[None, :]
    want = err[:, mask].mean() / err[:, ~mask].mean()
    assert np.array_equal(seam_mask(32, 24, 6, 2).numpy(), mask)
    # Guards the seams and the interior swapped (ratio inverted) or a mask off by a pixel: >= 5% here.
    assert got["tile_consistency/seam_ratio"] == pytest.approx(want, rel=1e-4)


@pytest.mark.numerics
def test_whole_image_statistics_give_the_untiled_result(vae):
    # norm "image" equals the untiled pass to rounding (models/tiled.py), so the PSNR sits at or near its
    # 120 dB ceiling; any real difference (a wrong halo, a per-tile norm) is below 60 dB.
    got = evaluate(vae, [{"images": images(2, seed=1), "count": 2}], metrics=["tile_consistency"],
                   device="cpu", config=EvalConfig(consistency_norm="image"))  # fmt: skip
    assert got["tile_consistency"] > 90 and got["tile_consistency/encode_decode"] > 90


def test_tile_consistency_is_registered_selectable_and_refuses_untiled_sizes(vae):
    assert "tile_consistency" in METRICS and "tile_consistency" in EvalConfig.METRICS
    assert default_tile(256, 384, 8) == 128 and default_tile(32, 24, 2) == 8 and default_tile(8, 8, 2) == 8
    with pytest.raises(MetricError, match="fit in one tile of 16 px"):
        evaluate(vae, [{"images": images(1, 16, 16), "count": 1}], metrics=["tile_consistency"],
                 device="cpu", config=EvalConfig(consistency_tile=16))  # fmt: skip
    with pytest.raises(MetricError, match="eval.consistency_tile=7"):
        evaluate(vae, [{"images": images(1), "count": 1}], metrics=["tile_consistency"], device="cpu",
                 config=EvalConfig(consistency_tile=7))  # fmt: skip

    class Untiled(torch.nn.Module):  # a wrapper whose decode has no tiled= (as the trainer's once had)
        config = vae.config

        def encode(self, x):
            return vae.encode(x)

        def decode(self, z):
            return vae.decode(z)

    with pytest.raises(MetricError, match="take tiled="):
        evaluate(Untiled(), [{"images": images(1), "count": 1}], metrics=["tile_consistency"], device="cpu")
    results = {"samples": 2.0, "mse": 0.1, "tile_consistency": 31.5, "tile_consistency/encode_decode": 30.25}
    table = format_table({**results, "tile_consistency/seam_ratio": 3.0})
    assert re.search(r"^\| tiled vs untiled decode PSNR \(dB\) +\| +31\.50 \|$", table, re.M)
    assert re.search(r"^\| tiled decode error, seams / interior +\| +3\.00 \|$", table, re.M)
