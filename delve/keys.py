"""The names values are reported under, made and read in this one place.

A statistic of a layer in a mode is reported under ``{mode}-{stem}_{layer}``
(``train-saturation_features-0``), the mean saturation over layers under
``average-{mode}-sat`` (SPEC §6). Values the user records keep their own names.

Dashboards (TensorBoard, the framework loggers) group names by what comes before the
first ``/``, so there a value goes by its *tag*, grouped by statistic and mode:
``{mode}-{stem}/{layer}`` (``train-saturation/features-0``), the average
``{mode}-saturation/average``, the entries of a vector statistic
``{mode}-{stem}/{layer}/rank-{i}`` and the layers × epochs picture of a statistic
``{mode}-{stem}/history``. :attr:`Key.tag` makes a tag, :func:`parse_tag` reads one back.

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

__all__ = [
    "MODES",
    "Key",
    "average_key",
    "dashboard_tag",
    "history_tag",
    "layer_key",
    "mode_rank",
    "parse_key",
    "parse_tag",
    "tag_group",
]

#: The two modes a forward pass can be recorded in, from the layer's ``training`` flag.
MODES: Tuple[str, str] = ("train", "eval")
_AVERAGE = re.compile(r"^average-(?P<mode>train|eval)-sat$")
#: The last part of the tag of an average over layers (a layer of that name would share it).
AVERAGE_TAG = "average"


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

    @property
    def tag(self) -> str:
        """The name on a dashboard: ``{mode}-{stem}/{layer}``, or ``{mode}-saturation/average``."""
        return self.tag_with(f"{self.mode}-")

    def tag_with(self, mode_prefix: str) -> str:
        """Return the tag with ``mode_prefix`` written in place of ``{mode}-``.

        For a dashboard that shows modes its own way: the Hugging Face trainer names its
        evaluation values ``eval_...`` and its training values without a prefix.
        """
        return f"{tag_group(self.mode, self.stat, mode_prefix)}/{AVERAGE_TAG if self.is_average else self.layer}"

    def entry_tag(self, rank: int) -> str:
        """Return the tag of entry ``rank`` (from 1) of a vector statistic: ``{tag}/rank-{rank}``."""
        return f"{self.tag}/rank-{int(rank)}"


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


def tag_group(mode: str, stat: str, mode_prefix: Optional[str] = None) -> str:
    """Return the part of a tag before its first ``/``: ``{mode}-{stem}``, a section per statistic and mode.

    ``mode_prefix`` replaces ``{mode}-`` (see :meth:`Key.tag_with`).
    """
    return (f"{mode}-" if mode_prefix is None else mode_prefix) + get_stat(stat).stem


def history_tag(mode: str, stat: str) -> str:
    """Return the tag of the layers × epochs picture of a statistic in a mode: ``{mode}-{stem}/history``."""
    return f"{tag_group(mode, stat)}/history"


def dashboard_tag(name: str) -> str:
    """Return the tag a value goes by on a dashboard: a tracker key's :attr:`Key.tag`, a user value's name."""
    key = parse_key(name)
    return name if key is None else key.tag


@functools.lru_cache(maxsize=8)
def _tag_pattern(stems: Tuple[Tuple[str, str], ...]) -> re.Pattern[str]:
    names = "|".join(re.escape(stem) for stem, _ in stems)
    return re.compile(rf"^(?P<mode>train|eval)-(?P<stem>{names})/(?P<layer>.+)$", re.DOTALL)


def parse_tag(tag: str) -> Optional[Key]:
    """Read a tag back (:attr:`Key.tag`): the :class:`Key` it names, or ``None``.

    Meant for the tags of values: the tag of a picture reads back as a layer named
    ``history``, that of a vector entry as a layer named ``{layer}/rank-{i}``.
    """
    stems = tuple((s.stem, s.name) for s in registered_stats())
    match = _tag_pattern(stems).match(str(tag))
    if match is None:
        return None
    mode, stat, layer = match.group("mode"), dict(stems)[match.group("stem")], match.group("layer")
    if layer == AVERAGE_TAG and stat == average_key(mode).stat:
        return average_key(mode)
    return layer_key(mode, stat, layer)


def mode_rank(name: str) -> int:
    """Rank of a column in a table: user values first (0), then train (1), then eval (2)."""
    key = parse_key(name)
    return 0 if key is None else 1 + MODES.index(key.mode)
