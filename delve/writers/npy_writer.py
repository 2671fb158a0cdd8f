"""The npy writer: every value of every epoch as a ``.npy`` file, covariance matrices included.

Layout of a run saved under ``savepath``::

    {savepath}/delve-npy-state.json              keys, their folders and epochs (plain JSON)
    {savepath}/{folder}/{folder}_epoch{epoch}.npy
    {savepath}.zip                               with zip=True, the folder archived after each save

``folder`` is the key itself (``train-covariance-matrix_features-0``) when the key is a
plain file name; any other key (a layer called ``../x y`` or ``conv/ü``) gets a
sanitised name with a hash of the key, so nothing is written outside ``{savepath}/``.
The state file maps every key to its folder, so the true keys are never lost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zipfile
from bisect import insort
from collections import OrderedDict
from typing import List, Optional, Set, Tuple

import numpy as np
import torch

from delve._files import atomic_path, atomic_write_text, remove_temporaries
from delve.writers.base import AbstractWriter

logger = logging.getLogger(__name__)

__all__ = ["NPYWriter", "STATE_FILE", "epoch_file", "folder_name", "load_index", "read_state"]

STATE_FILE = "delve-npy-state.json"
_STATE_FORMAT = "delve-npy"
_STATE_VERSION = 1
# A folder name that is safe on every common file system: no separator, no leading
# dot (so never "." or ".."), bounded length.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,149}$")
_UNSAFE_CHAR = re.compile(r"[^A-Za-z0-9_.\-]")
_EPOCH_FILE = re.compile(r"^(?P<folder>.+)_epoch(?P<epoch>\d+)\.npy$")
_NUMERIC_KINDS = "biufc"


def folder_name(key: str) -> str:
    """Return the folder a key's files go into: the key itself if it is a safe file name.

    Any other key is cleaned (unsafe characters become ``_``, leading dots are dropped,
    the length is bounded) and suffixed with a hash of the key, so that two keys never
    share a folder and the same key always gets the same one.
    """
    if _SAFE_NAME.match(key) and key != STATE_FILE:
        return key
    cleaned = _UNSAFE_CHAR.sub("_", key).lstrip(".")[:100]
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{cleaned}__{digest}" if cleaned else f"key__{digest}"


def epoch_file(root: str, folder: str, epoch: int) -> str:
    """Return the path of one key's file at one epoch."""
    return os.path.join(root, folder, f"{folder}_epoch{int(epoch)}.npy")


def _valid_entry(entry) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("key"), str)
        and isinstance(entry.get("folder"), str)
        and bool(_SAFE_NAME.match(entry["folder"]))
        and entry["folder"] != STATE_FILE
        and isinstance(entry.get("epochs"), list)
        and all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in entry["epochs"])
    )


def read_state(root: str) -> Optional[List[Tuple[str, str, List[int]]]]:
    """Read the state file of an npy folder: ``[(key, folder, epochs), ...]``, or ``None`` if absent.

    Raises
    ------
    ValueError
        If the file is not a state file this writer wrote.

    """
    path = os.path.join(root, STATE_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not readable JSON: {err}") from None
    if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT or not isinstance(
        state.get("entries"), list
    ):
        raise ValueError(f"{path} is not an npy writer state file")
    if state.get("version") != _STATE_VERSION:
        raise ValueError(f"{path} has state version {state.get('version')!r}; this delve reads {_STATE_VERSION}")
    bad = [entry for entry in state["entries"] if not _valid_entry(entry)]
    if bad:
        raise ValueError(f"{path} has {len(bad)} malformed entries, e.g. {bad[0]!r}")
    return [(e["key"], e["folder"], sorted(set(e["epochs"]))) for e in state["entries"]]


def _scan(root: str) -> List[Tuple[str, str, List[int]]]:
    entries = []
    for folder in _key_folders(root):
        epochs = []
        for name in os.listdir(os.path.join(root, folder)):
            match = _EPOCH_FILE.match(name)
            if match and match.group("folder") == folder:
                epochs.append(int(match.group("epoch")))
        if epochs:
            entries.append((folder, folder, sorted(epochs)))
    return entries


def _read_or_scan(root: str) -> Tuple[List[Tuple[str, str, List[int]]], Optional[str]]:
    """Return the folder's index and, when it had to be rebuilt from the file names, why."""
    try:
        entries = read_state(root)
        problem = None if entries is not None else f"has no {STATE_FILE}"
    except ValueError as err:
        entries, problem = None, f"has an unreadable {STATE_FILE} ({err})"
    return (entries, None) if entries is not None else (_scan(root), problem)


def load_index(root: str) -> List[Tuple[str, str, List[int]]]:
    """List what an npy folder holds: ``[(key, folder, epochs), ...]`` in the order keys first appeared.

    The state file is the index. Without a readable one (a folder copied without it, a
    run killed while writing it), the sub-folders are scanned instead: keys are then the
    folder names, in sorted order, and a warning says so.

    Raises
    ------
    FileNotFoundError
        If ``root`` is not a folder.

    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"npy folder {root!r} does not exist (the npy writer saves into {{savefile}}/)")
    entries, problem = _read_or_scan(root)
    if problem is not None:
        logger.warning("%s %s; keys are read from the folder names and their original order is lost", root, problem)
    return entries


class NPYWriter(AbstractWriter):
    """Save every value of every epoch as ``{savepath}/{key}/{key}_epoch{epoch}.npy``.

    The only writer that stores the covariance matrices (``cov``); it also stores the
    ``spectrum`` and ``embed`` arrays and the scalars you record yourself, so
    :func:`delve.tools.reconstruct_csv_from_npy_data` can rebuild the CSV table, and
    recompute saturation at any other threshold. Files are written at :meth:`save`.

    Parameters
    ----------
    savepath : str
        The folder everything goes into.
    zip : bool, default False
        Also keep ``{savepath}.zip`` with the folder's content: written whole at the
        first save of a run, then each save adds only its new files.

    Notes
    -----
    The resume state is the JSON file ``{savepath}/delve-npy-state.json``; arrays are
    always saved and loaded with ``allow_pickle=False``. A new run (``initial_epoch=0``)
    removes, at its first save, the files the previous run's state lists; a resumed run
    keeps those of epochs below ``initial_epoch`` untouched. Without a readable state
    file (deleted, damaged), the previous run's files are found by their names instead.

    A key folder that is a symbolic link is never written to nor deleted from (its
    values are not saved; a warning names it): everything this writer changes stays
    inside ``{savepath}/``. Temporary files a killed save left there are removed at the
    next run's first save. A run killed while it adds to the zip can leave the archive
    unreadable; the folder stays complete and the next run's first save rewrites the
    archive from it.

    """

    def __init__(self, savepath: str, zip: bool = False):
        if not isinstance(zip, bool):
            raise TypeError(f"zip must be True or False, got {zip!r}")
        self.savepath = savepath
        self.root = savepath
        self.zip_path = savepath + ".zip" if zip else None
        self._epochs: OrderedDict[str, List[int]] = OrderedDict()  # key -> epochs on disk, first appearance order
        self._pending: OrderedDict[Tuple[str, int], np.ndarray] = OrderedDict()
        self._step = 0
        self._ignored: Set[str] = set()
        self._linked: Set[str] = set()  # key folders found to be symbolic links (warned once)
        self._found: Set[str] = set()  # keys known only by their folder's name (index rebuilt from the files)
        self._archived: Set[str] = set()  # zip members this writer wrote; empty until the zip is written whole
        self._saved = False
        self._previous = self._previous_files()

    # ------------------------------------------------------------ state
    def _remove_temporaries(self) -> None:
        archive = os.path.abspath(self.savepath + ".zip")  # with or without zip=True: an earlier run's
        remove_temporaries(os.path.dirname(archive), os.path.basename(archive))
        if not os.path.isdir(self.root):
            return
        remove_temporaries(self.root, STATE_FILE)
        for folder in _key_folders(self.root):
            remove_temporaries(os.path.join(self.root, folder), re.compile(re.escape(folder) + r"_epoch\d+\.npy"))

    def _previous_files(self) -> List[Tuple[str, str, List[int]]]:
        if not os.path.isdir(self.root):
            return []
        entries, problem = _read_or_scan(self.root)
        if problem is not None and entries:
            logger.warning(
                "%s %s: the earlier run's %d key(s) were found by their folder names "
                "(a sanitised name becomes its key's own again when this run writes that key)",
                self.root, problem, len(entries),
            )
            self._found = {key for key, _, _ in entries}
        return entries

    def _path(self, key: str, epoch: int) -> str:
        return epoch_file(self.root, folder_name(key), epoch)

    def _is_link(self, key: str, folder: str) -> bool:
        """Whether a key's folder is a symbolic link, which this writer leaves alone (warned once per key)."""
        if not os.path.islink(os.path.join(self.root, folder)):
            return False
        if key not in self._linked:
            self._linked.add(key)
            logger.warning(
                "npy writer: %s is a symbolic link; the values of %r are neither written there nor deleted "
                "from there (replace the link by a folder to save them)", os.path.join(self.root, folder), key,
            )
        return True

    def resume_from_saved_state(self, initial_epoch: int) -> None:
        if not self._previous:
            logger.warning("no npy state to resume in %s; starting a new one", self.root)
            return
        for key, folder, epochs in self._previous:
            if folder != folder_name(key):
                logger.warning("npy state: key %r is not in its expected folder; it is not resumed", key)
                continue
            if self._is_link(key, folder):
                continue
            kept = [e for e in epochs if e < initial_epoch and os.path.isfile(epoch_file(self.root, folder, e))]
            if len(kept) < sum(e < initial_epoch for e in epochs):
                logger.warning("npy state: files of key %r are missing; resuming with those found", key)
            if kept:
                self._epochs[key] = kept

    def _state(self) -> dict:
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "entries": [
                {"key": key, "folder": folder_name(key), "epochs": epochs} for key, epochs in self._epochs.items()
                if epochs
            ],
        }

    # ---------------------------------------------------------- values
    def _put(self, key: str, value, step) -> None:
        if step is not None:
            self._step = int(step)
        if torch.is_tensor(value):
            value = value.detach().cpu().numpy()
        array = np.asarray(value)
        if array.dtype.kind not in _NUMERIC_KINDS:
            if key not in self._ignored:
                self._ignored.add(key)
                logger.warning("npy writer: %r is not numeric (%s); it is not saved", key, array.dtype)
            return
        if key not in self._epochs:
            self._adopt_found(key)
        self._epochs.setdefault(key, [])
        self._pending[(key, self._step)] = array

    def _adopt_found(self, key: str) -> None:
        """Give a key found only by its sanitised folder name (index rebuilt from files) its true name."""
        folder = folder_name(key)
        if folder != key and folder in self._found and folder in self._epochs:
            self._found.discard(folder)
            self._epochs = OrderedDict((key if k == folder else k, v) for k, v in self._epochs.items())

    def add_scalar(self, name, value, global_step=None, **kwargs):
        self._put(name, value, global_step)

    def add_scalars(self, prefix, value_dict, global_step=None, sample_value_dict=None, **kwargs):
        for key, value in value_dict.items():
            self._put(f"{prefix}{key}", value, global_step)
        for key, value in (sample_value_dict or {}).items():
            self._put(f"{prefix}{key}", value, global_step)

    # ------------------------------------------------------------ files
    def save(self):
        if not self._saved:  # a run's first save clears what a killed one left half-written
            self._remove_temporaries()
            self._saved = True
        written = []
        while self._pending:
            (key, step), array = next(iter(self._pending.items()))
            if not self._is_link(key, folder_name(key)):
                with atomic_path(self._path(key, step)) as tmp:
                    np.save(tmp, array, allow_pickle=False)
                if step not in self._epochs[key]:
                    insort(self._epochs[key], step)
                written.append(self._path(key, step))
            del self._pending[(key, step)]
        self._remove_previous()
        atomic_write_text(os.path.join(self.root, STATE_FILE), json.dumps(self._state(), indent=1))
        if self.zip_path is not None:
            self._update_zip(written)

    def _remove_previous(self) -> None:
        """Delete the files of the previous run that this run does not keep (once, at the first save)."""
        current = {(folder_name(k), e) for k, epochs in self._epochs.items() for e in epochs}
        folders = set()
        for key, folder, epochs in self._previous:
            if self._is_link(key, folder):
                continue
            for epoch in epochs:
                if (folder, epoch) in current:
                    continue
                path = epoch_file(self.root, folder, epoch)
                if os.path.isfile(path):
                    os.remove(path)
                    folders.add(folder)
        for folder in folders:
            try:
                os.rmdir(os.path.join(self.root, folder))
            except OSError:  # not empty: it still holds files of this run
                pass
        self._previous = []

    # -------------------------------------------------------------- zip
    def _member(self, path: str) -> str:
        base = os.path.basename(os.path.normpath(self.root)) or "npy"
        return "/".join([base] + os.path.relpath(path, self.root).split(os.sep))

    def _update_zip(self, written: List[str]) -> None:
        """Add this save's files to the archive; write it whole at a run's first save or when it is not as left."""
        if self._archived:
            try:
                self._append_to_zip(written)
                return
            except (OSError, ValueError, AttributeError, zipfile.BadZipFile) as err:
                logger.warning("%s cannot be added to (%s); it is written anew", self.zip_path, err)
        self._write_zip()

    def _write_zip(self) -> None:
        files = [os.path.join(self.root, STATE_FILE)]
        for key, epochs in self._epochs.items():
            files += [self._path(key, epoch) for epoch in epochs]
        files.append(files.pop(0))  # the index last: each later save replaces it there
        with atomic_path(self.zip_path) as tmp:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                for path in files:
                    archive.write(path, self._member(path))
        self._archived = {self._member(path) for path in files}

    def _append_to_zip(self, written: List[str]) -> None:
        index = self._member(os.path.join(self.root, STATE_FILE))
        new = [path for path in written if self._member(path) not in self._archived]
        if len(new) < len(written):
            raise ValueError("an archived file was written again")
        with zipfile.ZipFile(self.zip_path, "a", compression=zipfile.ZIP_DEFLATED) as archive:
            members = archive.infolist()
            if len(members) != len(self._archived) or not members or members[-1].filename != index:
                raise ValueError("the archive was changed by someone else")
            _drop_last_member(archive)
            for path in new:
                archive.write(path, self._member(path))
            archive.write(os.path.join(self.root, STATE_FILE), index)
        self._archived.update(self._member(path) for path in new)

    def close(self):
        if self._pending:  # values added with save=False still reach the disk
            self.save()


def _key_folders(root: str) -> List[str]:
    """Return the sub-folders of an npy folder that can be key folders, symbolic links left out."""
    return [
        name for name in sorted(os.listdir(root))
        if _SAFE_NAME.match(name) and not os.path.islink(os.path.join(root, name))
        and os.path.isdir(os.path.join(root, name))
    ]


def _drop_last_member(archive: zipfile.ZipFile) -> None:
    """Forget an archive's last member so that what is written next overwrites it in place.

    zipfile cannot remove a member. The npy index, rewritten at every save, is kept as
    the archive's last member; dropping it from the directory and moving the write
    position back to its header replaces exactly it, without copying the other
    members. Any surprise in zipfile's internals raises, and the caller then writes
    the archive anew.
    """
    last = archive.filelist[-1]
    if archive.NameToInfo.get(last.filename) is not last:
        raise ValueError("unexpected archive directory")
    archive.filelist.pop()
    del archive.NameToInfo[last.filename]
    archive.start_dir = last.header_offset
