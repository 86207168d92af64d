"""The commands as functions a Python user calls (eval, sample, reconstruct, encode, export, import, compare,
probe, demo); their flags are parsed in vae_scale/cli/."""
