"""The trainer and what it builds: objective, LPIPS, discriminator, EMA, checkpoints, signals, FSDP, logging,
and the checks before a run."""
