"""The Python examples of a Markdown page (README, guides), run in order in one namespace."""

from __future__ import annotations

import re
from typing import Any


def python_blocks(text: str) -> list[str]:
    """The bodies of the page's ```python blocks, in order."""
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def run_python_blocks(text: str, source: str, namespace: dict[str, Any] | None = None) -> None:
    """Execute every python block of ``text`` in order; a failure names its block."""
    namespace = {"__name__": "examples"} if namespace is None else namespace
    for number, block in enumerate(python_blocks(text), 1):
        try:
            exec(compile(block, f"{source} python block {number}", "exec"), namespace)
        except Exception as error:  # pragma: no cover - the message is the point
            raise AssertionError(f"{source} python block {number} failed: {error!r}") from error
