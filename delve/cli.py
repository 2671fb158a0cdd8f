"""The ``delve`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional


def _demo(args: argparse.Namespace) -> int:
    from delve.demo import run_demo

    path = run_demo(args.savefile, epochs=args.epochs)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``python -m delve``."""
    parser = argparse.ArgumentParser(prog="delve", description="Layer saturation of PyTorch models.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a small CNN on synthetic data and write its saturation")
    demo.add_argument("savefile", nargs="?", default="runs/demo", help="output path without extension")
    demo.add_argument("--epochs", type=int, default=8, help="number of epochs (default 8)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
