"""Small HTML helpers shared by the report's sections."""

from __future__ import annotations

import html
import os
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote


def esc(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def href(target: Path, out_dir: Path) -> str:
    """A relative URL from the report folder to ``target`` (works from disk and served)."""
    rel = os.path.relpath(Path(target).resolve(), Path(out_dir).resolve())
    return quote(Path(rel).as_posix())


def static(name: str) -> str:
    """A file of ``benchbase/report/static`` (package data: CSS and the table-sorting script)."""
    return resources.files("benchbase.report").joinpath("static", name).read_text(encoding="utf-8")
