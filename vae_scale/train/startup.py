"""The run folder and what it resumes: a checkpoint to resume trained with the same model, a new phase
(model.init_from naming a run) that keeps the model's shape, data commands a run folder's config.yaml may
not run unless typed, what a dry run says it would resume, and the run folder created and locked (rank 0
holds the lock for the run's life).

The checks raise one line naming the key or the place (ConfigError, DataError); checks.check_run gathers
them with every other check before a run, so all problems are reported at once.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml

from vae_scale.config import Config, ConfigError, ModelConfig, config_from_dict
from vae_scale.data.shard_reader import refuse_commands_from_file
from vae_scale.files import check_writable_dir, check_writable_file
from vae_scale.formats.checkpoint import (
    LOCK,
    MARKER,
    DamagedCheckpoint,
    RunLock,
    checkpoints_newest_first,
    is_complete,
    newest_intact,
    verify_checkpoint,
)
from vae_scale.train.run_state import phase_start
from vae_scale.train.trainable import trainable_names

log = logging.getLogger(__name__)

RESUME_MODEL_KEYS = ModelConfig.WEIGHT_KEYS
"""The model keys a checkpoint to resume must share with the config (those that shape the weights)."""


RUN_FOLDER_SIGNS = ("checkpoints", "metrics.jsonl", LOCK, "init", MARKER)
"""What a folder holds when it is a run folder (or a checkpoint), whatever wrote it."""


def check_config_commands(config_path: str | None, cfg: Config, typed: set[str]) -> None:
    """DataError when --config is a run folder's saved config.yaml (or a checkpoint's) and its data.train (or
    data.val, when evaluation is on) is a shell command (`pipe:`) that the command line (`typed`: the keys
    given there) does not give again.

    A preset or a YAML file of the user's own may hold a command: the user named that file. A run folder
    may be someone else's (a shared file system), so what its files say to run is run only when typed.
    """
    if not config_path or not Path(config_path).is_file():
        return
    folder = Path(config_path).resolve().parent
    if not any((folder / sign).exists() for sign in RUN_FOLDER_SIGNS):
        return
    for split in ("train", "val") if cfg.eval.every else ("train",):  # data.val is read by evaluation only
        key = f"data.{split}"
        if key not in typed:
            how = f"give {key}='...' (or --data for data.train) on the command line if you trust it"
            refuse_commands_from_file(getattr(cfg.data, split), key, config_path, how)


def check_trainable(cfg: Config) -> None:
    """train.trainable / train.frozen select at least one parameter, each pattern at least one: checked on
    the names of a model built on the meta device (no memory). ConfigError naming the pattern."""
    if cfg.train.trainable or cfg.train.frozen:
        import torch

        from vae_scale.models.interface import build_model

        with torch.device("meta"):
            names = [n for n, _ in build_model(cfg.model).named_parameters()]
        trainable_names(names, cfg.train)


def check_resume(cfg: Config) -> None:
    """Refuse, before anything is written, to resume a checkpoint trained with another model.

    The checkpoint is the one checkpoint.resume names (auto, or a run folder: its newest complete checkpoint
    whose config.yaml is intact). ConfigError names the checkpoint and every differing key with both values.
    """
    resume = cfg.checkpoint.resume
    if resume == "never":
        return
    given = Path(cfg.run.dir if resume == "auto" else resume)
    candidates = [given] if is_complete(given) else checkpoints_newest_first(given / "checkpoints")
    # The newest whose config.yaml is intact and reads: a damaged checkpoint is passed over at resume too.
    for path in candidates:
        try:
            verify_checkpoint(path, ["config.yaml"])
            saved = config_from_dict(yaml.safe_load((path / "config.yaml").read_text()))
            break
        except (DamagedCheckpoint, OSError, ValueError, yaml.YAMLError):  # ConfigError is a ValueError
            continue
    else:
        return
    pairs = [(f"model.{k}", getattr(saved.model, k), getattr(cfg.model, k)) for k in RESUME_MODEL_KEYS]
    # The loss's saved state: learned likelihood parameters, the discriminator and its optimizer.
    old, new = saved.loss, cfg.loss
    pairs.append(("loss.recon", old.recon, new.recon))
    if old.recon == new.recon == "logistic":
        pairs.append(("loss.logistic_per_channel", old.logistic_per_channel, new.logistic_per_channel))
    if old.disc_weight > 0 and new.disc_weight > 0:
        pairs += [(f"loss.{k}", getattr(old, k), getattr(new, k)) for k in ("disc_layers", "disc_channels")]
    # What trains shapes the optimizer state and the EMA a checkpoint holds.
    pairs += [(f"train.{k}", getattr(saved.train, k), getattr(cfg.train, k)) for k in ("trainable", "frozen")]
    differ = [f"{key} {a} -> {b}" for key, a, b in pairs if a != b]
    if (old.disc_weight > 0) != (new.disc_weight > 0):  # the discriminator comes or goes
        differ.append(f"loss.disc_weight {old.disc_weight:g} -> {new.disc_weight:g}")
    if (old.align_weight > 0) != (new.align_weight > 0):  # the VF loss's projection comes or goes
        differ.append(f"loss.align_weight {old.align_weight:g} -> {new.align_weight:g}")
    if differ:
        raise ConfigError(
            f"{path} was trained with another model than this config ({'; '.join(differ)}): give the "
            "checkpoint's values, another run.dir, or checkpoint.resume=never to start afresh (existing "
            "checkpoints are then moved aside, not deleted); to go on from its weights with new loss "
            f"settings, start a new phase: model.init_from={path} with another run.name (docs/phases.md)"
        )


def check_new_phase(cfg: Config) -> Path | None:
    """The checkpoint a new phase starts from (model.init_from naming a run: its newest intact one), or None
    when model.init_from is not a run or a checkpoint. Refuses, before anything is written, one trained
    with another model shape, or one of this run's own.

    Loss, optimizer and training settings may all differ: that is what a new phase is for.
    """
    init = cfg.model.init_from
    if not init or not Path(init).exists():
        return None  # checks.check_run names a missing one
    phase = phase_start(init)
    if phase is None:  # a diffusers folder or a weights file (`vae-scale import` puts one in the run folder)
        return None
    path, saved = phase
    own = Path(cfg.run.dir).resolve()
    if path.resolve() == own or own in path.resolve().parents:
        raise ConfigError(
            f"model.init_from={init!r} is this run's own folder {cfg.run.dir}: a new phase goes in a new run "
            "folder (another run.name or run.dir); re-running in the same folder resumes it"
        )
    differ = [
        f"model.{k} {getattr(saved.model, k)} -> {getattr(cfg.model, k)}"
        for k in RESUME_MODEL_KEYS
        if getattr(saved.model, k) != getattr(cfg.model, k)
    ]
    if differ:
        raise ConfigError(
            f"model.init_from={init!r}: {path} has another model shape than this config "
            f"({'; '.join(differ)}); a new phase keeps the model's shape: give the checkpoint's values"
        )
    return path


def resume_plan(cfg: Config) -> str:
    """What a run would resume from, as the dry-run says it: one line; each checkpoint it would pass over
    (damaged, or holding optimizer state that would be refused) is logged as a warning naming the file.

    DamagedCheckpoint, as the run itself would raise it, when checkpoint.resume names a damaged checkpoint
    or every candidate is damaged.
    """
    resume = cfg.checkpoint.resume
    if resume == "never":
        return "resume         never: the run starts afresh (existing checkpoints would be moved aside)"
    given = Path(cfg.run.dir if resume == "auto" else resume)
    if is_complete(given):
        verify_checkpoint(given)
        path, damaged = given, []
    else:
        path, damaged = newest_intact(given)
    for _, why in damaged:
        log.warning("the run would skip a damaged checkpoint: %s", why)
    if path is None and damaged:
        raise DamagedCheckpoint(
            f"no intact checkpoint to resume from ({len(damaged)} damaged, the newest: {damaged[0][1]}); "
            "move them away or give checkpoint.resume=never to start afresh"
        )
    if path is None:
        return "resume         nothing to resume: the run starts at step 0"
    passed = f", passing over {len(damaged)} damaged" if damaged else ""
    return f"resume         from {path}{passed}"


def prepare_run_dir(run_dir: str | Path) -> RunLock | None:
    """Create the run folder; rank 0 locks it and returns the lock. OutputError (one line naming the place
    or the run holding it) when it cannot be written or another run holds it: checks.check_run_dir said so
    before any process started, unless something changed since.
    """
    run_dir = check_writable_dir(run_dir, "run.dir")
    for sub in ("checkpoints", "images"):
        check_writable_dir(run_dir / sub, f"run.dir's {sub}/", create=False)
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    lock = RunLock(run_dir).acquire()
    try:
        for name in ("config.yaml", "metrics.jsonl", "report.html"):
            if (run_dir / name).exists():
                check_writable_file(run_dir / name, f"run.dir's {name}")
    except BaseException:
        lock.release()
        raise
    return lock
