"""Weights & Biases for an online run, or nothing: every method is a no-op when W&B is off.

    wb = WandbRun.start(enabled, out_dir, project)   # config: out_dir/config.json; the id is kept for --resume
    wb.log({"feedback/loss": 0.1}, step)
    wb.finish(plot_path, {"final": ..., "head_to_head": ...})
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from auxiliary.runtime.io_utils import atomic_write_text


class WandbSetupError(RuntimeError):
    """--wandb without the package."""


class WandbRun:
    def __init__(self, run=None):
        self.run = run

    @staticmethod
    def require(enabled: bool) -> None:
        """--wandb without the package: one line, before the run changes anything on disk."""
        if enabled:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise WandbSetupError("--wandb needs the wandb package (pip install wandb)") from None

    @classmethod
    def start(cls, enabled: bool, out: Path, project: str) -> "WandbRun":
        if not enabled:
            return cls()
        cls.require(enabled)
        import wandb

        id_file = out / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]  # kept for --resume
        atomic_write_text(id_file, run_id + "\n")
        return cls(wandb.init(project=os.environ.get("WANDB_PROJECT", project), name=out.name, id=run_id,
                              resume="allow", dir=str(out),
                              config=json.loads((out / "config.json").read_text())))

    def log(self, values: dict, step: int) -> None:
        if self.run is not None and values:
            self.run.log({**values, "interaction": step})

    def finish(self, plot: Path, summary: dict) -> None:
        if self.run is None:
            return
        import wandb

        if plot.exists():
            self.run.log({"winrate_plot": wandb.Image(str(plot))})
        self.run.summary.update(summary)
        self.run.finish()
