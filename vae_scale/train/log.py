"""What a run records between its steps, besides checkpoints, through its Monitor: a metrics row every
log.every steps (averaged over the steps since the last row and over the ranks), image previews of a fixed
batch, and evaluations on data.val.

Every rank calls each method together: the rows reduce over the ranks, and under FSDP every forward is a
collective. Only the main process writes (Monitor).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn as nn

from vae_scale.config import Config
from vae_scale.data.clip_loader import build_clip_val_loader
from vae_scale.data.loader import build_val_loader
from vae_scale.data.source import BatchSource
from vae_scale.eval.metrics import EvaluationInterrupted, Lockstep, RFIDReference, evaluate, latent_stats
from vae_scale.eval.rfid import inception_protocol
from vae_scale.models.posterior import DiagonalGaussian
from vae_scale.train.ema import EMA
from vae_scale.train.monitor import LogWindow, Monitor, image_grid, peak_memory
from vae_scale.train.summary import headline

PREVIEW_IMAGES = 8
"""Images of the first training batch that every preview reconstructs."""
PREVIEW_CLIPS = 2
"""Clips of the first batch that every preview reconstructs, when it is a batch of clips."""

Inference = Callable[[], AbstractContextManager]
"""The trainer's context for forwards outside training (eval mode, no gradients, resharded after)."""


class TrainLog:
    """The run's metrics rows, previews and evaluations (see the module docstring).

    monitor: None in a dry run (nothing is written then); eval_nets: metrics.load_eval_nets's networks;
    inputs: the metrics' fixed inputs by name (latent_drift: build.build_drift_reference's).
    """

    def __init__(
        self,
        cfg: Config,
        acc,
        monitor: Monitor | None,
        eval_nets: dict[str, nn.Module],
        fsdp: bool,
        inputs: dict[str, Any] | None = None,
    ):
        self.cfg, self.acc, self.device, self.monitor = cfg, acc, acc.device, monitor
        self.eval_nets, self.fsdp = eval_nets, fsdp
        self.inputs = dict(inputs or {})  # fixed inputs of metrics by name (latent_drift: its reference)
        self.window = LogWindow()  # the steps since the last metrics row, and their wait for data
        self.preview: torch.Tensor | None = None
        self.last_eval: tuple[int, dict[str, float]] | None = None  # (step, results)
        self._val = None  # the validation loader, made at the first evaluation
        self._features: str | None = None  # rfid's feature extractor, as its protocol names it

    def add(self, logs: dict[str, torch.Tensor | float], finite: bool, x: torch.Tensor) -> None:
        """One step's logs into the window; the first step's batch `x` becomes the preview."""
        if self.preview is None:
            self.preview = x[:PREVIEW_IMAGES].detach().clone()
        self.window.add(logs, finite)

    def row(
        self,
        step: int,
        *,
        posterior: DiagonalGaussian | None,
        loader: BatchSource,
        samples_seen: int,
        skipped: int,
    ) -> dict[str, float]:
        """One metrics row from the window's steps (then emptied), logged at `step`; {} when it has none.

        posterior: the latest batch's, for the latent statistics (None after a skipped step).
        """
        acc, window, cfg = self.acc, self.window, self.cfg
        if window.ran == 0:
            return {}
        seconds = max(time.time() - window.start, 1e-9)
        # Everything that crosses ranks or comes off the device goes in one vector: one gather, one sync.
        keys, means = window.device_means()
        stats = latent_stats(posterior) if posterior is not None else {}
        counters = loader.counters()
        peak_key, peak = peak_memory(self.device)
        # float64: sample counts pass float32's 2^24 within a long run.
        host = torch.tensor([*(float(v) for v in counters.values()), peak], dtype=torch.float64)
        if self.device.type == "cuda":
            host = host.pin_memory()  # copied without the host waiting
        parts = [means.double()] if means is not None else []
        if stats:
            parts.append(torch.stack([v.double() for v in stats.values()]))
        parts.append(host.to(self.device, non_blocking=True))
        ranks = acc.gather(torch.cat(parts)).view(acc.num_processes, -1)
        n_means, n_stats = len(keys), len(stats)
        split = torch.cat(
            [
                ranks[:, :n_means].mean(0),  # averaged over ranks
                ranks[acc.process_index, n_means : n_means + n_stats],  # this rank's latest batch
                ranks[:, n_means + n_stats : -1].sum(0),  # counted over ranks
                ranks[:, -1:].amax(0),  # the largest rank's peak memory
            ]
        ).tolist()  # the row's one device-to-host sync
        names = [*keys, *stats, *(f"data/{k}" for k in counters), peak_key]
        values = dict(zip(names, split))
        values.update(window.host_means())
        images = window.ran * cfg.data.batch_size * cfg.train.grad_accum * acc.num_processes
        values.update(
            {
                "images_per_s": images / seconds,
                "images_per_s_per_device": images / seconds / acc.num_processes,
                "samples_seen": samples_seen,
                "skipped_steps": skipped,
                "data_wait_fraction": window.data_wait / seconds,
            }
        )
        window.reset()
        self.monitor.scalars(step, values)
        self.monitor.progress(step, loss=values.get("loss", float("nan")), img_s=values["images_per_s"])
        return values

    def images(self, step: int, model: nn.Module, ema: EMA | None, inference: Inference) -> None:
        """Reconstructions of the preview batch (and with the EMA weights) and decoded prior samples.

        A clip preview shows its first PREVIEW_CLIPS clips frame by frame: each clip a row, its
        reconstructions in the rows below it. Prior samples are images (one-frame latents) either way.
        """
        if self.preview is None:
            return
        x = self.preview if self.preview.ndim == 4 else self.preview[:PREVIEW_CLIPS]
        h, w = x.shape[-2:]
        g = torch.Generator(device="cpu").manual_seed(self.cfg.train.seed)
        z = torch.randn(x.shape[0], *model.latent_shape(h, w), generator=g).to(self.device)
        with inference():
            rows = [x, model.decode(model.encode(x).mode())]
            prior = model.decode(z)
        if ema is not None:
            with ema.applied(), inference():
                rows.append(model.decode(model.encode(x).mode()))
        if x.ndim == 5:  # (B, C, T, H, W) rows -> one row of T frames per clip and version
            rows = [r[i].transpose(0, 1) for i in range(x.shape[0]) for r in rows]
        self.monitor.images(step, {"reconstruction": image_grid(rows), "prior_samples": image_grid([prior])})

    def evaluate(
        self,
        step: int,
        model: nn.Module,
        criterion: nn.Module,
        inference: Inference,
        stop: Callable[[], bool] | None = None,
    ) -> dict[str, float] | None:
        """eval.metrics over every validation sample (each exactly once across ranks); logged as val/*.

        stop: this rank's stop request, asked before each batch; when it holds on any rank, every rank
        leaves the evaluation at the same batch and None is returned (nothing logged).
        """
        cfg, acc = self.cfg, self.acc
        if self._val is None:
            build = build_clip_val_loader if cfg.data.frames > 1 else build_val_loader
            self._val = build(cfg.data, rank=acc.process_index, world_size=acc.num_processes)
        r = cfg.data.resolution
        lockstep = None
        if self.fsdp or acc.num_processes > 1:
            # Sharded forwards are collectives: a rank out of batches runs padding ones until all are. And
            # a stop request must end the evaluation at the same batch on every rank.
            shape = (cfg.model.in_channels, r, r)
            if cfg.data.frames > 1:  # a padding batch is a clip of the val loader's frames
                shape = (cfg.model.in_channels, cfg.data.frames, r, r)
            lockstep = Lockstep(self._agree, shape if self.fsdp else None)
        inputs = dict(self.inputs)
        if "rfid" in cfg.eval.metrics:
            if self._features is None:
                self._features = inception_protocol(self.eval_nets["inception"])
            protocol = {
                "data": cfg.data.val,
                "split": "val",
                "crop": "center",
                "resize": f"shorter side to {r} px",
            }
            inputs["rfid"] = RFIDReference({**protocol, "images": None, "features": self._features})
        try:
            with inference():
                results = evaluate(
                    model,
                    self._val,
                    metrics=cfg.eval.metrics,
                    device=self.device,
                    reduce=lambda t: acc.reduce(t, reduction="sum"),
                    criterion=criterion,
                    max_batches=cfg.eval.max_batches,
                    iw=cfg.eval.iw,
                    seed=cfg.train.seed,
                    lockstep=lockstep,
                    stop=stop,
                    config=cfg.eval,
                    inputs=inputs,
                    **self.eval_nets,
                )
        except EvaluationInterrupted as e:
            self.monitor.write(
                f"eval        step {step}: stopped after {e.batches} batches by a stop request"
            )
            return None
        # The spectra are a plot (latent against RGB), not a curve per frequency bin.
        curves = {k: results.pop(k) for k in list(results) if k.startswith("spectrum/")}
        self.monitor.scalars(step, {f"val/{k}": v for k, v in results.items()})
        if curves:
            self.monitor.spectrum(step, curves)
        self.last_eval = (step, results)
        self.monitor.write(f"eval        step {step}: {headline(results)}")
        if "rfid" in inputs:
            inputs["rfid"].protocol["images"] = int(results["samples"])
            self.monitor.write(f"eval        step {step}: rFID protocol: {inputs['rfid'].describe()}")
        return results

    def _agree(self, has_batch: bool, asked: bool) -> tuple[bool, bool]:
        """Whether any rank has a batch, and whether any rank was asked to stop (one small all-reduce)."""
        flags = torch.tensor([float(has_batch), float(asked)], device=self.device)
        more, stop = (self.acc.reduce(flags, reduction="sum") > 0).tolist()
        return more, stop
