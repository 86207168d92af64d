"""`python -m vae_scale` is the `vae-scale` command."""

import sys

from vae_scale.cli import main

if __name__ == "__main__":
    sys.exit(main())
