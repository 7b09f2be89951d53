"""CITATION.cff is valid CFF 1.2.0 and cites the paper of every built-in strategy."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import taskbalance as tb
from taskbalance.registry import strategy_info

CITATION = Path(__file__).resolve().parents[1] / "CITATION.cff"
ARXIV = re.compile(r"\d{4}\.\d{4,5}")


def test_citation_file_has_the_required_fields() -> None:
    data = yaml.safe_load(CITATION.read_text())
    assert data["cff-version"] == "1.2.0"
    assert data["message"] and data["title"] and data["authors"]
    for reference in data["references"]:
        assert {"type", "title", "authors", "year"} <= set(reference), reference.get("title")
        assert all("family-names" in a or "name" in a for a in reference["authors"])


def test_every_builtin_strategy_paper_is_referenced() -> None:
    text = CITATION.read_text()
    titles = [r["title"].lower() for r in yaml.safe_load(text)["references"]]
    for name in tb.list_strategies():
        info = strategy_info(name)
        if not info.cls.__module__.startswith("taskbalance.") or info.paper.startswith(
            "(baseline)"
        ):
            continue
        ids = ARXIV.findall(info.paper)
        if ids:
            assert all(i in text for i in ids), f"{name}: arXiv {ids} missing from CITATION.cff"
        else:
            assert any(t in info.paper.lower() for t in titles), f"{name}: paper not referenced"


def test_one_version_number() -> None:
    """``taskbalance.__version__`` is the version: pyproject reads it, CITATION.cff cites it."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((CITATION.parent / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"], "a second version in pyproject.toml"
    assert "version" in pyproject["project"]["dynamic"]
    dynamic = pyproject["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "taskbalance.__version__"}
    assert yaml.safe_load(CITATION.read_text())["version"] == tb.__version__
