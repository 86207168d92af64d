"""The model families behind one small interface (vae_scale/models/interface.py), their shared layers, the
posterior and tiled encode/decode."""
