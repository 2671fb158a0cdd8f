"""``python -m delve``: the command line."""

import sys

from delve.cli import main

sys.exit(main())
