"""rFID's protocol: the Frechet distance against torchmetrics', independent of the batch size and of the
number of processes, its reference statistics cached under the protocol and reused, the protocol printed."""

import json
import subprocess

import pytest
import torch
from support import accelerate_launch, env, tiny_vae

from vae_scale.cli.evaluate import eval_main
from vae_scale.eval.metrics import MetricError, RFIDReference, evaluate, load_inception

D = 16
"""Features of the stand-in extractor: fewer than the test's images, so every covariance has full rank."""


class _Features(torch.nn.Module):
    """A stand-in for NVIDIA's inception-2015-12-05.pt with its calling convention (uint8 images, resized
    inside, return_features=True for the pooled features): random convolutions, D features."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.conv2 = torch.nn.Conv2d(8, D, 3)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(x.float() / 127.5 - 1, size=(24, 24), mode="bilinear")
        f = self.conv2(torch.relu(self.conv1(x))).relu().mean((2, 3))  # (B, D)
        return f if return_features else f.sum(1)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "features.pt"
    torch.jit.save(torch.jit.script(_Features()), str(path))
    return path


def _batches(x: torch.Tensor, size: int) -> list[dict]:
    return [{"images": x[i : i + size], "count": len(x[i : i + size])} for i in range(0, len(x), size)]


@pytest.mark.numerics
@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_rfid_equals_torchmetrics_fid_on_the_same_features(inception_file):
    from torchmetrics.image.fid import FrechetInceptionDistance

    inception = load_inception(str(inception_file))
    vae = tiny_vae(1).eval()
    x = torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    got = evaluate(vae, _batches(x, 8), metrics=["rfid"], device="cpu", inception=inception)["rfid"]

    class OnUint8(torch.nn.Module):  # torchmetrics hands a custom extractor the images as given
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return inception.net(images, return_features=True).double()  # a float64 result

    fid = FrechetInceptionDistance(feature=OnUint8())
    with torch.no_grad():
        for b in _batches(x, 8):  # the batches evaluate used, so each feature is computed alike
            x_rec = vae.decode(vae.encode(b["images"]).mode()).clamp(-1, 1)
            for images, real in ((b["images"], True), (x_rec, False)):
                fid.update(((images + 1) * 127.5).round().to(torch.uint8), real=real)
    want = float(fid.compute())
    # The same features and float64 sums; torchmetrics takes the eigenvalues of S1 S2, we those of
    # S1^1/2 S2 S1^1/2: on full-rank 16 x 16 covariances LAPACK agrees to ~1e-12 relative. Guards a biased
    # covariance (24/23: 4%), a missing factor 2 or square root, per-batch statistics: >= 1%.
    assert got == pytest.approx(want, rel=1e-8)
    assert got > 0.1 * want + 1e-3  # a real distance, not one that cancels to nothing


@pytest.mark.numerics
@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_rfid_does_not_depend_on_the_batch_size(inception_file):
    inception = load_inception(str(inception_file))
    vae = tiny_vae(1).eval()
    x = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    got = [
        evaluate(vae, _batches(x, size), metrics=["rfid"], device="cpu", inception=inception)["rfid"]
        for size in (1, 3, 4)
    ]
    # Guards statistics per batch (a batch of 1 has no covariance at all) or a mean of batch distances:
    # O(1). Rounding: fp32 convolutions over batches of 1/3/4 differ by ~1e-6 relative per feature, and
    # the distance is a difference of traces that cancels some: rel 1e-4.
    assert got[1] == pytest.approx(got[0], rel=1e-4)
    assert got[2] == pytest.approx(got[0], rel=1e-4)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_reference_statistics_are_cached_under_the_protocol(inception_file, tmp_path):
    inception = load_inception(str(inception_file))
    vae = tiny_vae(1).eval()
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    protocol = {"data": "d", "split": "val", "crop": "center", "resize": "16", "images": 6, "features": "f"}
    first = RFIDReference.open(protocol, tmp_path)
    assert first.mu is None and first.cache.parent == tmp_path
    computed = evaluate(vae, _batches(x, 4), metrics=["rfid"], device="cpu", inception=inception,
                        inputs={"rfid": first})["rfid"]  # fmt: skip
    assert first.save() and first.cache.is_file()

    again = RFIDReference.open(protocol, tmp_path)
    assert again.source == "cached" and torch.equal(again.mu, first.mu) and torch.equal(again.cov, first.cov)
    cached = evaluate(vae, _batches(x, 4), metrics=["rfid"], device="cpu", inception=inception,
                      inputs={"rfid": again})["rfid"]  # fmt: skip
    assert cached == computed  # the same float64 statistics, the same fake side: bit for bit
    assert not again.save()  # nothing rewritten
    assert "reference statistics cached" in again.describe() and "images 6" in again.describe()

    # Another protocol (another Inception file, another count) is another file; a pass over other images
    # than the cached statistics describe stops rather than compare with the wrong reference.
    assert RFIDReference.open({**protocol, "features": "g"}, tmp_path).mu is None
    assert RFIDReference.open({**protocol, "images": 7}, tmp_path).cache != first.cache
    with pytest.raises(MetricError, match="of 6 images, this pass evaluated 4"):
        evaluate(vae, _batches(x[:4], 4), metrics=["rfid"], device="cpu", inception=inception,
                 inputs={"rfid": RFIDReference.open(protocol, tmp_path)})  # fmt: skip
    assert RFIDReference.open({**protocol, "images": None}, tmp_path).cache is None  # count unknown


@pytest.mark.numerics
def test_eval_rfid_with_two_processes_gives_the_numbers_of_one(inception_file, tmp_path, capsys):
    folder = tmp_path / "vae"
    tiny_vae(1).save_diffusers(folder)
    args = ["--ckpt", str(folder), "--data", "synthetic", "--n", "10", "--resolution", "16"]
    args += [
        "--batch-size",
        "3",
        "--metrics",
        "rfid",
        "tile_consistency",
        "--inception-path",
        str(inception_file),
    ]
    cmd = accelerate_launch(
        "cpu-2proc.yaml",
        2,
        [*args, "--rfid-cache", str(tmp_path / "cache2"), "--out", str(tmp_path / "two.json")],
        program=("-m", "vae_scale.commands.evaluate"),
    )
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    cache = ["--rfid-cache", str(tmp_path / "cache1")]
    assert eval_main([*args, *cache, "--out", str(tmp_path / "one.json")]) == 0  # meanwhile, in this process
    printed = capsys.readouterr().out
    assert "| rFID " in printed and "| tiled vs untiled decode PSNR (dB) " in printed
    assert (
        "rFID protocol: data synthetic (seed 1); split val; crop center; resize shorter side to 16 px; "
        in printed
    )
    assert "images 10; features features.pt sha256:" in printed and "reference statistics computed" in printed
    assert len(list((tmp_path / "cache1").iterdir())) == 1
    assert eval_main([*args, *cache, "--out", str(tmp_path / "again.json")]) == 0  # reuses the cache
    assert "reference statistics cached" in capsys.readouterr().out

    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    one, two, again = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two", "again"))
    assert (one["world_size"], two["world_size"]) == (1, 2) and one["metrics"]["samples"] == 10
    assert "images 10" in two["rfid_protocol"]
    # Guards a rank's sums lost or doubled (O(1)). Two processes, other batches per rank: fp32 features
    # ~1e-6 relative per image, float64 sums; the distance cancels some: rel 1e-4 (the batch-size test's).
    for k, v in one["metrics"].items():
        assert two["metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    assert again["metrics"]["rfid"] == one["metrics"]["rfid"]  # the cached statistics are those computed
