"""The metric registry: the config's list of names is the registry's, and a metric added as one class is
evaluated, reduced once with the others, reported and shown in the table with nothing else changed."""

import pytest
import torch
from support import tiny_vae

from vae_scale.commands.evaluate import format_table
from vae_scale.config import EvalConfig
from vae_scale.eval.metrics import METRICS, MetricError, check_metrics, evaluate
from vae_scale.eval.registry import METRICS as REGISTERED
from vae_scale.eval.registry import Metric, register_metric


def test_the_configs_metric_names_are_the_registered_ones():
    # config.py sits below eval/ and validates eval.metrics against its own list: the two must agree.
    assert set(EvalConfig.METRICS) == set(METRICS)
    for name, cls in REGISTERED.items():
        assert cls.name == name and cls.higher_is_better in (True, False, None), name
        assert cls.rows({"samples": 1.0}, None) == [] or cls.always, name  # no rows for absent figures
    with pytest.raises(MetricError, match="unknown metric 'fid'; metrics: psnr ssim "):
        check_metrics(["psnr,fid"])


def test_a_metric_added_as_one_class_is_evaluated_reduced_and_tabled():
    class MeanAbsLatent(Metric):
        """Mean |posterior mean| per image: a toy metric, registered only for this test."""

        higher_is_better = None
        table_position = 75

        def sums(self):
            return {"abs": ()}

        def accumulate(self, batch, sums):
            sums["abs"] += batch.mean.double().abs().flatten(1).mean(1).sum()

        def figures(self, total, samples):
            return {"mean_abs_latent": float(total["abs"]) / samples}

        @classmethod
        def rows(cls, results, info):
            return (
                [("mean abs latent", f"{results['mean_abs_latent']:.3f}")]
                if "mean_abs_latent" in results
                else []
            )

    register_metric("mean_abs_latent")(MeanAbsLatent)
    try:
        with pytest.raises(ValueError, match="registered twice"):
            register_metric("mean_abs_latent")(type("Other", (Metric,), {}))
        vae = tiny_vae(3).eval()
        x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
        metrics = ["psnr", "mean_abs_latent", "kl"]
        full = evaluate(vae, [{"images": x, "count": 5}], metrics=metrics, device="cpu")
        other = {}

        def rank1(v):
            other["v"] = v.clone()
            return v

        evaluate(vae, [{"images": x[3:], "count": 2}], metrics=metrics, device="cpu", reduce=rank1)
        split = evaluate(vae, [{"images": x[:3], "count": 3}], metrics=metrics, device="cpu",
                         reduce=lambda v: v + other["v"])  # fmt: skip
        with torch.no_grad():
            want = vae.encode(x).mean.abs().flatten(1).mean(1).mean().item()
        # Guards the metric's sums lost in the one reduce or mixed with another metric's (kl: ~10x larger):
        # >= 10%. fp32 encodes of 3 + 2 images against 5 differ by ~1e-6 relative; the sums are float64.
        assert full["mean_abs_latent"] == pytest.approx(want, rel=1e-5)
        for k in full:
            assert split[k] == pytest.approx(full[k], rel=1e-5), k
        table = format_table(full, latent_channels=4).splitlines()
        labels = [line.split("|")[1].strip() for line in table[2:]]
        assert labels.index("KL per latent channel") < labels.index("mean abs latent")  # table_position 75
        assert f"{full['mean_abs_latent']:.3f}" in table[2 + labels.index("mean abs latent")]
    finally:
        del REGISTERED["mean_abs_latent"]
