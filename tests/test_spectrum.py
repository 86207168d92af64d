"""Spectra and the diffusability metrics: the DCT against scipy, white noise flat, smooth images falling off,
the sums against an independent numpy computation, and `evaluate`'s spectrum and equivariance metrics
against numpy/PIL (exact across 'ranks' and through lockstep padding), the table and the report's plot."""

import math
import xml.etree.ElementTree as ET
from fractions import Fraction

import numpy as np
import pytest
import scipy.fft
import scipy.ndimage
import torch
from PIL import Image
from support import tiny_vae as make_tiny_vae

from vae_scale.commands.evaluate import format_table
from vae_scale.eval.metrics import Lockstep, evaluate
from vae_scale.eval.spectrum import (
    BINS,
    HF_THRESHOLD,
    bin_centres,
    dct2,
    dct_matrix,
    hf_share,
    radial_spectrum,
    spectrum_sums,
)
from vae_scale.train.report import SPECTRUM_FILE, spectrum_curves, spectrum_svg, write_report


def reference_sums(x: np.ndarray, bins: int = BINS) -> dict[str, np.ndarray]:
    """spectrum_sums written out in float64 numpy with scipy's DCT and a loop over coefficients."""
    B, C, H, W = x.shape
    energy = (scipy.fft.dctn(x.astype(np.float64), axes=(2, 3), norm="ortho") ** 2).sum(0)  # (C, H, W)
    out = {"energy": np.zeros((C, bins)), "count": np.zeros(bins), "hf": np.zeros(C), "total": np.zeros(C)}
    for u in range(H):
        for v in range(W):
            if u == v == 0:
                continue
            # exact rational arithmetic: rho^2 = (u^2 / H^2 + v^2 / W^2) / 2; bin k = floor(bins * rho)
            rho2 = (Fraction(u, H) ** 2 + Fraction(v, W) ** 2) / 2
            k = min(math.isqrt(math.floor(bins * bins * rho2)), bins - 1)
            out["energy"][:, k] += energy[:, u, v]
            out["count"][k] += B
            out["total"] += energy[:, u, v]
            if rho2 >= Fraction(HF_THRESHOLD) ** 2:
                out["hf"] += energy[:, u, v]
    return out


@pytest.mark.numerics
def test_dct_is_orthonormal_and_matches_scipy():
    for n in (1, 5, 8, 17):
        d = dct_matrix(n, dtype=torch.float64)
        torch.testing.assert_close(d @ d.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    x = torch.randn(2, 3, 7, 12, dtype=torch.float64)
    want = scipy.fft.dctn(x.numpy(), axes=(2, 3), norm="ortho")
    # Guards a wrong normalisation, type or axis: O(1). float64 products of <= 17 terms round at ~1e-15;
    # fp32: 7 + 12 terms, |coefficient terms| summing to <= 4 * sqrt(84): <= 19 * 6e-8 * 37 = 4e-5 in the
    # worst order, which the old atol 1e-5 did not cover: 1e-4.
    np.testing.assert_allclose(dct2(x).numpy(), want, atol=1e-12)
    np.testing.assert_allclose(dct2(x.float()).numpy(), want, atol=1e-4)
    assert dct2(x.bfloat16()).dtype == torch.float32


@pytest.mark.numerics
def test_sums_match_an_independent_computation():
    x = torch.randn(3, 4, 9, 14)
    got = spectrum_sums(x)
    want = reference_sums(x.numpy())
    # Guards a coefficient in the wrong bin, DC counted, a wrong count: O(1). Both in float64 (~1e-14).
    for k in want:
        np.testing.assert_allclose(got[k].numpy(), want[k], rtol=1e-5, atol=1e-9, err_msg=k)
    # Sums over images add up: a batch split in two (as across ranks) gives the whole batch's sums.
    a, b = spectrum_sums(x[:1]), spectrum_sums(x[1:])
    # float64 per image whatever the batch (BLAS may pick other kernels per shape: ~1e-15 relative)
    for k in got:
        torch.testing.assert_close(a[k] + b[k], got[k], rtol=1e-12, atol=0)


def test_white_noise_is_flat():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 3, 32, 32, generator=g)
    s = spectrum_sums(x)
    curve = radial_spectrum(s["energy"], s["count"])
    assert torch.isfinite(curve).all()
    assert (curve - 1).abs().max() < 0.1, curve  # each bin averages >= 768 coefficients
    rho = np.hypot(*np.meshgrid(np.arange(32) / 32, np.arange(32) / 32, indexing="ij")) / math.sqrt(2)
    share_of_coefficients = ((rho >= HF_THRESHOLD).sum()) / (32 * 32 - 1)
    shares = hf_share(s["hf"], s["total"])
    assert (shares - share_of_coefficients).abs().max() < 0.01, (shares, share_of_coefficients)


def test_smooth_images_fall_off():
    rng = np.random.default_rng(0)
    blurred = scipy.ndimage.gaussian_filter(
        rng.standard_normal((64, 3, 64, 64)), sigma=(0, 0, 2, 2), mode="wrap"
    )
    s = spectrum_sums(torch.from_numpy(blurred))
    curve = radial_spectrum(s["energy"], s["count"])[1:]  # bin 0 holds the lowest frequencies only partly
    assert (curve[1:] < curve[:-1]).all(), curve  # strictly falling
    # physical bounds in float64: a sigma-2 blur takes Nyquist energy down by ~e^-40, rounding floors at 1e-32
    assert curve[-1] < 1e-6 * curve[0]
    assert float(hf_share(s["hf"].sum(), s["total"].sum())) < 1e-4
    # A photograph: most of its energy is at low frequencies, the spectrum falls by orders of magnitude.
    from skimage import data

    photo = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].double() / 127.5 - 1
    p = spectrum_sums(photo)
    # photographs' known fall-off, in float64 from 8-bit data: bounds on the image, not on rounding
    curve = radial_spectrum(p["energy"], p["count"])
    assert float(hf_share(p["hf"].sum(), p["total"].sum())) < 0.05
    assert curve[-1] < 1e-2 * curve[1] and curve[1] > 1


def test_empty_bins_and_offsets():
    s = spectrum_sums(torch.randn(2, 1, 2, 2))  # three coefficients besides DC: most bins empty
    curve = radial_spectrum(s["energy"], s["count"])
    assert int(torch.isfinite(curve).sum()) == int((s["count"] > 0).sum()) < BINS
    x = torch.randn(4, 2, 8, 8)
    with_offset = spectrum_sums(x + torch.tensor([5.0, -3.0]).view(1, 2, 1, 1))
    # Guards an offset leaking into AC bins (energy ~25 per coefficient): float64 after the fp32 input's
    # offset is removed, so rounding is ~6e-8 * 5 per value, 1e-6 of energies ~1 at most.
    for k, v in spectrum_sums(x).items():  # a constant per channel only moves the DC coefficient
        torch.testing.assert_close(with_offset[k], v, rtol=1e-4, atol=1e-4)
    assert bin_centres(4) == [0.125, 0.375, 0.625, 0.875]


# --------------------------------------------------------------------------------------------------------
# The metrics of `vae-scale eval`


@pytest.fixture(scope="module")
def tiny_vae():
    return make_tiny_vae(0).eval()


def photos(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth random colour fields plus a little noise, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    x = scipy.ndimage.gaussian_filter(rng.standard_normal((n, 3, size, size)), sigma=(0, 0, 2, 2))
    x = x / np.abs(x).max() * 0.9 + 0.05 * rng.standard_normal(x.shape)
    return torch.from_numpy(x.clip(-1, 1)).float()


def psnr_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    mse = (((a - b) / 2) ** 2).reshape(len(a), -1).mean(1)
    return 10 * np.log10(1 / mse)


def pil_resize(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """(B, C, H, W) float32 -> (B, C, h, w) with PIL's bilinear (antialiased) resize of each channel."""
    return np.stack(
        [
            np.stack([np.asarray(Image.fromarray(c, mode="F").resize((w, h), Image.BILINEAR)) for c in img])
            for img in a
        ]
    )


@pytest.mark.numerics
def test_eval_metrics_match_numpy(tiny_vae):
    x = photos(6)
    results = evaluate(
        tiny_vae,
        [{"images": x[:4], "count": 4}, {"images": x[4:], "count": 2}],
        metrics=["spectrum", "equivariance"],
        device="cpu",
    )
    with torch.no_grad():
        z = tiny_vae.encode(x).mode()
    zn, xn = z.numpy(), x.numpy()
    # spectrum: the posterior means' and the images' sums, pooled over all six images
    lat, rgb = reference_sums(zn), reference_sums(xn)
    # Guards a batch's sums lost, a bin off by one, a mean of batch shares: >= 1e-2. evaluate encodes in
    # batches of 4 + 2, here 6 (conv kernels per shape: ~1e-6 relative in z, ~2e-6 in energies): rel 1e-4
    # (was 1e-5).
    assert results["latent_hf_share"] == pytest.approx(lat["hf"].sum() / lat["total"].sum(), rel=1e-4)
    for c in range(4):
        assert results[f"latent_hf_share/{c}"] == pytest.approx(lat["hf"][c] / lat["total"][c], rel=1e-4)
    assert results["rgb_hf_share"] == pytest.approx(rgb["hf"].sum() / rgb["total"].sum(), rel=1e-4)
    for side, ref in (("latent", lat), ("rgb", rgb)):
        energy = ref["energy"].sum(0)
        mean_all = energy.sum() / ref["count"].sum()
        for k in range(BINS):
            key = f"spectrum/{side}/{k}"
            if ref["count"][k] == 0:
                assert key not in results
            else:
                assert results[key] == pytest.approx(energy[k] / ref["count"][k] / mean_all, rel=1e-4), key
    # equivariance: PSNR of decode(T(z)) against T(x), T written out in numpy / PIL
    f = 2
    transforms = {
        "down2": (lambda a, u: a.reshape(*a.shape[:2], a.shape[2] // 2, 2, a.shape[3] // 2, 2).mean((3, 5))),
        "down4": (lambda a, u: a.reshape(*a.shape[:2], a.shape[2] // 4, 4, a.shape[3] // 4, 4).mean((3, 5))),
        "scale": (lambda a, u: pil_resize(a, 6 * u, 6 * u)),  # 8 x 8 latent * 0.75
        "rotate": (lambda a, u: np.rot90(a, 1, (2, 3))),
        "flip": (lambda a, u: a[..., ::-1]),
    }
    for name, t in transforms.items():
        z_t = torch.from_numpy(np.ascontiguousarray(t(zn, 1)))
        with torch.no_grad():
            x_hat = tiny_vae.decode(z_t).clamp(-1, 1).numpy()
        want = psnr_np(x_hat, t(xn, f)).mean()
        # Guards T applied on one side only or in another direction: >= 1e-1 dB. numpy/PIL against torch
        # transforms (~1e-6 apart) and batches of 4 + 2 move x_hat by ~3e-6: ~4e-5 dB at errors ~0.3.
        assert results[f"equivariance/{name}"] == pytest.approx(want, abs=2e-3), name


@pytest.mark.numerics
def test_eval_metrics_are_exact_across_ranks_and_lockstep_padding(tiny_vae):
    x = photos(7, seed=1)
    metrics = ["psnr", "spectrum", "equivariance"]
    full = evaluate(tiny_vae, [{"images": x, "count": 7}], metrics=metrics, device="cpu")
    other = {}
    evaluate(
        tiny_vae,
        [{"images": x[5:], "count": 2}],
        metrics=metrics,
        device="cpu",
        reduce=lambda v: other.setdefault("v", v.clone()),
    )
    # This 'rank' ran out of batches first: under lockstep it runs padding forwards that count nowhere.
    rounds, decodes = iter([True, True, True, True, False]), []
    decode = tiny_vae.decode
    tiny_vae.decode = lambda z: (decodes.append(tuple(z.shape)), decode(z))[1]
    try:
        split = evaluate(
            tiny_vae,
            [{"images": x[:3], "count": 3}, {"images": x[3:5], "count": 2}],
            metrics=metrics,
            device="cpu",
            reduce=lambda v: v + other["v"],
            lockstep=Lockstep(lambda has_batch, stop: (next(rounds), False), (3, 16, 16)),
        )
    finally:
        del tiny_vae.decode
    assert len(decodes) == 4 * 6  # 2 real batches + 2 padding ones, each 1 + 5 transformed decodes
    assert split.keys() == full.keys()
    # Guards a rank's sums lost, padding counted: >= 1e-2. Batches of 3 + 2 + 2 against 7 may run other
    # conv kernels (~1e-6 relative in x_hat, ~1e-6 in a PSNR): rel 1e-4 (was 1e-6, one order assumed).
    for k in full:
        assert split[k] == pytest.approx(full[k], rel=1e-4, abs=1e-9), k
    table = format_table(full, latent_channels=4)
    for row in (
        "high-frequency share, latent",
        "per latent channel",
        "high-frequency share, RGB",
        "spectrum, latent",
        "equivariance PSNR, rotate (dB)",
        "equivariance PSNR, down4 (dB)",
    ):
        assert row in table, row


def test_the_report_shows_the_spectrum_plot(tiny_vae, tmp_path):
    x = photos(4)
    results = evaluate(tiny_vae, [{"images": x, "count": 4}], metrics=["spectrum"], device="cpu")
    curves = spectrum_curves({k: v for k, v in results.items() if k.startswith("spectrum/")})
    assert set(curves) == {"latent", "rgb"}
    assert [f for f, _ in curves["rgb"]] == sorted(f for f, _ in curves["rgb"])
    svg = spectrum_svg(curves, step=10)
    root = ET.fromstring(svg.split("\n")[0])
    lines = root.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 2
    assert len(lines[1].get("points").split()) == len(curves["rgb"])
    report = write_report(tmp_path, "run: {}\n", {}).read_text()
    assert "Latent spectrum" not in report  # nothing before the first evaluation
    (tmp_path / SPECTRUM_FILE).write_text(svg)
    report = write_report(tmp_path, "run: {}\n", {}).read_text()
    assert "Latent spectrum" in report and "<polyline" in report
