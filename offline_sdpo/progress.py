"""What an offline run shows while and after it trains (both trainers: SDPO and the SFT baseline).

- `ReadableProgress` replaces transformers' ProgressCallback, which prints each log as a dict of
  quoted strings ({'loss': '0.1294', ...}); ours prints one line of plain numbers per log step:
      step 2/3  loss 1.329  grad_norm 17.89  learning_rate 2e-06  signal_mean 0.1252 ...
- `TrainingPlot` writes `training.png` into --output_dir when training ends (rank 0), from the
  rows of metrics.jsonl: the loss and the gradient norm per optimizer step and, for SDPO, the signal
  statistics (mean, mean |A_t|, std) and the log-probabilities of the reply under x and under xo.

`show_progress(trainer, output_dir)` installs both.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from transformers import ProgressCallback, TrainerCallback

from auxiliary.runtime.io_utils import atomic_write_bytes

PLOT_FILENAME = "training.png"
# panel title -> the metrics.jsonl keys drawn in it (a panel with none of its keys is left out)
PANELS = {
    "loss": ("loss",),
    "gradient norm (before clipping)": ("grad_norm",),
    "signal A_t per token": ("signal_mean", "signal_abs_mean", "signal_std"),
    "mean log p of the reply's tokens": ("logp_x", "logp_xo"),
}
_SKIPPED = {"total_flos", "epoch"}


def format_log(logs: dict, step: int, max_steps: int) -> str:
    """One line: `step S/N  key value ...`, numbers with 4 significant digits, no quotes."""
    parts = [f"step {step}/{max_steps}"]
    for key, value in logs.items():
        if key in _SKIPPED:
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return "  ".join(parts)


class ReadableProgress(ProgressCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            self.training_bar.write(format_log(logs, state.global_step, state.max_steps))


def plot_training(rows: list[dict], path: str | Path, title: str = "offline training") -> str | None:
    """training.png from metrics.jsonl rows (one per logged optimizer step); None when there are none."""
    from matplotlib.figure import Figure

    panels = [(name, [k for k in keys if any(k in r for r in rows)]) for name, keys in PANELS.items()]
    panels = [(name, keys) for name, keys in panels if keys]
    if not rows or not panels:
        return None
    fig = Figure(figsize=(4.2 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, keys) in zip(axes, panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            ax.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3, label=key)
        if name.startswith("signal"):
            ax.axhline(0.0, color="grey", linewidth=1, linestyle=":")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    atomic_write_bytes(Path(path), image.getvalue())
    return str(path)


class TrainingPlot(TrainerCallback):
    def __init__(self, output_dir: str | Path, metrics_file: str | Path, title: str):
        self.path = Path(output_dir) / PLOT_FILENAME
        self.metrics_file = Path(metrics_file)
        self.title = title

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.metrics_file.exists():
            return
        rows = [json.loads(line) for line in self.metrics_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if plot_training(rows, self.path, self.title):
            print(f"wrote {self.path}", flush=True)


def show_progress(trainer, output_dir: str | Path, metrics_file: str | Path, title: str) -> None:
    """Readable log lines instead of transformers' quoted dicts, and training.png at the end."""
    trainer.remove_callback(ProgressCallback)
    if not trainer.args.disable_tqdm:
        trainer.add_callback(ReadableProgress)
    trainer.add_callback(TrainingPlot(output_dir, metrics_file, title))
