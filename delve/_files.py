"""Crash-safe file output: a file is either its old version or its new one, never half.

A file is written to a temporary file beside it, named after it,
``.{name}.{8 random characters}.delve-tmp{extension}``, and renamed over it once
complete. A process killed in between leaves that temporary file behind; the next run
removes the ones of its own files with :func:`remove_temporaries`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from typing import Iterator, Pattern, Union

logger = logging.getLogger(__name__)

_MARK = ".delve-tmp"
# Keeps a temporary name within the usual 255-byte limit of a file name; a longer
# target is still written safely, only its leftovers are not recognised.
_MAX_NAME = 200
# mkstemp's random part: 8 characters of [a-z0-9_].
_TEMPORARY = re.compile(rf"^\.(?P<target>.+)\.[a-z0-9_]{{8}}{re.escape(_MARK)}(\.[^.]*)?$")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    Parameters
    ----------
    path : str
        The file to (re)write. Its folder is created if needed.

    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(path)
    # The suffix keeps the real extension so libraries that sniff it (np.save,
    # matplotlib) write the right format.
    suffix = _MARK + (os.path.splitext(name)[1] or ".tmp")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name[:_MAX_NAME]}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        # mkstemp makes the file private (0600); give it the permissions a plain open()
        # would, so a run's outputs are as readable as any other file the user writes.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_temporaries(folder: str, target: Union[str, Pattern[str]]) -> int:
    """Remove the temporary files :func:`atomic_path` left in ``folder`` for some of its files.

    Only regular files named as :func:`atomic_path` names them are removed, and only
    those whose target matches: a file name, or a compiled pattern the whole name must
    match. Nothing outside ``folder`` is looked at.

    Returns
    -------
    int
        How many files were removed.

    """
    try:
        names = os.listdir(folder)
    except OSError:  # no folder yet: nothing was left there
        return 0
    removed = 0
    for name in names:
        match = _TEMPORARY.match(name)
        if match is None:
            continue
        found = match.group("target")
        if not (found == target[:_MAX_NAME] if isinstance(target, str) else target.fullmatch(found)):
            continue
        path = os.path.join(folder, name)
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        try:
            os.remove(path)
            removed += 1
        except OSError as err:
            logger.warning("could not remove the temporary file %s: %s", path, err)
    if removed:
        logger.info("removed %d temporary file(s) an interrupted save left in %s", removed, folder)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
