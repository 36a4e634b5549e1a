"""A griffe extension for the API page: reads medvox's Google-style docstrings as they are written.

* Doctests are titled ``Example:`` (as in the Google style guide); griffe reads only ``Examples:`` as an
  examples section and renders ``Example:`` as Markdown, where ``>>>`` lines become nested quotes.
* A ``Returns:`` section is prose ("The :class:`Prepared` dataset: ..."); griffe reads a first line of the
  form ``name: description``, which would make "The" a name. A prose first line is marked as having no name.
* Cross-references are Sphinx roles (``:class:`~medvox.run.Run```), which Markdown shows as they are typed:
  they become code (``Run``; the full path without the ``~``).
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`(~?)([^`]+)`")
_RETURNS_PROSE = re.compile(r"^(\s*Returns:[ \t]*\n\s+)(?!\w+(\s*\(.+?\))?:\s|\(.+?\):\s)", re.MULTILINE)


class MedvoxDocstrings(Extension):
    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
            text = _ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text)
            obj.docstring.value = _RETURNS_PROSE.sub(r"\1: ", text)
