"""Sphinx configuration of the delve documentation (``make docs``)."""

import importlib.util
import os
import sys

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

# The documentation describes the checkout it lives in, installed or not.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import delve  # noqa: E402

project = "delve"
author = "the delve developers"
copyright = "delve developers"
release = delve.__version__
version = ".".join(release.split(".")[:2])

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
exclude_patterns = ["_build"]
root_doc = "index"

napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "description"
# The framework callbacks are documented even where Lightning or transformers are not
# installed (their base classes are then stand-ins).
autodoc_mock_imports = [name for name in ("lightning", "transformers") if importlib.util.find_spec(name) is None]

html_theme = "alabaster"
html_static_path = []
html_theme_options = {"description": "Layer saturation of PyTorch models, measured while they train"}

_log = logging.getLogger(__name__)


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


class OptionalAutomodule(SphinxDirective):
    """``.. optional-automodule:: delve.x`` — a section documenting ``delve.x``, or nothing if it is absent.

    A module that exists but fails to import still fails the build (autodoc warns).
    """

    required_arguments = 1
    has_content = True

    def run(self):
        name = self.arguments[0]
        if not _module_exists(name):
            _log.info("module %s is not part of this checkout; left out of the API reference", name)
            return []
        title = f"``{name}``"
        lines = [title, "-" * len(title), "", f".. automodule:: {name}"]
        lines += ["   " + line for line in self.content]
        source = self.get_source_info()[0]
        holder = nodes.section()
        nested_parse_with_titles(self.state, StringList(lines, source=source), holder)
        return holder.children


def _skip_framework_hooks(app, what, name, obj, skip, options):
    # The callbacks' hook methods are called by the frameworks, not by users; their
    # inherited framework docstrings would only clutter the reference.
    if what == "class" and (name.startswith("on_") or name == "teardown"):
        if getattr(obj, "__module__", "").startswith("delve.integrations"):
            return True
    return None


def setup(app):
    """Register the directive that lets the API page name modules that may not exist yet."""
    app.add_directive("optional-automodule", OptionalAutomodule)
    app.connect("autodoc-skip-member", _skip_framework_hooks)
    return {"parallel_read_safe": True}
