"""HTML from templates: one jinja2 environment over `pipeline/formats/templates/`.

Every HTML page or fragment the project writes (the QA report, the review notebook's captions
and headings) is a template there, rendered with autoescaping ON: a value put into a template
is text and is escaped (`&`, `<`, `>`, `"`, `'`), whatever it holds (captions, category names
and tile ids come from files and models). Only values marked safe by a template itself (a
macro's output, `Markup`) pass unescaped; no Python code builds HTML from strings.
"""

from __future__ import annotations

import functools

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

__all__ = ["Markup", "environment", "macro", "render"]


@functools.lru_cache(maxsize=1)
def environment() -> Environment:
    """The templates' environment: autoescaped, strict about undefined names, block tags
    taking their own line out of the output."""
    return Environment(loader=PackageLoader("pipeline.formats", "templates"),
                       autoescape=True, undefined=StrictUndefined, trim_blocks=True,
                       lstrip_blocks=True, keep_trailing_newline=True)


def render(name: str, **context) -> str:
    """The template `name` (e.g. "report/tiles.html.j2") rendered with `context`."""
    return environment().get_template(name).render(**context)


def macro(template: str, name: str):
    """A macro of a template, callable from Python; it returns `Markup`."""
    return getattr(environment().get_template(template).module, name)
