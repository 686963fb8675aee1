"""mkdocs hook: the docstrings' Sphinx roles (:class:`X`, :meth:`~a.b`) shown as plain code spans.

The package's docstrings are written for both Sphinx-style readers and mkdocstrings; Markdown keeps
the role's name in front of the code span, so this drops it (and a leading ``~``).
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:class|meth|func|data|attr|mod|obj|exc):<code>~?([^<]*)</code>")


def on_page_content(html: str, **kwargs) -> str:
    return _ROLE.sub(r"<code>\1</code>", html)
