"""The names values are reported under, made and read in this one place.

A statistic of a layer in a mode is reported under ``{mode}-{stem}_{layer}``
(``train-saturation_features-0``), the mean saturation over layers under
``average-{mode}-sat`` (SPEC §6). Values the user records keep their own names.

The tracker hands its writers :class:`Key` objects: strings, so every writer (a user's
too) can treat them as the column names they are, that also carry their parts
(``key.mode``, ``key.stat``, ``key.layer``). :func:`parse_key` turns a column name read
back from a file into the same object.
"""

from __future__ import annotations

import functools
import re
from typing import Optional, Tuple

from delve.metrics import Statistic, get_stat, registered_stats

__all__ = ["MODES", "Key", "average_key", "layer_key", "mode_rank", "parse_key"]

#: The two modes a forward pass can be recorded in, from the layer's ``training`` flag.
MODES: Tuple[str, str] = ("train", "eval")
_AVERAGE = re.compile(r"^average-(?P<mode>train|eval)-sat$")


class Key(str):
    """A tracker key: the column name itself, plus what it names.

    Attributes
    ----------
    mode : str
        ``'train'`` or ``'eval'``.
    stat : str
        Short name of the statistic (``'lsat'``); the averages are of ``'lsat'``.
    layer : str or None
        The layer's name; ``None`` for an average over layers.

    """

    mode: str
    stat: str
    layer: Optional[str]

    def __new__(cls, text: str, mode: str, stat: str, layer: Optional[str]) -> Key:
        key = super().__new__(cls, text)
        key.mode, key.stat, key.layer = mode, stat, layer
        return key

    def __reduce__(self):
        return (Key, (str(self), self.mode, self.stat, self.layer))

    @property
    def statistic(self) -> Statistic:
        """The declaration of the key's statistic."""
        return get_stat(self.stat)

    @property
    def is_average(self) -> bool:
        """Whether the key is a mean over layers rather than one layer's value."""
        return self.layer is None


def layer_key(mode: str, stat: str, layer: str) -> Key:
    """Return the key of one statistic (short name) of one layer in one mode."""
    return Key(f"{mode}-{get_stat(stat).stem}_{layer}", mode, stat, layer)


def average_key(mode: str) -> Key:
    """Return the key of the mean saturation over layers in one mode."""
    return Key(f"average-{mode}-sat", mode, "lsat", None)


@functools.lru_cache(maxsize=8)
def _pattern(stems: Tuple[Tuple[str, str], ...]) -> re.Pattern[str]:
    names = "|".join(re.escape(stem) for stem, _ in stems)
    # A stem never holds '_', so the first '_' after it ends it; a layer name may hold
    # anything, line breaks included.
    return re.compile(rf"^(?P<mode>train|eval)-(?P<stem>{names})_(?P<layer>.+)$", re.DOTALL)


def parse_key(text: str) -> Optional[Key]:
    """Read a column name back: the :class:`Key` it is, or ``None`` for a value of the user's own.

    Statistics registered with :func:`delve.metrics.register_stat` are recognised too.
    """
    if isinstance(text, Key):
        return text
    text = str(text)
    match = _AVERAGE.match(text)
    if match:
        return average_key(match.group("mode"))
    stems = tuple((s.stem, s.name) for s in registered_stats())
    match = _pattern(stems).match(text)
    if match is None:
        return None
    return Key(text, match.group("mode"), dict(stems)[match.group("stem")], match.group("layer"))


def mode_rank(name: str) -> int:
    """Rank of a column in a table: user values first (0), then train (1), then eval (2)."""
    key = parse_key(name)
    return 0 if key is None else 1 + MODES.index(key.mode)
