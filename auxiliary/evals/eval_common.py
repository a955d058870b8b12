"""Pieces shared by the evaluation and analysis tools: output folders, flag lists, atomic figures.

    default_output_dir(kind) -> Path        $BASE_WORK (else $SCRATCH, $TMPDIR, /tmp)/sdpo_outputs/<kind>_<time>
    split_list(values) -> list[str]         flags given as one quoted string ("a b", "a,b") or several words
    save_figure(fig, path, dpi) -> str      render a matplotlib Figure with Agg, written atomically
    model_label(path) -> str                a short name for a model folder or hub id
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterable

from auxiliary.runtime.io_utils import base_work_dir


def default_output_dir(kind: str) -> Path:
    return base_work_dir() / "sdpo_outputs" / f"{kind}_{time.strftime('%Y%m%d_%H%M%S')}"


def split_list(values: Iterable[str] | str | None) -> list[str]:
    """["a b", "c,d"] -> ["a", "b", "c", "d"]: env vars such as EVAL_STYLES arrive as one word or many."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    items: list[str] = []
    for value in values:
        items.extend(part for part in value.replace(",", " ").split() if part)
    return items


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> str:
    """Write a bare matplotlib Figure (no pyplot state, no display) through a temporary file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return str(path)


def model_label(name_or_path: str) -> str:
    path = Path(str(name_or_path).rstrip("/"))
    if path.name == "model" and path.parent.name:  # online checkpoints keep their weights in step_N/model
        return path.parent.name
    return path.name or str(name_or_path)
