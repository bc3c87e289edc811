"""Sphinx configuration of the flask-scoria documentation."""

from importlib.metadata import version as package_version

project = "flask-scoria"
author = "The flask-scoria team"
copyright = "the flask-scoria team"
release = package_version("Flask-Scoria")
version = ".".join(release.split(".")[:2])

extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_class_signature = "separated"

html_theme = "furo"
html_title = f"flask-scoria {version}"
