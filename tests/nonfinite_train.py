"""`vae-scale train` whose loss is made non-finite at one step on one rank: how the fault tests put a real
non-finite step through the trainer's real finite check, skip and rollback, in real processes, without a
testing key in the production config.

    python tests/nonfinite_train.py --nonfinite-step=STEP [--nonfinite-rank=RANK] [vae-scale train args]

support.nonfinite_train_command builds the command (and its `accelerate launch` form).
"""

import sys

from support import poison_loss

from vae_scale.cli import main
from vae_scale.train.trainer import Trainer


def _pop(argv: list[str], flag: str, default: int | None = None) -> int:
    """The value of `--flag=N` in argv (removed from it), or `default`."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"{flag}="):
            del argv[i]
            return int(arg.split("=", 1)[1])
    if default is None:
        raise SystemExit(f"{__file__}: {flag}=N is required")
    return default


if __name__ == "__main__":
    argv = sys.argv[1:]
    step, rank = _pop(argv, "--nonfinite-step"), _pop(argv, "--nonfinite-rank", 0)
    poison_loss(Trainer, step, rank)
    sys.exit(main(["train", *argv]))
