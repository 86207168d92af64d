"""Files of weights: diffusers folders and their names, checkpoint folders (layout, manifest, run lock), and
torch.distributed.checkpoint folders read without running code."""
