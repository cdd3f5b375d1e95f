"""``python -m diffusers_sdnq``: the same command line as the ``diffusers-sdnq`` console script."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
