"""Pictures of a run's statistics, drawn from the table the CSV writer writes.

Every function here works on a :class:`pandas.DataFrame` laid out like the CSV file
(index: epoch; columns: user scalars and ``{mode}-{statname}_{layer}`` keys), so the
same pictures can be drawn during training (by
:class:`~delve.writers.CSVandPlottingWriter`) or afterwards from any CSV::

    from delve.plotting import plot_table, read_table
    plot_table(read_table("runs/vgg.csv"), "runs/vgg")

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas: no window
is ever opened, pyplot's global figure registry is never touched, and every figure is
cleared as soon as its file is written. Files go through :func:`delve._files.atomic_path`.

File names (``stat`` is the short stat name, e.g. ``lsat``; ``mode`` is ``train`` or ``eval``):

* ``{savefile}_{stat}_{mode}_epoch_{epoch}.png`` — one bar per layer, in tracking order;
* ``{savefile}_{stat}_{mode}_history.png`` — heatmap, layers × epochs;
* ``{savefile}_{stat}_{mode}_epoch_{epoch}.png`` for a vector statistic (``spectrum``: the
  leading eigenvalues) — one bar panel per layer;
* ``{savefile}_{stat}_{mode}_epoch_{epoch}.png`` for samples (``embed``) — one scatter per layer.

What is drawn, and how a value is shown, comes from each statistic's declaration
(:class:`delve.metrics.Statistic`): statistics added with :func:`delve.metrics.register_stat`
are drawn like the built-in ones.
"""

from __future__ import annotations

import io
import logging
import math
from collections import OrderedDict
from numbers import Real
from typing import TYPE_CHECKING, Callable, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from delve._files import atomic_path
from delve.keys import average_key, parse_key
from delve.metrics import get_stat
from delve.table import read_table, stat_groups

if TYPE_CHECKING:  # matplotlib is imported on first use: plain tracking never pays for it
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_FIGSIZE",
    "DEFAULT_FONTSIZE",
    "check_plot_options",
    "embedding_figure",
    "epoch_figure",
    "history_figure",
    "plot_embeddings",
    "plot_epochs",
    "plot_history",
    "plot_spectra",
    "plot_table",
    "plot_vectors",
    "png_bytes",
    "read_table",
    "spectrum_figure",
    "stat_groups",
]

DEFAULT_FONTSIZE = 10
DEFAULT_FIGSIZE = (10.0, 6.0)
DPI = 100
#: Above this many cells a heatmap is not annotated with its values (they would not be legible).
ANNOTATE_CELLS = 150
#: Above this many layers the per-epoch bars carry no value labels.
LABEL_BARS = 40

AxesFunc = Optional[Callable[["Axes"], Optional["Axes"]]]


# ---------------------------------------------------------------- inputs
def check_plot_options(fontsize=DEFAULT_FONTSIZE, figsize=DEFAULT_FIGSIZE, primary_metric=None,
                       plot_manipulation_func=None) -> Tuple[float, Tuple[float, float]]:
    """Validate the drawing options; return ``(fontsize, figsize)`` as floats.

    Raises
    ------
    ValueError, TypeError
        Naming the bad value and what is expected.

    """
    if isinstance(fontsize, bool) or not isinstance(fontsize, Real) or not fontsize > 0:
        raise ValueError(f"fontsize must be a positive number, got {fontsize!r}")
    try:
        width, height = figsize
    except (TypeError, ValueError):
        raise ValueError(f"figsize must be a pair (width, height) in inches, got {figsize!r}") from None
    for side in (width, height):
        if isinstance(side, bool) or not isinstance(side, Real) or not side > 0:
            raise ValueError(f"figsize must be a pair of positive numbers (inches), got {figsize!r}")
    if primary_metric is not None and not isinstance(primary_metric, str):
        raise TypeError(f"primary_metric must be the name of a scalar you record, or None; got {primary_metric!r}")
    if plot_manipulation_func is not None and not callable(plot_manipulation_func):
        raise TypeError(
            "plot_manipulation_func must be a callable (ax) -> ax, or None; "
            f"got {type(plot_manipulation_func).__name__}"
        )
    return float(fontsize), (float(width), float(height))


def _check_primary(table: pd.DataFrame, primary_metric: Optional[str]) -> None:
    if primary_metric is not None and primary_metric not in table.columns:
        users = [c for c in table.columns if parse_key(c) is None]
        raise ValueError(f"primary_metric {primary_metric!r} is not a column of the table; user scalars are {users}")


def _primary_text(table: pd.DataFrame, primary_metric: Optional[str], epoch) -> str:
    if primary_metric is None or epoch not in table.index:
        return ""
    value = table.at[epoch, primary_metric]
    if pd.isna(value):
        return ""
    return f"{primary_metric}: {float(value):.4g}"


# --------------------------------------------------------------- figures
def _new_figure(figsize) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _manipulate(ax: Axes, func: AxesFunc) -> Axes:
    if func is None:
        return ax
    result = func(ax)
    return ax if result is None else result


def _render(figure: Figure, target) -> None:
    try:
        figure.savefig(target, format="png", dpi=DPI)
    finally:
        # Drop the artists now rather than whenever the garbage collector runs.
        figure.clear()


def png_bytes(figure: Figure) -> bytes:
    """Render a figure of this module as PNG (``figsize`` × 100 pixels) and clear it.

    The PNG files and the TensorBoard images are both rendered this way, so they are the same pictures.
    """
    buffer = io.BytesIO()
    _render(figure, buffer)
    return buffer.getvalue()


def _save(figure: Figure, path: str) -> str:
    with atomic_path(path) as tmp:
        _render(figure, tmp)
    return path


def _long_label(stat: str) -> str:
    return get_stat(stat).label


def epoch_figure(
    table: pd.DataFrame,
    stat: str,
    mode: str,
    epoch: int,
    fontsize: float = DEFAULT_FONTSIZE,
    figsize: Sequence[float] = DEFAULT_FIGSIZE,
    primary_metric: Optional[str] = None,
    plot_manipulation_func: AxesFunc = None,
) -> Figure:
    """Draw one stat of one mode at one epoch: a bar per layer, layers in tracking order.

    Saturation is drawn on a fixed 0–1 axis so that epochs compare at a glance; when
    the table holds ``average-{mode}-sat``, it is drawn as a dashed line.

    Parameters
    ----------
    table : pandas.DataFrame
        The CSV writer's table.
    stat : str
        Short stat name (``lsat``, ``idim``, ``trc`` …).
    mode : {'train', 'eval'}
        The mode whose columns are drawn.
    epoch : int
        A row of ``table``.
    fontsize, figsize, primary_metric, plot_manipulation_func
        See :func:`plot_table`.

    Returns
    -------
    matplotlib.figure.Figure

    """
    fontsize, figsize = check_plot_options(fontsize, figsize, primary_metric, plot_manipulation_func)
    columns = stat_groups(table.columns).get((stat, mode))
    if not columns:
        raise ValueError(f"the table has no {stat!r} column for mode {mode!r}")
    if epoch not in table.index:
        raise ValueError(f"epoch {epoch!r} is not in the table; epochs are {list(table.index)}")
    layers = [layer for layer, _ in columns]
    values = table.loc[epoch, [column for _, column in columns]].to_numpy(dtype=np.float64)

    figure = _new_figure(figsize)
    ax = figure.add_subplot()
    positions = np.arange(len(layers))
    bars = ax.bar(positions, values, color="tab:blue" if mode == "train" else "tab:orange")
    ax.set_xticks(positions)
    ax.set_xticklabels(layers, rotation=45 if len(layers) > 4 else 0, ha="right" if len(layers) > 4 else "center",
                       fontsize=fontsize)
    ax.tick_params(axis="y", labelsize=fontsize)
    ax.set_xlabel("layer", fontsize=fontsize)
    ax.set_ylabel(_long_label(stat), fontsize=fontsize)
    statistic = get_stat(stat)
    if statistic.limits is not None:
        ax.set_ylim(*statistic.limits)
    average_column = average_key(mode)
    if average_column.stat == stat and average_column in table.columns and not pd.isna(table.at[epoch, average_column]):
        average = float(table.at[epoch, average_column])
        ax.axhline(average, color="black", linestyle="--", linewidth=1, label=f"average {statistic.format(average)}")
        ax.legend(fontsize=fontsize)
    if len(layers) <= LABEL_BARS:
        labels = [statistic.format(v) if math.isfinite(v) else "" for v in values]
        ax.bar_label(bars, labels=labels, fontsize=fontsize * 0.8)
    title = f"{_long_label(stat)} ({mode}), epoch {epoch}"
    primary = _primary_text(table, primary_metric, epoch)
    ax.set_title(f"{title} — {primary}" if primary else title, fontsize=fontsize * 1.2)
    _manipulate(ax, plot_manipulation_func)
    return figure


def _history_epochs(table: pd.DataFrame, columns: List[str]) -> list:
    # From the first to the last epoch holding a value: a row with only user scalars
    # (say, logged after the last epoch) does not add an empty column.
    present = table[columns].notna().any(axis=1)
    if not present.any():
        return []
    epochs = list(table.index)
    first = epochs.index(present[present].index[0])
    last = epochs.index(present[present].index[-1])
    return epochs[first : last + 1]


def history_figure(
    table: pd.DataFrame,
    stat: str,
    mode: str,
    fontsize: float = DEFAULT_FONTSIZE,
    figsize: Sequence[float] = DEFAULT_FIGSIZE,
    primary_metric: Optional[str] = None,
    plot_manipulation_func: AxesFunc = None,
) -> Figure:
    """Draw one stat of one mode over the whole run: a heatmap, layers (rows) × epochs (columns).

    Layers are in tracking order from top to bottom; saturation uses a fixed 0–1 colour
    scale. Missing values (a stopped epoch, a layer that saw no data) are left blank.

    Returns
    -------
    matplotlib.figure.Figure

    """
    fontsize, figsize = check_plot_options(fontsize, figsize, primary_metric, plot_manipulation_func)
    columns = stat_groups(table.columns).get((stat, mode))
    if not columns:
        raise ValueError(f"the table has no {stat!r} column for mode {mode!r}")
    layers = [layer for layer, _ in columns]
    names = [column for _, column in columns]
    epochs = _history_epochs(table, names) or list(table.index)
    matrix = table.loc[epochs, names].to_numpy(dtype=np.float64).T  # layers × epochs

    figure = _new_figure(figsize)
    ax = figure.add_subplot()
    statistic = get_stat(stat)
    limits = {} if statistic.limits is None else dict(zip(("vmin", "vmax"), statistic.limits))
    image = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", interpolation="nearest", cmap="viridis", **limits)
    colorbar = figure.colorbar(image, ax=ax)
    colorbar.set_label(_long_label(stat), fontsize=fontsize)
    colorbar.ax.tick_params(labelsize=fontsize)
    rows = np.arange(0, len(layers), max(1, int(math.ceil(len(layers) / 40))))  # at most ~40 layer labels
    ax.set_yticks(rows)
    ax.set_yticklabels([layers[i] for i in rows], fontsize=fontsize)
    step = max(1, int(math.ceil(len(epochs) / 20)))  # at most ~20 epoch labels
    ticks = np.arange(0, len(epochs), step)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(epochs[i]) for i in ticks], fontsize=fontsize)
    ax.set_xlabel("epoch", fontsize=fontsize)
    ax.set_ylabel("layer", fontsize=fontsize)
    if matrix.size <= ANNOTATE_CELLS:
        finite = matrix[np.isfinite(matrix)]
        middle = (limits.get("vmin", finite.min()) + limits.get("vmax", finite.max())) / 2 if finite.size else 0
        for (row, col), value in np.ndenumerate(matrix):
            if math.isfinite(value):
                ax.text(col, row, statistic.format(value), ha="center", va="center", fontsize=fontsize * 0.7,
                        color="black" if value > middle else "white")
    title = f"{_long_label(stat)} ({mode}) per layer and epoch"
    primary = _primary_text(table, primary_metric, epochs[-1]) if epochs else ""
    ax.set_title(f"{title} — {primary} at epoch {epochs[-1]}" if primary else title, fontsize=fontsize * 1.2)
    _manipulate(ax, plot_manipulation_func)
    return figure


def _panel_grid(count: int) -> Tuple[int, int]:
    cols = int(math.ceil(math.sqrt(count)))
    return int(math.ceil(count / cols)), cols


def _by_stat_and_mode(values: Mapping[str, np.ndarray]) -> OrderedDict[Tuple[str, str], OrderedDict[str, np.ndarray]]:
    grouped: OrderedDict[Tuple[str, str], OrderedDict[str, np.ndarray]] = OrderedDict()
    for name, value in values.items():
        key = parse_key(name)
        if key is not None and not key.is_average:
            grouped.setdefault((key.stat, key.mode), OrderedDict())[key.layer] = np.asarray(value)
    return grouped


def _panels(layers: Sequence[str], draw, title: str, fontsize, figsize, plot_manipulation_func) -> Figure:
    figure = _new_figure(figsize)
    rows, cols = _panel_grid(len(layers))
    for i, layer in enumerate(layers):
        ax = figure.add_subplot(rows, cols, i + 1)
        draw(ax, layer)
        ax.set_title(layer, fontsize=fontsize)
        ax.tick_params(labelsize=fontsize * 0.8)
        _manipulate(ax, plot_manipulation_func)
    figure.suptitle(title, fontsize=fontsize * 1.2)
    return figure


def spectrum_figure(
    spectra: Mapping[str, np.ndarray],
    mode: str,
    epoch: int,
    fontsize: float = DEFAULT_FONTSIZE,
    figsize: Sequence[float] = DEFAULT_FIGSIZE,
    plot_manipulation_func: AxesFunc = None,
    stat: str = "spectrum",
) -> Figure:
    """Draw a vector statistic of each layer (``layer -> (k,) array``), one bar panel per layer.

    ``spectrum`` (the leading eigenvalues, largest first) is the built-in one; ``stat``
    names another vector statistic for the title.

    Returns
    -------
    matplotlib.figure.Figure

    """
    fontsize, figsize = check_plot_options(fontsize, figsize, None, plot_manipulation_func)

    def draw(ax, layer):
        values = np.asarray(spectra[layer], dtype=np.float64)
        ax.bar(np.arange(1, len(values) + 1), values, color="tab:green")
        ax.set_xticks(np.arange(1, len(values) + 1))
        ax.set_xlabel("rank", fontsize=fontsize * 0.8)

    return _panels(list(spectra), draw, f"{_long_label(stat)} ({mode}), epoch {epoch}", fontsize, figsize,
                   plot_manipulation_func)


def embedding_figure(
    points: Mapping[str, np.ndarray],
    mode: str,
    epoch: int,
    fontsize: float = DEFAULT_FONTSIZE,
    figsize: Sequence[float] = DEFAULT_FIGSIZE,
    plot_manipulation_func: AxesFunc = None,
    stat: str = "embed",
) -> Figure:
    """Scatter each layer's samples (``layer -> (n, 2) array``) on its top two eigendirections.

    Returns
    -------
    matplotlib.figure.Figure

    """
    fontsize, figsize = check_plot_options(fontsize, figsize, None, plot_manipulation_func)

    def draw(ax, layer):
        xy = np.asarray(points[layer], dtype=np.float64).reshape(-1, 2)
        ax.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.6, color="tab:purple")
        ax.set_xlabel("1st eigendirection", fontsize=fontsize * 0.8)
        ax.set_ylabel("2nd eigendirection", fontsize=fontsize * 0.8)

    return _panels(list(points), draw, f"{_long_label(stat)} in the top-2 eigenspace ({mode}), epoch {epoch}",
                   fontsize, figsize, plot_manipulation_func)


#: The per-layer picture of each non-scalar kind of statistic (matrices are not drawn).
FIGURES = {"vector": spectrum_figure, "samples": embedding_figure}


# ----------------------------------------------------------------- files
def plot_history(
    table: pd.DataFrame,
    savefile: str,
    fontsize: float = DEFAULT_FONTSIZE,
    figsize: Sequence[float] = DEFAULT_FIGSIZE,
    primary_metric: Optional[str] = None,
    plot_manipulation_func: AxesFunc = None,
) -> List[str]:
    """Write ``{savefile}_{stat}_{mode}_history.png`` (layers × epochs) for every scalar stat and mode.

    Returns
    -------
    list of str
        The paths written.

    """
    check_plot_options(fontsize, figsize, primary_metric, plot_manipulation_func)
    _check_primary(table, primary_metric)
    paths = []
    for (stat, mode), columns in stat_groups(table.columns).items():
        if not table[[c for _, c in columns]].notna().any(axis=None):
            continue
        figure = history_figure(table, stat, mode, fontsize, figsize, primary_metric, plot_manipulation_func)
        paths.append(_save(figure, f"{savefile}_{stat}_{mode}_history.png"))
    return paths


def plot_epochs(
    table: pd.DataFrame,
    savefile: str,
    epochs: Optional[Iterable[int]] = None,
    fontsize: float = DEFAULT_FONTSIZE,
    figsize: Sequence[float] = DEFAULT_FIGSIZE,
    primary_metric: Optional[str] = None,
    plot_manipulation_func: AxesFunc = None,
) -> List[str]:
    """Write ``{savefile}_{stat}_{mode}_epoch_{epoch}.png`` (a bar per layer) for every scalar stat and mode.

    ``epochs`` are the epochs to draw (all rows by default); an (epoch, stat, mode)
    without any value (a stopped epoch, a row of user scalars only) is skipped. The
    other arguments are those of :func:`plot_table`.

    Returns
    -------
    list of str
        The paths written.

    """
    check_plot_options(fontsize, figsize, primary_metric, plot_manipulation_func)
    _check_primary(table, primary_metric)
    if epochs is None:
        epochs = list(table.index)
    else:
        epochs = list(epochs)
        missing = [e for e in epochs if e not in table.index]
        if missing:
            raise ValueError(f"epochs {missing} are not in the table; epochs are {list(table.index)}")
    groups = stat_groups(table.columns)
    paths = []
    for epoch in epochs:
        for (stat, mode), columns in groups.items():
            if table.loc[epoch, [c for _, c in columns]].isna().all():
                continue
            figure = epoch_figure(table, stat, mode, epoch, fontsize, figsize, primary_metric, plot_manipulation_func)
            paths.append(_save(figure, f"{savefile}_{stat}_{mode}_epoch_{int(epoch)}.png"))
    return paths


def plot_table(
    table: pd.DataFrame,
    savefile: str,
    epochs: Optional[Iterable[int]] = None,
    fontsize: float = DEFAULT_FONTSIZE,
    figsize: Sequence[float] = DEFAULT_FIGSIZE,
    primary_metric: Optional[str] = None,
    plot_manipulation_func: AxesFunc = None,
) -> List[str]:
    """Write the per-epoch bar charts of ``epochs`` and the history heatmaps of a CSV table.

    Parameters
    ----------
    table : pandas.DataFrame
        The CSV writer's table (:func:`read_table` reads one from disk).
    savefile : str
        Prefix of the files: ``{savefile}_{stat}_{mode}_epoch_{epoch}.png`` and
        ``{savefile}_{stat}_{mode}_history.png``.
    epochs : iterable of int, optional
        Epochs to draw; all rows by default. An (epoch, stat, mode) without any value
        (a stopped epoch, a row of user scalars only) is skipped.
    fontsize : float, default 10
        Font size of labels and titles.
    figsize : (float, float), default (10, 6)
        Figure size in inches.
    primary_metric : str, optional
        A user scalar column (e.g. ``test-accuracy``) whose value is shown in the titles.
    plot_manipulation_func : callable, optional
        Called with every axes before it is saved; returns the axes (or ``None``).

    Returns
    -------
    list of str
        The paths written.

    """
    paths = plot_epochs(table, savefile, epochs, fontsize, figsize, primary_metric, plot_manipulation_func)
    paths += plot_history(table, savefile, fontsize, figsize, primary_metric, plot_manipulation_func)
    return paths


def plot_vectors(
    values: Mapping[str, np.ndarray],
    savefile: str,
    epoch: int,
    fontsize: float = DEFAULT_FONTSIZE,
    figsize: Sequence[float] = DEFAULT_FIGSIZE,
    plot_manipulation_func: AxesFunc = None,
) -> List[str]:
    """Write ``{savefile}_{stat}_{mode}_epoch_{epoch}.png`` for the per-layer arrays of one epoch.

    ``values`` maps tracker keys to arrays of vector statistics (``spectrum``) or samples
    (``embed``); each statistic and mode gets one picture with a panel per layer, drawn
    as :data:`FIGURES` says for its kind. Keys of other kinds are left out.

    Returns
    -------
    list of str
        The paths written.

    """
    paths = []
    for (stat, mode), layers in _by_stat_and_mode(values).items():
        make_figure = FIGURES.get(get_stat(stat).kind)
        if make_figure is None:
            continue
        figure = make_figure(layers, mode, epoch, fontsize, figsize, plot_manipulation_func, stat=stat)
        paths.append(_save(figure, f"{savefile}_{stat}_{mode}_epoch_{int(epoch)}.png"))
    return paths


#: The names the per-epoch arrays were drawn by before any kind of statistic could be.
plot_spectra = plot_embeddings = plot_vectors
