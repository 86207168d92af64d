"""The latent diffusion probe: it learns, it ranks structured latents above noise, a seed fixes its result,
an autoencoder's latent scale and offset do not change it, and the command writes every autoencoder and
seed, or stops with one line naming the flag."""

import io
import json
import math
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from support import one_line_error, tiny_vae

from vae_scale.cli import main
from vae_scale.commands.generate import LatentShardWriter
from vae_scale.commands.probe import (
    VAL_TIMES,
    LatentSet,
    ProbeBudget,
    Standardisation,
    heldout_by_key,
    probe,
    read_latents,
)

# 16 tokens of width 32: a step takes milliseconds on one core
TINY = ProbeBudget(
    steps=40, batch_size=32, width=32, depth=2, heads=2, patch_size=2, lr=1e-3, evals=2, val_samples=48
)
TINY_FLAGS = [
    *("--steps", "40", "--batch-size", "32", "--width", "32", "--depth", "2", "--heads", "2"),
    *("--lr", "1e-3", "--evals", "2", "--val-samples", "48"),
]
N = 192
SCALE = torch.tensor([3.7, 0.013, 250.0, 1.0]).view(1, 4, 1, 1)
SHIFT = torch.tensor([5.0, -0.2, 1000.0, 0.3]).view(1, 4, 1, 1)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: two threads contending for a shared 2-core machine are many times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def structured(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 4, 8, 8) latents with two degrees of freedom each (a phase and an amplitude per field), mixed
    into four channels: a distribution a diffusion model learns quickly."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    base = torch.stack([torch.cos(0.6 * xx + 0.3 * yy), torch.cos(0.2 * xx - 0.7 * yy)])  # (2, 8, 8)
    phase = torch.rand(n, 2, 1, 1, generator=g) * 2 * math.pi
    amp = 0.5 + torch.rand(n, 2, 1, 1, generator=g)
    fields = amp * torch.cos(3 * base[None] + phase)
    mix = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [1.0, -1.0]])
    return torch.einsum("ck,nkhw->nchw", mix, fields)


def keys(n: int) -> list[str]:
    return [f"{i:06d}" for i in range(n)]


def write_latents(folder: Path, z: torch.Tensor, fmt: str = "safetensors", shard_size: int = 50) -> Path:
    """Latent shards as `vae-scale encode` writes them (its writer), and an index.json naming the format."""
    folder.mkdir(parents=True)
    writer = LatentShardWriter(folder, "latents", 0, shard_size, fmt)
    for key, zi in zip(keys(len(z)), z):
        writer.write(key, "memory", zi)
    shards = writer.close()
    index = {"splits": {"train": {"samples": len(z), "shards": shards}}, "latent": {"format": fmt}}
    (folder / "index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def latent_dirs(tmp_path_factory) -> dict[str, Path]:
    """Folders of structured latents (safetensors), the same affinely rescaled per channel (npy), and white
    noise."""
    root = tmp_path_factory.mktemp("latents")
    z = structured(N)
    noise = torch.randn(N, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    return {
        "structured": write_latents(root / "structured", z),
        "rescaled": write_latents(root / "rescaled", z * SCALE + SHIFT, fmt="npy"),
        "noise": write_latents(root / "noise", noise),
    }


def without_time(run: dict) -> dict:
    return {k: v for k, v in run.items() if k != "seconds"}


def test_reading_latents_sorts_by_key_and_the_holdout_depends_on_the_key_only(latent_dirs):
    got = read_latents(str(latent_dirs["structured"]))
    assert got.keys == keys(N) and got.latents.shape == (N, 4, 8, 8)
    assert torch.equal(got.latents, structured(N))  # the writer's order; four shards of 50, 50, 50, 42
    held = heldout_by_key(got.keys, 0.25)
    assert held == heldout_by_key(list(reversed(got.keys)), 0.25)[::-1]
    # a hash, so the share is near 0.25 but not exact: binomial std sqrt(192 * 0.25 * 0.75) = 6 samples
    assert 48 - 24 <= sum(held) <= 48 + 24


def test_the_probe_learns_and_ranks_structured_latents_above_noise(latent_dirs):
    sets = [(read_latents(str(latent_dirs[name])), None) for name in ("structured", "noise")]
    report = probe(sets, ["structured", "noise"], TINY, [0], val_fraction=0.25)
    structured_run, noise_run = (row["runs"][0] for row in report["autoencoders"])
    # At init the head is zero (adaLN-Zero), v = 0, and the loss is E|eps - x0|^2 = 2 on standardised
    # latents: exactly so only in expectation, 48 held-out latents x 256 values, so within a few percent.
    for run in (structured_run, noise_run):
        assert run["val_loss_init"] == pytest.approx(2.0, rel=0.05)
    # Structured latents: 40 steps take the loss to ~1.3 (below 1.5 with room to spare). White noise cannot
    # go below the Gaussian bound 2 - (2t - 1)^2 / ((1 - t)^2 + t^2), mean 1.62 over VAL_TIMES.
    assert structured_run["val_loss"] < 0.8 * structured_run["val_loss_init"]
    bound = sum(2 - (2 * t - 1) ** 2 / ((1 - t) ** 2 + t**2) for t in VAL_TIMES) / len(VAL_TIMES)
    assert noise_run["val_loss"] > bound - 0.05  # 0.05: the held-out sample's own spread at 48 latents
    assert structured_run["val_loss"] < noise_run["val_loss"] - 0.2
    assert [s for s, _ in structured_run["curve"]] == [0, 20, 40]


def test_a_seed_fixes_the_result_and_another_seed_changes_it(latent_dirs):
    sets = [(read_latents(str(latent_dirs["structured"])), None)]
    runs_a = probe(sets, ["s"], TINY, [0, 1], val_fraction=0.25)["autoencoders"][0]["runs"]
    (again,) = probe(sets, ["s"], TINY, [1], val_fraction=0.25)["autoencoders"][0]["runs"]
    assert without_time(again) == without_time(runs_a[1])  # bit for bit, whatever ran before it
    assert runs_a[0]["val_loss"] != runs_a[1]["val_loss"]
    # at init the zero head predicts v = 0 whatever the seed, and the held-out noise is never the seed's
    assert runs_a[0]["val_loss_init"] == runs_a[1]["val_loss_init"]


@pytest.mark.numerics
def test_latent_scale_and_offset_do_not_change_the_result(latent_dirs):
    a = read_latents(str(latent_dirs["structured"]))
    b = read_latents(str(latent_dirs["rescaled"]))
    assert b.latents.abs().max() > 1000 * a.latents.abs().max() / 3  # the raw latents are far apart
    za, zb = Standardisation.of(a.latents).apply(a.latents), Standardisation.of(b.latents).apply(b.latents)
    # Standardised, they agree to the float32 rounding of z * scale + shift (a few ulp of the shift 1000,
    # ~1e-4, over the channel's std 250): below 1e-5 of the standardised range of ~3.
    assert (za - zb).abs().max() < 1e-5
    report = probe([(a, None), (b, None)], ["a", "b"], TINY, [0], val_fraction=0.25)
    run_a, run_b = (row["runs"][0] for row in report["autoencoders"])
    # Guards a probe that does not standardise (channel scales 0.013 to 250 change the loss by orders of
    # magnitude) or only scales (an offset of 1000 std dominates the loss). Rounding: inputs a few 1e-6
    # apart move 40 Adam steps' losses by the same order; rel 1e-4 leaves 100x for amplification.
    for key in ("val_loss", "val_loss_init", "train_loss"):
        assert run_b[key] == pytest.approx(run_a[key], rel=1e-4), key
    for t in run_a["val_loss_t"]:
        assert run_b["val_loss_t"][t] == pytest.approx(run_a["val_loss_t"][t], rel=1e-4), t


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> tuple[Path, Path]:
    """(latent folder, diffusers VAE folder): `vae-scale encode` of 96 synthetic 16 px images by a tiny
    random VAE (f2: latents 4 x 8 x 8)."""
    root = tmp_path_factory.mktemp("encoded")
    vae = tiny_vae(0, "model.sample_size=16")
    vae.save_diffusers(root / "vae")
    argv = ["--ckpt", str(root / "vae"), "--data", "synthetic", "--n", "96", "--resolution", "16"]
    assert main(["encode", *argv, "--out", str(root / "latents"), "--workers", "0"]) == 0
    return root / "latents", root / "vae"


def test_the_command_reports_every_autoencoder_and_seed(latent_dirs, encoded, tmp_path, capsys):
    out = tmp_path / "probe"
    latents, _ = encoded
    argv = [str(latent_dirs["structured"]), str(latents), "--names", "structured", "encoded"]
    assert main(["probe", *argv, "--seeds", "2", *TINY_FLAGS, "--out", str(out)]) == 0
    report = json.loads((out / "probe.json").read_text())
    assert [r["name"] for r in report["autoencoders"]] == ["structured", "encoded"]
    assert report["budget"]["steps"] == 40 and report["budget"]["seeds"] == [0, 1]
    for row in report["autoencoders"]:
        assert [r["seed"] for r in row["runs"]] == [0, 1]
        s = row["summary"]["val_loss"]
        losses = [r["val_loss"] for r in row["runs"]]
        assert s["min"] == min(losses) and s["max"] == max(losses) and s["min"] <= s["mean"] <= s["max"]
        assert s["std"] == pytest.approx(abs(losses[0] - losses[1]) / math.sqrt(2))
    encoded_row = report["autoencoders"][1]
    assert (
        encoded_row["latent_shape"] == [4, 8, 8] and encoded_row["index"]["latent"]["format"] == "safetensors"
    )
    assert encoded_row["train_samples"] + encoded_row["val_samples"] == 96
    table = (out / "probe.md").read_text()
    assert table.splitlines()[2].startswith("| structured | 4x8x8 |")
    assert table.splitlines()[3].startswith("| encoded | 4x8x8 |")
    assert "different keys" in table  # the two sets hold out different images: said so
    svg = ET.fromstring((out / "probe.svg").read_text())
    texts = {t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")}
    assert {"structured", "encoded"} <= texts
    assert "structured seed 1: held-out loss" in capsys.readouterr().out


# Copied from tests/test_evaluate.py::_Features
class _Features(torch.nn.Module):
    """A stand-in feature extractor with the calling convention of NVIDIA's inception-2015-12-05.pt."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        f = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 3).flatten(1)  # (B, 27)
        return torch.cat([f, f.square()], 1) if return_features else f


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_fid_of_decoded_samples_with_the_projects_inception(encoded, tmp_path):
    latents, vae = encoded
    features = tmp_path / "features.pt"
    torch.jit.save(torch.jit.script(_Features()), str(features))
    out = tmp_path / "probe"
    argv = [str(latents), "--seeds", "1", *TINY_FLAGS, "--out", str(out), "--inception-path", str(features)]
    fid = ["--ckpt", str(vae), "--fid-data", "synthetic", "--fid-samples", "24", "--sampler-steps", "4"]
    assert main(["probe", *argv, *fid]) == 0
    row = json.loads((out / "probe.json").read_text())["autoencoders"][0]
    assert math.isfinite(row["runs"][0]["fid"]) and row["runs"][0]["fid"] > 0
    assert "FID" in (out / "probe.md").read_text().splitlines()[0]


@pytest.mark.parametrize(
    "extra, names",
    [
        (["--names", "a"], ["--names"]),
        (["--names", "a", "a", "--out", "{out}"], ["--names", "distinct"]),
        (["--val", "{a}", "--out", "{out}"], ["--val"]),
        (["--width", "30", "--out", "{out}"], ["--width", "--heads"]),
        (["--seeds", "0", "--out", "{out}"], ["--seeds"]),
        (["--val-fraction", "1", "--out", "{out}"], ["--val-fraction"]),
        (["--lr", "nan", "--out", "{out}"], ["--lr"]),
        (["--inception-path", "x.pt", "--out", "{out}"], ["--inception-path", "--run"]),
        (["--ckpt", "{a}", "{a}", "--out", "{out}"], ["--inception-path"]),
        (["--patch-size", "3", "--out", "{out}"], ["--patch-size", "8x8"]),
        (["--out", "{a}"], ["--out"]),
    ],
)
def test_usage_errors_exit_2_with_an_error_line_naming_the_flag(latent_dirs, tmp_path, capsys, extra, names):
    a, b = str(latent_dirs["structured"]), str(latent_dirs["noise"])
    extra = [e.format(a=a, out=tmp_path / "out") for e in extra]
    if "--out" not in extra:
        extra += ["--out", str(tmp_path / "out")]
    assert main(["probe", a, b, "--steps", "1", *extra]) == 2
    err = capsys.readouterr().err.strip()
    # argparse's own errors print the usage first; the error itself is always the one last line
    assert "Traceback" not in err and "error: " in err.splitlines()[-1], err
    for name in names:
        assert name in err.splitlines()[-1], (name, err)
    assert not (tmp_path / "out" / "probe.json").exists()


def test_missing_or_empty_latents_exit_2_naming_them(tmp_path, capsys):
    assert main(["probe", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o1")]) == 2
    one_line_error(capsys, "latents", "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["probe", str(empty), "--out", str(tmp_path / "o2")]) == 2
    one_line_error(capsys, "latents", "empty")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    with tarfile.open(damaged / "latents-000-000000.tar", "w") as tar:
        member = tarfile.TarInfo("000001.safetensors")
        member.size = 5
        tar.addfile(member, io.BytesIO(b"\x00junk"))
    assert main(["probe", str(damaged), "--out", str(tmp_path / "o3")]) == 2
    one_line_error(capsys, "latents", "latents-000-000000.tar", "cannot be read")


def test_too_few_latents_to_hold_some_out_is_an_error(tmp_path):
    few = LatentSet("few", keys(3), structured(3))
    with pytest.raises(ValueError, match="no held-out latents"):
        probe([(few, None)], ["few"], TINY, [0], val_fraction=0.01)
