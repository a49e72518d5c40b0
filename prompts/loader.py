"""Prompt templates: versioned text files under ``prompts/templates/``, filled with `string.Template`.

The templates are package data of ``mmrag.prompts``, read through :mod:`importlib.resources`, so
they are found from a wheel as from a checkout.

A template file may open with ``#`` comment lines (what it is for, its version, its fields); they are
not part of the template. Fields are written ``$name`` or ``${name}``; ``$$`` is a literal dollar.
"""

from __future__ import annotations

import importlib.resources
import string
from functools import cache

from mmrag.errors import MMRAGError

TEMPLATES_DIR = importlib.resources.files("mmrag.prompts") / "templates"


class TemplateError(MMRAGError, ValueError):
    """A template is missing, or was rendered with missing or unknown fields."""


def template_names() -> list[str]:
    return sorted(p.name[:-len(".txt")] for p in TEMPLATES_DIR.iterdir() if p.name.endswith(".txt"))


@cache
def load_template(name: str) -> string.Template:
    """The template ``prompts/templates/<name>.txt``, its leading ``#`` comment lines removed."""
    path = TEMPLATES_DIR / f"{name}.txt"
    if not path.is_file():
        raise TemplateError(f"No prompt template {name!r} in {TEMPLATES_DIR}; choose one of {template_names()}.")
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return string.Template("\n".join(lines).strip("\n"))


def render(name: str, **fields: str) -> str:
    """Fill template ``name`` with ``fields``; every field of the template must be given, and no other."""
    template = load_template(name)
    expected = set(template.get_identifiers())
    if set(fields) != expected:
        raise TemplateError(f"Template {name!r} takes the fields {sorted(expected)}, got {sorted(fields)}.")
    return template.substitute(fields)
