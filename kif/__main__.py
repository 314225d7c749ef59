"""`python -m kif ...` and `torchrun --nproc-per-node N -m kif ...`: the `kif` command line."""

import sys

from kif.cli import main

if __name__ == "__main__":
    sys.exit(main())
