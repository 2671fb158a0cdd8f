"""``python -m delve``: the command line (see :mod:`delve.cli`)."""

import sys

from delve.cli import main

if __name__ == "__main__":
    sys.exit(main())
