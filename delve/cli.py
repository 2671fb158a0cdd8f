"""The ``delve`` command line: ``demo``, ``summary``, ``plot`` and ``recompute``.

Run ``delve --help`` (or ``python -m delve --help``) for the list, and
``delve COMMAND --help`` for each command. Every expected failure (a missing file, a
CSV that the csv writer did not write, a bad option value) ends with one line on
standard error and exit status 1 (2 for a malformed command line); ``--debug``
shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import pandas as pd

from delve.keys import MODES, parse_key
from delve.metrics import get_stat, registered_stats
from delve.table import load_table, stat_groups, write_table
from delve.validation import check_fraction

logger = logging.getLogger(__name__)

DEFAULT_LOW = 0.1
DEFAULT_HIGH = 0.9


class CommandError(Exception):
    """An expected failure of a command: reported as one line, without a traceback."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see '{self.prog} --help')\n")


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


# ------------------------------------------------------------------ reading a run
def load_run_csv(path: str) -> pd.DataFrame:
    """Read a CSV file written by the csv writer, checking that it is one.

    Parameters
    ----------
    path : str
        The ``{savefile}.csv`` of a run.

    Returns
    -------
    pandas.DataFrame
        Index: epoch (int); columns: user scalars, ``{mode}-{stat}_{layer}`` keys and
        ``average-{mode}-sat``, all numeric.

    Raises
    ------
    CommandError
        If the file is missing, unreadable, empty, or not laid out like the csv
        writer's output.

    """
    if os.path.isdir(path):
        raise CommandError(f"{path} is a folder, not a CSV file")
    if not os.path.exists(path):
        raise CommandError(f"no such file: {path}")
    try:
        table = load_table(path)
    except ValueError as err:
        raise CommandError(f"{path} is not a CSV written by delve's csv writer: {_one_line(err)}") from None
    except OSError as err:
        raise CommandError(f"cannot read {path}: {err.strerror or err}") from None
    if not any(parse_key(column) for column in table.columns):
        raise CommandError(
            f"{path} has no statistics column (named like 'train-saturation_LAYER'): "
            "it was not written by delve's csv writer"
        )
    if len(table.index) == 0:
        raise CommandError(f"{path} has no epoch rows yet")
    return table


def layer_columns(columns: Sequence[str]) -> Dict[Tuple[str, str], Dict[str, str]]:
    """Group per-layer scalar columns: ``(mode, layer) -> {short stat: column}``, layers in tracking order."""
    groups: Dict[Tuple[str, str], Dict[str, str]] = {}
    for (stat, mode), pairs in stat_groups(columns).items():
        for layer, column in pairs:
            groups.setdefault((mode, layer), {})[stat] = column
    return groups


# ------------------------------------------------------------------------ summary
def summarize(
    table: pd.DataFrame, low: float = DEFAULT_LOW, high: float = DEFAULT_HIGH, epoch: Optional[int] = None
) -> pd.DataFrame:
    """Tabulate each layer's statistics at its last recorded epoch and flag extreme saturations.

    Parameters
    ----------
    table : pandas.DataFrame
        A run's CSV table (:func:`load_run_csv`).
    low, high : float
        A saturation below ``low`` is flagged ``low``, above ``high`` ``high``.
    epoch : int, optional
        Summarise this epoch instead of each layer's last one.

    Returns
    -------
    pandas.DataFrame
        One row per layer and mode (train layers first, tracking order): ``layer``,
        ``mode``, ``epoch``, one column per scalar stat of the table (``lsat`` and
        ``idim`` first) and ``flag``.

    """
    groups = layer_columns(table.columns)
    present = {stat for columns in groups.values() for stat in columns}
    stats = [s for s in ("lsat", "idim") if s in present] + [
        s.name for s in registered_stats() if s.name in present and s.name not in ("lsat", "idim")
    ]
    rows = []
    for mode in MODES:
        for (group_mode, layer), columns in groups.items():
            if group_mode != mode:
                continue
            values = table[list(columns.values())]
            if epoch is None:
                recorded = values.notna().any(axis=1)
                if not recorded.any():
                    continue
                at = recorded[recorded].index[-1]
            else:
                at = epoch
            row = {"layer": layer, "mode": mode, "epoch": int(at)}
            for stat in stats:
                row[stat] = table.at[at, columns[stat]] if stat in columns else math.nan
            saturation = row.get("lsat", math.nan)
            row["flag"] = "low" if saturation < low else "high" if saturation > high else ""
            rows.append(row)
    frame = pd.DataFrame(rows, columns=["layer", "mode", "epoch", *stats, "flag"])
    if "idim" in frame.columns:
        frame["idim"] = frame["idim"].astype("Int64")  # a count; NaN stays missing
    return frame


def _format_value(stat: str, value) -> str:
    return "-" if pd.isna(value) else get_stat(stat).format(value)


def _text_table(frame: pd.DataFrame) -> str:
    header = list(frame.columns)
    body = [
        [str(v) if c in ("layer", "mode", "epoch", "flag") else _format_value(c, v) for c, v in zip(header, row)]
        for row in frame.itertuples(index=False)
    ]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    numeric = [c not in ("layer", "mode", "flag") for c in header]

    def line(cells):
        return "  ".join(c.rjust(w) if right else c.ljust(w) for c, w, right in zip(cells, widths, numeric)).rstrip()

    return "\n".join([line(header)] + [line(r) for r in body])


def _check_fraction(name: str, value: float) -> float:
    if not 0 <= value <= 1:
        raise CommandError(f"{name} must lie in [0, 1], got {value}")
    return value


def _summary(args: argparse.Namespace) -> int:
    low = _check_fraction("--low", args.low)
    high = _check_fraction("--high", args.high)
    if low >= high:
        raise CommandError(f"--low ({low}) must be below --high ({high})")
    table = load_run_csv(args.csv)
    if args.epoch is not None and args.epoch not in table.index:
        raise CommandError(f"epoch {args.epoch} is not in {args.csv}; its epochs are {list(table.index)}")
    summary = summarize(table, low, high, args.epoch)
    if args.mode != "both":
        summary = summary[summary["mode"] == args.mode]
    if args.format == "csv":
        summary.to_csv(sys.stdout, sep=";", index=False)
        return 0
    last = args.epoch if args.epoch is not None else int(table.index[-1])
    print(f"{args.csv}: {len(table.index)} epoch(s), {summary['layer'].nunique()} layer(s)")
    extras = [c for c in table.columns if not layer_columns([c])]
    scalars = [f"{c}={table.at[last, c]:.4g}" for c in extras if not pd.isna(table.at[last, c])]
    if scalars:
        print(f"epoch {last}: " + ", ".join(scalars))
    print(_text_table(summary))
    if "lsat" not in summary.columns:
        print("no saturation column: nothing flagged")
        return 0
    flagged = summary[summary["flag"] != ""]
    print(
        f"{len(flagged)} of {len(summary)} flagged: saturation below {low:g} (low) "
        f"or above {high:g} (high)"
    )
    return 0


# --------------------------------------------------------------------------- demo
def _demo(args: argparse.Namespace) -> int:
    from delve.demo import run_demo
    from delve.writers import WRITERS, CSVWriter

    if args.epochs < 1 or args.batches < 1:
        raise CommandError(f"--epochs and --batches must be at least 1, got {args.epochs} and {args.batches}")
    options = {} if args.save_to is None else {"save_to": args.save_to}  # None: the demo's own default
    unknown = [key for key in options.get("save_to", ()) if key not in WRITERS]
    if unknown:  # before any data is made
        raise CommandError(f"unknown writer {unknown[0]!r}; valid keys are {sorted(WRITERS)}")
    path = run_demo(args.savefile, epochs=args.epochs, batches=args.batches, seed=args.seed, **options)
    if args.save_to is None or any(issubclass(WRITERS[key], CSVWriter) for key in args.save_to):
        print(f"wrote {path}")
    else:  # no CSV file: name what was written instead
        print(f"wrote {os.path.abspath(args.savefile)} ({' '.join(args.save_to)})")
    return 0


# --------------------------------------------------------------------------- plot
def _plot(args: argparse.Namespace) -> int:
    table = load_run_csv(args.csv)
    if args.epochs is not None:
        missing = [e for e in args.epochs if e not in table.index]
        if missing:
            raise CommandError(f"epochs {missing} are not in {args.csv}; its epochs are {list(table.index)}")
    if args.last:
        epochs: Optional[List[int]] = [int(table.index[-1])]
    else:
        epochs = args.epochs
    prefix = args.output if args.output is not None else os.path.splitext(args.csv)[0]
    folder = os.path.dirname(prefix)
    if folder and not os.path.isdir(folder):
        raise CommandError(f"output folder {folder} does not exist")
    from delve.plotting import plot_table  # matplotlib is paid for by this command only

    paths = plot_table(
        table,
        prefix,
        epochs=epochs,
        fontsize=args.fontsize,
        figsize=tuple(args.figsize),
        primary_metric=args.primary_metric,
    )
    for path in paths:
        print(path)
    if not paths:
        logger.warning("nothing to plot: %s has no scalar statistics", args.csv)
    return 0


# ---------------------------------------------------------------------- recompute
def _recompute(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.npydir):
        what = "is a file, not a folder" if os.path.exists(args.npydir) else "does not exist"
        raise CommandError(f"npy folder {args.npydir} {what}")
    try:
        check_fraction("--thresh", args.thresh, allow_none=True)
    except ValueError as err:
        raise CommandError(str(err)) from None
    savefile = args.output
    if savefile is not None:
        folder = os.path.dirname(savefile)
        if folder and not os.path.isdir(folder):
            raise CommandError(f"output folder {folder} does not exist")
    from delve.tools import reconstruct_csv_from_npy_data

    try:
        table = reconstruct_csv_from_npy_data(args.npydir, savefile=savefile, thresh=args.thresh, stats=args.stats)
    except FileNotFoundError as err:
        raise CommandError(_one_line(err)) from None
    if savefile is None:
        write_table(table, sys.stdout)
    else:
        print(f"wrote {savefile} ({len(table.index)} epoch(s), {len(table.columns)} column(s))")
    return 0


# ------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``delve`` / ``python -m delve``."""
    parser = _Parser(
        prog="delve",
        description="Layer saturation of PyTorch models: run the demo, or inspect the files a run wrote.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback when a command fails")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    demo = commands.add_parser(
        "demo",
        help="train a small CNN on synthetic data and write its saturation",
        description="Train a small CNN on synthetic images for a few epochs with a tracker attached "
        "(stats lsat and idim, average saturation, test accuracy) and write the run's files: by default "
        "SAVEFILE.csv and its plots beside it.",
    )
    demo.add_argument("savefile", nargs="?", default="runs/demo", help="output path without extension (runs/demo)")
    demo.add_argument("--epochs", type=int, default=8, help="number of epochs (8)")
    demo.add_argument("--batches", type=int, default=16, help="training batches per epoch (16)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data and the weights (0)")
    demo.add_argument(
        "--save-to", nargs="+", metavar="KEY", help="writer keys, e.g. csv npy tb (plot: the CSV and its pictures)"
    )
    demo.set_defaults(run=_demo)

    summary = commands.add_parser(
        "summary",
        help="table of each layer's last epoch, flagging very low or high saturation",
        description="Print, for every layer and mode of a run's CSV, the statistics of its last recorded "
        "epoch (saturation and intrinsic dimensionality first, then every other stat the CSV holds), "
        "flagging layers whose saturation is below --low or above --high.",
    )
    summary.add_argument("csv", help="a CSV file written by the csv writer ({savefile}.csv)")
    summary.add_argument("--low", type=float, default=DEFAULT_LOW, help=f"flag saturation below this ({DEFAULT_LOW})")
    summary.add_argument(
        "--high", type=float, default=DEFAULT_HIGH, help=f"flag saturation above this ({DEFAULT_HIGH})"
    )
    summary.add_argument("--epoch", type=int, help="summarise this epoch instead of each layer's last")
    summary.add_argument("--mode", choices=("train", "eval", "both"), default="both", help="modes to show (both)")
    summary.add_argument("--format", choices=("text", "csv"), default="text", help="output format (text)")
    summary.set_defaults(run=_summary)

    plot = commands.add_parser(
        "plot",
        help="per-epoch plots and history heatmaps from a run's CSV",
        description="Draw, from a CSV written by the csv writer, one bar chart per stat, mode and epoch "
        "({prefix}_{stat}_{mode}_epoch_{epoch}.png) and one heatmap of layers x epochs per stat and mode "
        "({prefix}_{stat}_{mode}_history.png). The paths written are printed.",
    )
    plot.add_argument("csv", help="a CSV file written by the csv writer ({savefile}.csv)")
    plot.add_argument("-o", "--output", metavar="PREFIX", help="prefix of the PNG files (the CSV path without .csv)")
    which = plot.add_mutually_exclusive_group()
    which.add_argument("--epochs", type=int, nargs="+", metavar="E", help="epochs to draw (all)")
    which.add_argument("--last", action="store_true", help="draw the last epoch only (and the heatmaps)")
    plot.add_argument("--fontsize", type=float, default=10, help="font size (10)")
    plot.add_argument("--figsize", type=float, nargs=2, default=(10.0, 6.0), metavar=("W", "H"), help="inches")
    plot.add_argument("--primary-metric", metavar="COLUMN", help="a user scalar shown in the titles")
    plot.set_defaults(run=_plot)

    recompute = commands.add_parser(
        "recompute",
        help="rebuild a run's CSV from its npy folder, optionally at another threshold",
        description="Rebuild the CSV table of a run saved with save_to='npy'. With --thresh, saturation and "
        "intrinsic dimensionality are recomputed from the stored covariance matrices (the run must have "
        "tracked the 'cov' stat).",
    )
    recompute.add_argument("npydir", help="the npy writer's folder (the tracker's savefile)")
    recompute.add_argument("--thresh", type=float, help="new saturation threshold in (0, 1]")
    recompute.add_argument("-o", "--output", metavar="OUT.csv", help="file to write (default: print to stdout)")
    recompute.add_argument(
        "--stats", nargs="+", choices=("lsat", "idim"), default=["lsat", "idim"], help="stats to recompute"
    )
    recompute.set_defaults(run=_recompute)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; return the exit status.

    Parameters
    ----------
    argv : list of str, optional
        The arguments (``sys.argv[1:]`` by default).

    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("delve").setLevel(logging.WARNING if args.quiet else logging.INFO)
    prog = f"{parser.prog} {args.command}"
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (CommandError, ValueError, FileNotFoundError) as err:
        # Bad input the library validates (a writer key, a threshold) reads like ours.
        if args.debug:
            raise
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except Exception as err:  # a command line reports, it does not dump a traceback on its user
        if args.debug:
            raise
        print(f"{prog}: error: {type(err).__name__}: {_one_line(err)} (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
