"""The console view of ``verbose=True``: one progress bar per layer whose fill is its saturation."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Mapping, Optional, TextIO

from tqdm import tqdm

from delve.keys import parse_key

__all__ = ["SaturationBars"]

# The bar shows a percentage, not progress: rates and times would be noise.
BAR_FORMAT = "{desc}: {percentage:5.1f}%|{bar}|"


def bar_label(key: str) -> Optional[str]:
    """Return the label of the bar a tracker key gets, or ``None`` for a key that is not a saturation.

    ``train-saturation_linear1`` is shown as ``linear1``, its eval counterpart as
    ``linear1 (eval)``, and ``average-train-sat`` as ``average``.
    """
    parsed = parse_key(key)
    if parsed is None or parsed.stat != "lsat":
        return None
    name = "average" if parsed.is_average else parsed.layer
    return name if parsed.mode == "train" else f"{name} ({parsed.mode})"


class SaturationBars:
    """A stack of tqdm bars, one per layer and mode, filled to the layer's saturation in percent.

    Bars are made the first time a layer's saturation arrives, below any bar already
    on screen (tqdm gives each new bar the first free line unless ``position`` is set),
    so they sit under the training loop's own bars instead of overwriting them; text
    printed with ``tqdm.write`` keeps working. They are removed from the screen on
    :meth:`close` (``leave=False``).

    Parameters
    ----------
    position : int, optional
        Screen line of the first bar, the others follow it; ``None`` lets tqdm pick
        free lines.
    file : file-like, optional
        Where the bars are drawn; tqdm's default is standard error.

    """

    def __init__(self, position: Optional[int] = None, file: Optional[TextIO] = None):
        self.position = position
        self.file = file
        self.bars: OrderedDict[str, tqdm] = OrderedDict()

    def _show(self, label: str, percent: float) -> None:
        bar = self.bars.get(label)
        if bar is None:
            position = None if self.position is None else self.position + len(self.bars)
            # Made at its value, so that the first drawing already shows it.
            self.bars[label] = tqdm(
                total=100,
                initial=percent,
                desc=label,
                position=position,
                leave=False,
                file=self.file,
                bar_format=BAR_FORMAT,
                dynamic_ncols=True,
                # Drawn even without a terminal: verbose=True is an explicit request.
                disable=False,
            )
        else:
            bar.n = percent
            bar.refresh()

    def update(self, values: Mapping[str, Any]) -> None:
        """Redraw the bars from one epoch's values (tracker keys -> numbers); other keys are ignored."""
        for key, value in values.items():
            label = bar_label(key)
            if label is None:
                continue
            value = float(value)
            # A stopped epoch reports NaN: show an empty bar rather than a broken one.
            self._show(label, 0.0 if math.isnan(value) else min(max(value, 0.0), 1.0) * 100.0)

    def close(self) -> None:
        """Remove every bar from the screen. Idempotent."""
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
