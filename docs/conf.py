"""Sphinx configuration for the sphot documentation."""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("SPHOT_DISABLE_PLUGIN_AUTOLOAD", "1")  # document the built-ins only

import sphot_core  # noqa: E402
from sphot_core import docgen  # noqa: E402

project = "sphot"
author = "sphot developers"
release = sphot_core.__version__
version = release

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode", "sphinx.ext.mathjax"]
autodoc_member_order = "bysource"
autodoc_typehints = "none"
napoleon_numpy_docstring = True
napoleon_google_docstring = False
exclude_patterns = ["_build"]
html_theme = "alabaster"
nitpicky = False

# Reference pages generated from the code, so they cannot drift from it.
generated = HERE / "_generated"
generated.mkdir(exist_ok=True)
for name, text in {
    "config_reference.rst": docgen.config_reference(),
    "flags_reference.rst": docgen.flags_reference(),
    "plugins_reference.rst": docgen.plugins_reference(),
}.items():
    target = generated / name
    if not target.exists() or target.read_text() != text:
        target.write_text(text)
