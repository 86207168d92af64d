"""The one check pass before a run: everything that can be checked before a process group starts or a file
is written, with every problem found at once.

    findings = check_run(cfg)        # nothing created, locked or loaded
    findings.raise_if_any()          # one problem: its own one-line error; several: NotReady listing all
    Trainer(findings.cfg, findings.plan, weights=findings.weights)

What it checks: a config that can train (data.train, the resolution against the model's downsampling, the
places checkpoint.resume and model.init_from name, clips only for a family that takes them); a checkpoint to
resume trained with the same model and a new phase that keeps the model's shape (startup.py); the sharding the
launch asks for (fsdp.py); validation samples when in-loop evaluation is on; usable images in a sample of the
data; the W&B login when online; the LPIPS, Inception and model.init_from weight files; room on run.dir's
disk; a run folder that can be written and is not in use by another run. What it finds is handed on, so
nothing is looked up twice: the FSDP plan, the weight files, and the config with model.init_from pinned to the
file or checkpoint found.

Each problem is one line naming the key or the place. Locking the run folder (startup.prepare_run_dir) and
describing the launch (preflight.py) come after, once the Trainer is built.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vae_scale.config import Config, ConfigError, DataConfig, LogConfig, ModelConfig
from vae_scale.data.sample import SAMPLE_SIZE, read_data_sample
from vae_scale.data.shard_reader import DataError
from vae_scale.data.synthetic import SYNTHETIC
from vae_scale.files import OutputError, check_writable_dir
from vae_scale.formats.checkpoint import DamagedCheckpoint, RunLock
from vae_scale.models.interface import build_model
from vae_scale.train.alignment import encoder_file_problem
from vae_scale.train.disk import disk_problem
from vae_scale.train.fsdp import FSDPPlan, fsdp_plan
from vae_scale.train.startup import check_new_phase, check_resume, check_trainable

log = logging.getLogger(__name__)

USAGE_ERRORS = (ConfigError, OutputError, DataError, DamagedCheckpoint, FileNotFoundError)
"""What a check raises for a problem the user can fix (each a one-line message, exit code 2)."""


class NotReady(ConfigError):
    """Several things a run needs are missing or wrong; the message lists every one."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "".join(f"\n  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) found before step 1:{lines}")


@dataclass
class WeightFiles:
    """The weight files a run reads, found once on local disk (None where the run needs none)."""

    lpips: tuple[Path, Path] | None = None
    """(LPIPS heads, VGG16): for loss.perceptual_weight > 0 and the in-loop lpips metric."""
    inception: Path | None = None
    """The rFID feature extractor: for the in-loop rfid metric."""
    i3d: Path | None = None
    """The FVD feature extractor: for the in-loop fvd metric."""

    def paths(self) -> dict[str, str]:
        """As metrics.load_eval_nets's path arguments: the files found, so it looks nowhere else."""
        heads, vgg = self.lpips or ("", "")
        return {
            "lpips_path": str(heads),
            "vgg_path": str(vgg),
            "inception_path": str(self.inception or ""),
            "i3d_path": str(self.i3d or ""),
        }


@dataclass
class Findings:
    """What the check pass found: the problems (each an error with a one-line message), and what it looked
    up for the run, to be handed on."""

    cfg: Config
    """The config checked, model.init_from pinned to the file or checkpoint found (config.yaml records it)."""
    plan: FSDPPlan = field(default_factory=FSDPPlan)
    weights: WeightFiles = field(default_factory=WeightFiles)
    errors: list[Exception] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        """One line per problem, in the order found."""
        return [str(e) for e in self.errors]

    def add(self, problem: str | Exception | None) -> None:
        """Record a problem (a line is recorded as a ConfigError); None is no problem."""
        if problem is not None:
            self.errors.append(ConfigError(problem) if isinstance(problem, str) else problem)

    @contextmanager
    def catching(self) -> Iterator[None]:
        """Record a usage error raised inside, and go on with the next check."""
        try:
            yield
        except USAGE_ERRORS as e:
            self.errors.append(e)

    def raise_if_any(self) -> None:
        """Stop the run: one problem with its own error (one line), several with NotReady listing them."""
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            raise NotReady(self.problems)


def check_run(cfg: Config, cuda: bool | None = None) -> Findings:
    """Every check before a run (see the module docstring), every problem collected. Creates, locks and
    loads nothing; reads a sample of the data, the checkpoint to resume's config and the W&B login.

    cuda: whether the run will use GPUs (default: whether one is available), for the FSDP plan.
    """
    findings = Findings(cfg)
    for problem in _config_problems(cfg):
        findings.add(problem)
    with findings.catching():
        check_resume(cfg)
    with findings.catching():
        check_trainable(cfg)
    init = _init_from_problem_or_path(cfg, findings)
    with findings.catching():
        findings.plan = fsdp_plan(cfg, cuda=torch.cuda.is_available() if cuda is None else cuda)
    val = _val_problem(cfg.data, cfg.eval.every) if cfg.eval.every else None
    wandb = _wandb_problem(cfg.log)
    findings.add(val)
    findings.add(wandb)
    if not (val or wandb) or not cfg.eval.every:  # data.val's sample only once it has samples
        for problem in _sample_problems(cfg):
            findings.add(problem)
    findings.weights = _find_weights(cfg, findings)
    if cfg.loss.align_weight > 0:  # the VF loss's frozen vision encoder, from a local file
        findings.add(encoder_file_problem(cfg.loss.align_encoder))
    if init is not None:
        findings.cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=str(init)))
    else:
        findings.add(_missing_init_from(cfg.model))
    findings.add(disk_problem(cfg))
    with findings.catching():
        check_run_dir(cfg.run.dir)
    return findings


# --------------------------------------------------------------------------------------------------------
# The config and the places it names


def _config_problems(cfg: Config) -> list[str]:
    """A config that can train: data to train on, a resolution the model can downsample, a checkpoint to
    resume that exists. (An empty data.val with eval.every > 0 is _val_problem's.)"""
    problems = []
    if not cfg.data.train:
        problems.append("data.train is empty: give shards (a pattern, folder or list) or 'synthetic'")
    factor = cfg.model.downsample_factor
    if factor > cfg.data.resolution or cfg.data.resolution % factor:
        problems.append(
            f"data.resolution={cfg.data.resolution} is not a multiple of the model's downsampling "
            f"factor {factor}"
        )
    if cfg.train.compile and cfg.train.compile_backend not in _compile_backends(debugging=True):
        problems.append(
            f"train.compile_backend={cfg.train.compile_backend!r} is not a torch.compile backend; "
            f"backends: {' '.join(_compile_backends())} (and debugging ones such as aot_eager)"
        )
    if cfg.checkpoint.resume not in ("auto", "never") and not Path(cfg.checkpoint.resume).exists():
        problems.append(f"checkpoint.resume={cfg.checkpoint.resume!r}: no such checkpoint or run folder")
    return problems + _clip_problems(cfg) + _metric_problems(cfg)


def _compile_backends(debugging: bool = False) -> list[str]:
    """The backends torch.compile takes here; debugging: those tagged for debugging (aot_eager) too."""
    import torch._dynamo

    return torch._dynamo.list_backends(exclude_tags=() if debugging else ("debug", "experimental"))


CLIP_LOSS_KEYS = ("se_weight", "eq_weight", "align_weight")
"""Loss terms written for images (latent transforms of 2-D latents, a ViT's image features): off for clips."""


def _clip_problems(cfg: Config) -> list[str]:
    """data.frames > 1 needs a family whose model takes clips (B, 3, T, H, W), T of its temporal stride,
    and none of the image-only loss terms."""
    frames = cfg.data.frames
    if frames == 1:
        return []
    with torch.device("meta"):  # nothing allocated: the shapes only
        model = build_model(cfg.model)
    stride = getattr(model, "temporal_downsample_factor", None)
    if stride is None:
        return [
            f"data.frames={frames}: model.family={cfg.model.family} takes images only (clips need a video "
            "family: wan); set data.frames=1"
        ]
    problems = []
    if (frames - 1) % stride:
        problems.append(f"data.frames={frames}: the model takes 1 + {stride}k frames")
    for key in CLIP_LOSS_KEYS:
        if getattr(cfg.loss, key) > 0:
            problems.append(f"loss.{key} > 0 is for images; with data.frames={frames} set it to 0")
    return problems


def _init_from_problem_or_path(cfg: Config, findings: Findings) -> Path | None:
    """The file, folder or checkpoint model.init_from leads to (a run: its newest intact checkpoint, checked
    to keep the model's shape), or None when it is unset, missing or refused (the problem is recorded)."""
    if not cfg.model.init_from:
        return None
    path = Path(cfg.model.init_from).expanduser()
    if not path.exists():
        return None  # _missing_init_from names it, among the weight files
    given = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=str(path)))
    with findings.catching():
        return check_new_phase(given) or path
    return None


def _missing_init_from(model: ModelConfig) -> str | None:
    """model.init_from names a place that does not exist (a `~` in it expanded)."""
    init = model.init_from
    if init and not Path(init).expanduser().exists():
        return f"model.init_from={init!r}: no such file or folder"
    return None


def check_run_dir(run_dir: str | Path) -> None:
    """run.dir and its checkpoints/ and images/ can be written (a missing run folder: its nearest existing
    parent), and (on rank 0, the one that takes it) no other run holds the folder's lock. OutputError naming
    the place or the holder.

    Creates and locks nothing: the run itself does that (startup.prepare_run_dir)."""
    run_dir = Path(run_dir)
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists() or p == Path(p.anchor))
    what = "run.dir" if existing == run_dir else f"run.dir {run_dir}: its parent"
    check_writable_dir(existing, what, create=False)
    for sub in ("checkpoints", "images"):
        check_writable_dir(run_dir / sub, f"run.dir's {sub}/", create=False)
    if int(os.environ.get("RANK", "0")) == 0:  # the others would find rank 0's lock, taken once it passed
        RunLock(run_dir).check_free()


# --------------------------------------------------------------------------------------------------------
# Data: validation samples, and a sample read as the loader reads it


def _val_problem(data: DataConfig, every: int) -> str | None:
    """data.val must hold at least one sample when in-loop evaluation is on (eval.every > 0; local shards
    are counted, remote ones are read at the first evaluation)."""
    from vae_scale.data.shard_reader import count_samples, expand_shards

    if not data.val:
        return f"eval.every={every} evaluates on data.val, which is empty (set it, or eval.every=0)"
    try:
        urls = expand_shards(data.val, "val")
    except DataError as e:
        return f"eval.every={every}: data.val: {e}"
    if count_samples(urls) == 0:
        return (
            f"eval.every={every}: data.val={data.val} holds no samples ({len(urls)} empty "
            "shards); write some with `vae-scale shards --val-fraction`, or set eval.every=0"
        )
    return None


def _sampled_splits(cfg: Config) -> list[str]:
    """The splits whose sample is read: train, and val when evaluating (shards, not synthetic or none)."""
    splits = ("train", "val") if cfg.eval.every and cfg.data.val else ("train",)
    return [s for s in splits if getattr(cfg.data, s) not in ("", SYNTHETIC)]


def _sample_problems(cfg: Config) -> list[str]:
    """A sample of data.train (and data.val when evaluating) must hold usable images, and not more bad
    ones than data.max_error_fraction allows."""
    from vae_scale.data.decode import too_small_remedy

    problems = []
    for split in _sampled_splits(cfg):
        try:
            sample = read_data_sample(cfg.data, split)
        except DataError as e:
            problems.append(f"data.{split}: {e}")
            continue
        where = f"{sample.read} samples read from {sample.shards} of {sample.total_shards} shards"
        bad = sum(sample.bad.values())
        if sample.usable == 0:
            why = []
            if sample.too_small:
                lo, hi = sample.small_sides
                why.append(
                    f"{sample.too_small} smaller than the {cfg.data.resolution} px crop (short sides "
                    f"{lo}-{hi} px): {too_small_remedy(cfg.data.resolution, hi)}"
                )
            if sample.too_short:
                why.append(
                    f"{sample.too_short} videos shorter than a clip of data.frames={cfg.data.frames} at "
                    f"data.frame_stride={cfg.data.frame_stride}"
                )
            if bad:
                why.append(f"{bad} bad, the first: {sample.first_bad}")
            reason = "; ".join(why) if why else "no samples at all"
            problems.append(f"{sample.key}: none of the {where} is usable: {reason}")
        elif sample.read >= SAMPLE_SIZE and bad / sample.read > cfg.data.max_error_fraction:
            problems.append(
                f"{sample.key}: {bad} of the {where} are bad ({bad / sample.read:.0%} > "
                f"data.max_error_fraction={cfg.data.max_error_fraction}), so the loader would stop the run; "
                f"the first: {sample.first_bad}"
            )
    return problems


def sample_lines(cfg: Config) -> list[str]:
    """The dry-run's lines on what the loader makes of a sample of the data (read_data_sample)."""
    return [read_data_sample(cfg.data, s).line(cfg.data.resolution) for s in _sampled_splits(cfg)]


# --------------------------------------------------------------------------------------------------------
# Weight files and the W&B login


def _find_weights(cfg: Config, findings: Findings) -> WeightFiles:
    """The LPIPS, Inception and I3D files the losses and the in-loop metrics need, found (not loaded) on local
    disk; a missing one is recorded as a problem naming the key."""
    from vae_scale.eval.fvd import find_i3d
    from vae_scale.eval.lpips import LossConfigError, find_lpips_weights
    from vae_scale.eval.metrics import MetricError, find_inception

    found = WeightFiles()
    lpips_metric = cfg.eval.every and "lpips" in cfg.eval.metrics
    if cfg.loss.perceptual_weight > 0 or lpips_metric:
        try:
            found.lpips = find_lpips_weights(cfg.loss)
        except LossConfigError as e:
            findings.add(str(e) if cfg.loss.perceptual_weight > 0 else f"eval.metrics has lpips: {e}")
    if cfg.eval.every and "rfid" in cfg.eval.metrics:
        try:
            found.inception = find_inception(cfg.eval.inception_path)
        except MetricError as e:
            findings.add(f"eval.metrics has rfid: {e}")
    if cfg.eval.every and "fvd" in cfg.eval.metrics:
        try:
            found.i3d = find_i3d(cfg.eval.i3d_path)
        except MetricError as e:
            findings.add(f"eval.metrics has fvd: {e}")
    return found


def _metric_problems(cfg: Config) -> list[str]:
    """In-loop metrics that do not apply to what data.val holds: clips when data.frames > 1 (rfid,
    equivariance, tile_consistency are for images), images otherwise (flicker, fvd are for clips)."""
    from vae_scale.eval.metrics import MetricError, check_applies
    from vae_scale.eval.registry import METRICS, check_metrics

    if not cfg.eval.every:
        return []
    try:
        names = check_metrics(cfg.eval.metrics)
        check_applies([METRICS[m] for m in names], clips=cfg.data.frames > 1)
    except MetricError as e:
        return [f"eval.metrics: {e} (data.frames={cfg.data.frames})"]
    return []


def _wandb_problem(log_cfg: LogConfig) -> str | None:
    """log.wandb=online needs W&B credentials on this machine (checked without the network)."""
    if log_cfg.wandb != "online":
        return None
    try:
        import wandb
    except ImportError:
        return "log.wandb=online needs the wandb package (pip install wandb), or log.wandb=disabled"
    mode = os.environ.pop("WANDB_MODE", None)  # log.wandb=online is what the run will use, whatever it says
    try:
        wandb.login(verify=False)
    except Exception as e:  # wandb's UsageError: no key, and no terminal to ask for one
        return (
            f"log.wandb=online cannot log in to W&B ({e}): run `wandb login` or set WANDB_API_KEY, or use "
            "log.wandb=offline (and `wandb sync` the run folder later)"
        )
    finally:
        if mode is not None:
            os.environ["WANDB_MODE"] = mode
    return None


WANDB_REACH_TIMEOUT_S = 5.0
"""How long the start of a log.wandb=online run waits to learn whether W&B's server answers."""


def wandb_unreachable(timeout_s: float = WANDB_REACH_TIMEOUT_S) -> str | None:
    """Why W&B's server (WANDB_BASE_URL, else api.wandb.ai) cannot be reached, or None when a TCP connection
    to it opens within `timeout_s`. Name resolution runs in a daemon thread, so a resolver that hangs
    cannot hold the run for longer than `timeout_s` either."""
    import socket
    import threading
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host, port = url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(f"{type(e).__name__}: {e.strerror or e}")

    thread = threading.Thread(target=connect, name="wandb-reachable", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        return f"{host}:{port} did not answer within {timeout_s:g} s"
    return None if outcome[0] is None else f"{host}:{port}: {outcome[0]}"


def wandb_fallback(cfg: Config) -> Config:
    """cfg, or a copy logging offline (with a warning saying so) when log.wandb=online and W&B's server
    cannot be reached: the run's metrics are kept for `wandb sync` instead of failing at the first log."""
    if cfg.log.wandb != "online":
        return cfg
    why = wandb_unreachable()
    if why is None:
        return cfg
    log.warning(
        "log.wandb=online, but W&B cannot be reached (%s): logging offline to %s/wandb instead; "
        "`wandb sync %s/wandb/offline-run-*` uploads it later (log.wandb=offline says so up front)",
        why,
        cfg.run.dir,
        cfg.run.dir,
    )
    return dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, wandb="offline"))
