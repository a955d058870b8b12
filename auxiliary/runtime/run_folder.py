"""The folder of one online run: the single owner of what is written there and of the resume rules.

    folder = RunFolder.open(path, resume=False, overwrite=False)   # create, probe, apply the rules
    folder.attach_log()                                             # run.log, for this run only
    metrics, history = folder.truncate_after(step)                  # resume: drop what comes after
    folder.write_config(config, resume=True)                        # warns about changed settings
    folder.cached_baseline(signature) / folder.save_baseline(signature, replies)
    folder.write_checkpoint_marker(step, arms) / folder.checkpoint_marker_step()

Rules of open(): the folder must be writable (a probe file is written and removed); --overwrite
deletes earlier results first; without it a folder that holds results (metrics.jsonl or
eval_history.json) is refused unless the run resumes. Checkpoints of several arms sit in
checkpoints/<arm>/step_N; checkpoints/latest.json names a step only once every arm has it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from auxiliary.runtime.io_utils import DataError, append_jsonl, atomic_write_json, atomic_write_jsonl, read_jsonl

logger = logging.getLogger("eval_online_sdpo")  # the run's own lines in run.log, as before the move

RESULT_FILES = ("config.json", "metrics.jsonl", "eval_history.json", "completions.jsonl", "winrate.png",
                "summary.json", "baseline_completions.json", "run.log")
# Flags that may differ between a run and its resume without changing the results.
RESUME_NEUTRAL_FLAGS = {"resume", "overwrite", "wandb", "debug_first_example"}


class RunFolderError(RuntimeError):
    """The output folder cannot be used as asked; the message is the whole story."""


def default_output_dir(run_name: str | None, model: str, style: str) -> Path:
    """$OUTPUT_DIR, else ${BASE_WORK:-${SCRATCH:-${TMPDIR:-/tmp}}}/sdpo_runs/<run_name or online-model-style-time>."""
    if os.environ.get("OUTPUT_DIR"):
        return Path(os.environ["OUTPUT_DIR"])
    base = os.environ.get("BASE_WORK") or os.environ.get("SCRATCH") or os.environ.get("TMPDIR") or "/tmp"
    name = run_name or f"online-{Path(model.rstrip('/')).name}-{style}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(base) / "sdpo_runs" / name


def read_jsonl_tolerant(path: Path) -> list[dict]:
    """completions.jsonl is appended to; a kill mid-append can leave a cut last line, which is dropped."""
    if not path.exists():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                logger.warning("%s: dropping a cut last line", path)
                continue
            raise DataError(f"{path}:{number}: malformed JSON") from None
    return rows


class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.checkpoint_root = self.path / "checkpoints"

    @classmethod
    def open(cls, path: Path, resume: bool, overwrite: bool) -> "RunFolder":
        folder = cls(Path(path).expanduser().resolve())
        out = folder.path
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write_test.{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise RunFolderError(f"output dir {out} is not writable: {err.strerror or err}") from None
        has_results = (out / "metrics.jsonl").exists() or (out / "eval_history.json").exists()
        if overwrite:
            for name in RESULT_FILES:
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(folder.checkpoint_root, ignore_errors=True)
            shutil.rmtree(out / "wandb", ignore_errors=True)
        elif has_results and not resume:
            raise RunFolderError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
        return folder

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def attach_log(self) -> None:
        """Log to run.log in this folder; a handler of an earlier run in this process is removed."""
        root = logging.getLogger()
        for earlier in [h for h in root.handlers if getattr(h, "is_sdpo_run_log", False)]:
            root.removeHandler(earlier)  # an earlier run in this process (main() called twice) logs no more
            earlier.close()
        handler = logging.FileHandler(self.path / "run.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.is_sdpo_run_log = True
        root.addHandler(handler)
        logger.info("output dir: %s", self.path)

    # ------------------------------------------------------------ records
    def write_metrics(self, metrics: list[dict]) -> None:
        atomic_write_jsonl(self.path / "metrics.jsonl", metrics)

    def write_history(self, history: list[dict]) -> None:
        atomic_write_json(self.path / "eval_history.json", history)

    def append_completion(self, row: dict) -> None:
        append_jsonl(self.path / "completions.jsonl", row)

    def read_completions(self) -> list[dict]:
        return read_jsonl_tolerant(self.path / "completions.jsonl")

    def truncate_after(self, step: int) -> tuple[list[dict], list[dict]]:
        """Drop the metrics, evaluations and completions of steps after `step` (they are replayed);
        returns the (metrics, eval history) that remain."""
        metrics, history = [], []
        if (self.path / "metrics.jsonl").exists():
            metrics = [r for r in read_jsonl(self.path / "metrics.jsonl") if r["step"] <= step]
        if (self.path / "eval_history.json").exists():
            history = [r for r in json.loads((self.path / "eval_history.json").read_text()) if r["step"] <= step]
        self.write_metrics(metrics)
        self.write_history(history)
        kept = [r for r in self.read_completions() if r["step"] <= step]
        atomic_write_jsonl(self.path / "completions.jsonl", kept)
        return metrics, history

    def write_config(self, config: dict, resume: bool) -> None:
        """config.json ({"sdpo": ..., "run": ..., "resolved": ...}); a resume warns about changed settings."""
        previous = self.path / "config.json"
        if resume and previous.exists():
            old = json.loads(previous.read_text())
            changed = sorted(k for part in ("sdpo", "run") for k, v in config[part].items()
                             if k not in RESUME_NEUTRAL_FLAGS and old.get(part, {}).get(k) != v)
            if changed:
                logger.warning("--resume with settings that differ from the first run: %s", ", ".join(changed))
        atomic_write_json(previous, config)

    # ------------------------------------------------------------ baseline cache
    def cached_baseline(self, signature: dict) -> list[str] | None:
        """The cached baseline replies made with exactly these settings; None when there is no cache."""
        cache = self.path / "baseline_completions.json"
        if not cache.exists():
            return None
        saved = json.loads(cache.read_text())
        if saved.get("signature") != signature:
            raise RunFolderError(f"{cache} was made with other settings ({saved.get('signature')}); "
                                 "use a new --output_dir or --overwrite")
        logger.info("baseline completions reused from %s", cache)
        return saved["completions"]

    def save_baseline(self, signature: dict, completions: list[str]) -> None:
        atomic_write_json(self.path / "baseline_completions.json", {"signature": signature, "completions": completions})

    # ------------------------------------------------------------ checkpoints of several arms
    def checkpoint_path(self, arm: str, step: int) -> Path:
        return self.checkpoint_root / arm / f"step_{step:06d}"

    def write_checkpoint_marker(self, step: int, arms: list[str]) -> None:
        atomic_write_json(self.checkpoint_root / "latest.json", {"step": step, "arms": arms})

    def checkpoint_marker_step(self) -> int | None:
        """The newest step every arm has a checkpoint of; None without a marker."""
        marker = self.checkpoint_root / "latest.json"
        return int(json.loads(marker.read_text())["step"]) if marker.exists() else None

    def resume_checkpoints(self, arms: list[str]) -> tuple[int, dict[str, Path]]:
        """(step, {arm: its checkpoint}) to resume from; (-1, {}) when there is no checkpoint."""
        step = self.checkpoint_marker_step()
        if step is None:
            logger.warning("--resume: no checkpoint in %s, starting again from step 0 (baseline cache kept)",
                           self.checkpoint_root)
            return -1, {}
        paths = {arm: self.checkpoint_path(arm, step) for arm in arms}
        for path in paths.values():
            if not path.exists():
                raise RunFolderError(f"--resume: {path} is missing (the run had arms {arms}?)")
        return step, paths
