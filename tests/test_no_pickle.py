"""The package never unpickles or evaluates code: a scan of its source."""

from __future__ import annotations

import ast
import pathlib
import textwrap

import pytest

import delve

PACKAGE = pathlib.Path(delve.__file__).parent
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _keyword(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _is_false(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is False


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def problems(source: str, filename: str = "<source>") -> list:
    """Every use of pickle, unsafe loading, eval or exec in a module's source."""
    found = []

    def flag(node, what):
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNSAFE_MODULES:
                    flag(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in UNSAFE_MODULES:
                flag(node, f"from {node.module} import")
            for alias in node.names:
                if "pickle" in alias.name.lower():
                    flag(node, f"import of {alias.name}")
        elif isinstance(node, ast.Name) and node.id in UNSAFE_MODULES:
            flag(node, f"use of {node.id}")
        elif isinstance(node, ast.Attribute) and "pickle" in node.attr.lower() and node.attr != "allow_pickle":
            flag(node, f"attribute .{node.attr}")  # read_pickle, to_pickle, Unpickler ...
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
                flag(node, f"{name}() call")
            if _is_true(_keyword(node, "allow_pickle")):
                flag(node, "allow_pickle=True")
            if name in ("torch.load",) and not _is_true(_keyword(node, "weights_only")):
                flag(node, "torch.load without weights_only=True")
            if name in ("torch.save",):
                flag(node, "torch.save (pickles its argument)")
            if name in ("np.load", "numpy.load") and not _is_false(_keyword(node, "allow_pickle")):
                flag(node, f"{name} without allow_pickle=False")
            if last in ("loads", "load") and name.split(".")[0] in UNSAFE_MODULES:
                flag(node, f"{name}()")
    return found


def test_package_source_is_free_of_pickle_and_eval():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 5  # the scan really covers the package
    found = []
    for path in files:
        found += problems(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE.parent)))
    assert found == []


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "import cloudpickle as cp",
        "from pickle import loads",
        "from pandas import read_pickle",
        "import pandas as pd\npd.read_pickle('x')",
        "frame.to_pickle('x')",
        "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
        "import numpy as np\nnp.load('x.npy')",
        "import numpy\nnumpy.load('x.npy', mmap_mode='r')",
        "import torch\ntorch.load('x.pt')",
        "import torch\ntorch.load('x.pt', weights_only=False)",
        "import torch\ntorch.save({}, 'x.pt')",
        "eval('1 + 1')",
        "exec('x = 1')",
        "import builtins\nbuiltins.eval('1')",
        "loader = pickle.Unpickler(handle)",
    ],
)
def test_the_scan_catches(snippet):
    assert problems(snippet), snippet


def test_the_scan_accepts_safe_code():
    safe = textwrap.dedent(
        """
        import json
        import numpy as np
        import torch

        state = json.loads('{}')
        array = np.load('x.npy', allow_pickle=False)
        weights = torch.load('x.pt', weights_only=True)
        model.eval()
        text = "never pickle"  # a string or a comment mentioning pickle is fine
        settings.allow_pickle = False
        """
    )
    assert problems(safe) == []
