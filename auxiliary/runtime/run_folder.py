"""The folder of one online run: the single owner of what is written there and of the resume rules.

    folder = RunFolder.open(path, resume=False, overwrite=False)   # create, probe, lock, apply the rules
    folder.clear_earlier_results()                                  # --overwrite, once every check has passed
    folder.attach_log()                                             # run.log (0600), for this run only
    folder.check_resume_config(config, allow_change=False)          # resume: refuse changed settings
    step, paths = folder.resume_checkpoints(arms)                   # resume: newest intact checkpoints
    metrics, history = folder.truncate_after(step)                  # resume: drop what comes after
    folder.write_config(config, resume_step=step)                   # config.json with its change history
    folder.cached_baseline(signature) / folder.save_baseline(signature, replies)
    folder.write_checkpoint_marker(step, arms)
    folder.close()                                                  # the lock goes
    folder.remove_if_unstarted()                                    # setup failed: a folder open() made goes again

Rules of open(): a new folder is created owner-only (0700) and must be writable (a probe file is
written and removed); it is locked (.lock: PID and host) so that a second run or a --resume while
the first is alive is refused, and a stale lock of a dead process is taken over. A folder a run of
ours wrote carries the run marker (RUN_MARKER: a regular file, not a link, whose JSON names this
project; an empty or foreign file does not count); one without it that holds files a run would write
(config.json, checkpoints/, ...) is refused, --overwrite included, and keeps its mode. A folder
that holds results (metrics.jsonl or eval_history.json) needs --resume or --overwrite; --overwrite
deletes nothing at open: the entry point calls clear_earlier_results() once every check that can
fail has passed, and only what a run of ours writes is removed; until then the run's log lines wait in
memory, so a refused --overwrite leaves every file of the earlier run (run.log included) byte for byte.
A result file that is a symbolic link is refused (a run never writes through a link). Checkpoints of
several arms sit in checkpoints/<arm>/step_N; checkpoints/latest.json names a step only once every arm
has it.
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import os
import shutil
import sys
import time
from pathlib import Path

from auxiliary.runtime.checkpoints import (MARKER_FILE, CheckpointError, checkpoint_name, read_latest_marker,
                                           resume_point, write_marker)
from auxiliary.runtime.io_utils import (PRIVATE_FILE_MODE, DataError, append_jsonl, atomic_write_json,
                                        atomic_write_jsonl, base_work_dir, folders_to_create, iter_jsonl,
                                        private_dir)
from auxiliary.runtime.locks import FolderLock, FolderLockError

logger = logging.getLogger("eval_online_sdpo")  # the run's own lines in run.log, as before the move

RESULT_FILES = ("config.json", "metrics.jsonl", "eval_history.json", "completions.jsonl", "winrate.png",
                "summary.json", "baseline_completions.json", "run.log", "wandb_id.txt")
RESULT_FOLDERS = ("checkpoints", "wandb")
# Written into every folder a run of ours (online or offline) writes: --overwrite deletes only in a folder
# that carries it, so a user's own folder given by mistake (a model folder, say) never loses a file.
RUN_MARKER = ".sdpo_run.json"
PROJECT_IDENTITY = "sdpo-from-user-interactions"  # the marker's "project": an empty or foreign file is no marker
# Flags that may differ between a run and its resume without changing the experiment; any other
# difference is refused unless --allow_config_change (then recorded in config.json's history).
RESUME_NEUTRAL_FLAGS = {"resume", "overwrite", "allow_config_change", "wandb", "wandb_project", "debug_first_example",
                        "api_concurrency", "api_max_retries", "api_timeout_s", "run_name", "output_dir",
                        # the run's length and bookkeeping: a stopped run is continued to more steps
                        "train_n", "save_checkpoints", "checkpoint_every", "max_checkpoints", "checkpoint_dir"}


class RunFolderError(RuntimeError):
    """The output folder cannot be used as asked; the message is the whole story."""


def default_output_dir(run_name: str | None, model: str, style: str) -> Path:
    """$OUTPUT_DIR, else ${BASE_WORK:-${SCRATCH:-${TMPDIR:-/tmp}}}/sdpo_runs/<run_name or online-model-style-time>."""
    if os.environ.get("OUTPUT_DIR"):
        return Path(os.environ["OUTPUT_DIR"])
    name = run_name or f"online-{Path(model.rstrip('/')).name}-{style}-{time.strftime('%Y%m%d-%H%M%S')}"
    return base_work_dir() / "sdpo_runs" / name


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


def read_run_json(path: Path, expected: type, what: str):
    """A JSON file of the run folder, or one line naming it when it is not what a run wrote there."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise RunFolderError(f"{path}: not the run's {what} (not JSON: {err}); restore it, or start "
                             "again with another --output_dir") from None
    if not isinstance(value, expected):
        raise RunFolderError(f"{path}: not the run's {what} (a JSON {type(value).__name__}, expected "
                             f"{'an object' if expected is dict else 'a list'}); restore it, or start again with "
                             "another --output_dir")
    return value


def steps_of(rows, path: Path, numbers=None) -> list[dict]:
    """Rows that each carry a whole-number "step" (what resume truncates by); else one line naming the row."""
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) or isinstance(row.get("step"), bool):
            where = f"{path}:{numbers[index]}" if numbers else f"{path} (entry {index + 1})"
            raise RunFolderError(f"{where}: a record without a whole-number \"step\" (not written by a run; "
                                 "restore the file or start again with another --output_dir)")
    return rows


def run_files_in(folder: Path, names) -> list[str]:
    """Which of `names` are in `folder` (links included)."""
    return [name for name in names if os.path.lexists(folder / name)]


def refusal_without_marker(folder: Path, found: list[str], overwrite: bool, resume_flag: str) -> str:
    """The one line for a folder holding files a run writes but no run marker: it was never a run of ours."""
    listed = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
    action = ("--overwrite deletes only in a folder a run of ours wrote, and nothing was deleted"
              if overwrite else f"a run would overwrite them (and {resume_flag} needs a run of ours)")
    return (f"{folder} holds {listed} but not the run marker {RUN_MARKER}, so no run of this project made it; "
            f"{action}; choose another --output_dir")


def refuse_links(folder: Path, names) -> None:
    """A run writes its files in place: a symbolic link among them (pointing anywhere) is refused, not followed."""
    links = [name for name in names if (folder / name).is_symlink()]
    if links:
        raise RunFolderError(f"{folder / links[0]} is a symbolic link; a run never writes through a link: "
                             "replace it with a file or choose another --output_dir")


def is_run_of_ours(folder: Path) -> bool:
    """Whether `folder` carries our run marker: a regular file (a link is not followed, since it may point
    at another run's marker) whose JSON names this project. An empty or foreign file does not count."""
    marker = Path(folder) / RUN_MARKER
    if marker.is_symlink() or not marker.is_file():
        return False
    try:
        content = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
        return False
    return isinstance(content, dict) and content.get("project") == PROJECT_IDENTITY


def write_run_marker(folder: Path, tool: str) -> None:
    """Mark `folder` as written by a run of ours (kept once written: the first tool is named)."""
    if not is_run_of_ours(folder):  # atomic: a link or a stray file named like the marker is replaced, not followed
        atomic_write_json(Path(folder) / RUN_MARKER, {"project": PROJECT_IDENTITY, "tool": tool,
                                                      "created": time.strftime("%Y-%m-%dT%H:%M:%S")})


def remove_unstarted(created: list[Path], own_files: tuple[str, ...]) -> bool:
    """A run that failed before it wrote a result: remove the folders it created (`created`, from
    folders_to_create, innermost first), but only while the innermost holds nothing but `own_files` this run
    wrote there (its run marker, its run.log) and each parent is left empty. A folder that was there before, or
    one holding anything else (a user's file written meanwhile), stays as it is. Returns whether it was removed."""
    if not created:
        return False
    folder = created[0]
    if folder.is_symlink() or not folder.is_dir():
        return False
    names = os.listdir(folder)
    if any(name not in own_files and name != RUN_MARKER for name in names):
        return False
    if RUN_MARKER in names and not is_run_of_ours(folder):  # a file of that name someone else put there
        return False
    try:
        for name in names:
            (folder / name).unlink()
        for made in created:  # rmdir never removes a folder that is not empty
            made.rmdir()
    except OSError:
        pass
    return not folder.exists()


class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.checkpoint_root = self.path / "checkpoints"
        self.lock: FolderLock | None = None
        self.config_changes: dict = {}  # what a --resume --allow_config_change changed: {key: [old, new]}
        self.pending_overwrite = False  # --overwrite: cleared by clear_earlier_results once the checks have passed
        self.written: set[str] = set()  # files this run wrote before clear_earlier_results (kept by it)
        self.created: list[Path] = []  # the folders open() made (the output folder and its missing parents)

    @classmethod
    def open(cls, path: Path, resume: bool, overwrite: bool) -> "RunFolder":
        """Create (owner-only), probe and lock the folder, then apply the overwrite / resume rules.
        Nothing is deleted here (see clear_earlier_results)."""
        if resume and overwrite:
            raise RunFolderError("--resume and --overwrite exclude each other: continue the run or replace it")
        folder = cls(Path(path).expanduser().resolve())
        out = folder.path
        ours = is_run_of_ours(out)
        found = run_files_in(out, RESULT_FILES + RESULT_FOLDERS)
        if found and not ours and (overwrite or not resume):
            raise RunFolderError(refusal_without_marker(out, found, overwrite, "--resume"))
        folder.created = folders_to_create(out)
        try:
            private_dir(out, tighten_existing=ours)  # a folder of ours is 0700 already; a user's keeps its mode
            probe = out / f".write_test.{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except (OSError, ValueError) as err:
            raise RunFolderError(f"output dir {out} is not writable: {getattr(err, 'strerror', None) or err}") from None
        refuse_links(out, RESULT_FILES + RESULT_FOLDERS)
        has_results = (out / "metrics.jsonl").exists() or (out / "eval_history.json").exists()
        if has_results and not (resume or overwrite):
            raise RunFolderError(
                f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
        try:  # one writer per folder: a second run, or a --resume while the first is alive, stops here
            folder.lock = FolderLock(out).acquire()
        except FolderLockError as err:
            raise RunFolderError(str(err)) from None
        write_run_marker(out, "eval_online_sdpo.py")
        folder.pending_overwrite = overwrite
        return folder

    def clear_earlier_results(self) -> None:
        """--overwrite: delete what an earlier run of ours wrote here (never anything else). Called by the
        entry point once every check that can fail has passed; this run's own run.log lines are kept."""
        if not self.pending_overwrite:
            return
        self.pending_overwrite = False
        removed = [name for name in run_files_in(self.path, RESULT_FILES + RESULT_FOLDERS) if name not in self.written]
        for name in removed:
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        pending = self._run_log_handler()
        if isinstance(pending, logging.handlers.MemoryHandler):  # this run's lines so far, into a new run.log
            self._start_run_log(pending.buffer)
        if removed:
            logger.info("--overwrite: removed the earlier run's %s", ", ".join(removed))

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        pending = self._run_log_handler()
        if isinstance(pending, logging.handlers.MemoryHandler):  # a refused --overwrite: its lines go nowhere
            logging.getLogger().removeHandler(pending)

    def remove_if_unstarted(self) -> bool:
        """Setup failed (a model that does not load, bad data): the folder goes again when open() created it and
        it holds only what this run wrote there (the run marker and run.log): nothing half-written stays behind.
        Closes the folder first. A folder that was there before keeps everything."""
        self.close()
        root = logging.getLogger()
        for handler in [h for h in root.handlers if getattr(h, "is_sdpo_run_log", False)]:
            root.removeHandler(handler)  # this run logs no more into the folder it removes
            handler.close()
        return remove_unstarted(self.created, ("run.log",))

    def log_error(self, message: str) -> None:
        """The run's final error, into run.log only (the console has it already)."""
        for handler in logging.getLogger().handlers:
            if getattr(handler, "is_sdpo_run_log", False):
                handler.handle(logging.LogRecord(logger.name, logging.ERROR, __file__, 0, message, None, None))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def attach_log(self) -> None:
        """Log to run.log in this folder; a handler of an earlier run in this process is removed. Under a pending
        --overwrite the lines wait in memory until clear_earlier_results: a refused attempt leaves the earlier
        run's run.log as it was."""
        root = logging.getLogger()
        for earlier in [h for h in root.handlers if getattr(h, "is_sdpo_run_log", False)]:
            root.removeHandler(earlier)  # an earlier run in this process (main() called twice) logs no more
            earlier.close()
        if self.pending_overwrite:
            waiting = logging.handlers.MemoryHandler(capacity=sys.maxsize, flushLevel=logging.CRITICAL + 1)
            waiting.is_sdpo_run_log = True
            root.addHandler(waiting)
        else:
            self._start_run_log([])
        logger.info("output dir: %s", self.path)

    def _run_log_handler(self) -> logging.Handler | None:
        return next((h for h in logging.getLogger().handlers if getattr(h, "is_sdpo_run_log", False)), None)

    def _start_run_log(self, earlier_records: list[logging.LogRecord]) -> None:
        """Append to run.log (0600, never through a link), first the records that waited for it."""
        root = logging.getLogger()
        waiting = self._run_log_handler()
        if waiting is not None:
            root.removeHandler(waiting)
        log_file = self.path / "run.log"
        # O_NOFOLLOW: a link planted as run.log is refused, never chmod-ed or appended to
        fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, PRIVATE_FILE_MODE)
        os.fchmod(fd, PRIVATE_FILE_MODE)  # the log names paths and settings: owner-only, like the folder
        os.close(fd)
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.is_sdpo_run_log = True
        for record in earlier_records:
            handler.handle(record)
        root.addHandler(handler)

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
        metrics_file, history_file = self.path / "metrics.jsonl", self.path / "eval_history.json"
        if metrics_file.exists():
            numbered = list(iter_jsonl(metrics_file))
            rows = steps_of([r for _, r in numbered], metrics_file, [n for n, _ in numbered])
            metrics = [r for r in rows if r["step"] <= step]
        if history_file.exists():
            rows = steps_of(read_run_json(history_file, list, "evaluation history"), history_file)
            history = [r for r in rows if r["step"] <= step]
        completions = steps_of(self.read_completions(), self.path / "completions.jsonl")
        self.write_metrics(metrics)
        self.write_history(history)
        kept = [r for r in completions if r["step"] <= step]
        atomic_write_jsonl(self.path / "completions.jsonl", kept)
        return metrics, history

    def check_resume_config(self, config: dict, allow_change: bool) -> None:
        """Before anything is loaded: a --resume whose settings change the experiment is refused with
        the list of differences, unless allowed (the change is then recorded by write_config)."""
        previous = self.path / "config.json"
        if not previous.exists():
            return
        old = read_run_json(previous, dict, "config.json")
        for part in ("sdpo", "run"):
            if not isinstance(old.get(part, {}), dict):
                raise RunFolderError(f"{previous}: not the run's config.json (\"{part}\" is not an object); restore "
                                     "it, or start again with another --output_dir")
        changes = {k: [old.get(part, {}).get(k), v] for part in ("sdpo", "run") for k, v in config[part].items()
                   if k not in RESUME_NEUTRAL_FLAGS and old.get(part, {}).get(k) != v}
        if changes and not allow_change:
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changes.items()))
            raise RunFolderError(f"--resume with settings that change the experiment ({listed}); pass "
                                 "--allow_config_change to go on (the change is recorded in config.json)")
        if changes:
            logger.warning("--resume --allow_config_change: %s", ", ".join(sorted(changes)))
        self.config_changes = changes

    def write_config(self, config: dict, resume_step: int | None = None) -> None:
        """config.json ({"sdpo": ..., "run": ..., "resolved": ..., "history": [...]}); the history keeps
        every change a resume made, with the step it was made after, so nothing is lost."""
        previous = self.path / "config.json"
        history = read_run_json(previous, dict, "config.json").get("history", []) if previous.exists() else []
        if not isinstance(history, list):
            raise RunFolderError(f"{previous}: not the run's config.json (\"history\" is not a list)")
        if resume_step is not None and self.config_changes:
            history.append({"resumed_after_step": resume_step, "changed": self.config_changes,
                            "time": time.strftime("%Y-%m-%d %H:%M:%S")})
            self.config_changes = {}  # recorded once
        atomic_write_json(previous, {**config, "history": history})

    # ------------------------------------------------------------ baseline cache
    def cached_baseline(self, signature: dict) -> list[str] | None:
        """The cached baseline replies made with exactly these settings; None when there is no cache."""
        cache = self.path / "baseline_completions.json"
        if not cache.exists() or self.pending_overwrite:  # an earlier run's cache goes with --overwrite
            return None
        saved = read_run_json(cache, dict, "baseline cache")
        if not isinstance(saved.get("completions"), list):
            raise RunFolderError(f"{cache}: not the run's baseline cache (no \"completions\" list); delete it to "
                                 "generate the baseline again")
        if saved.get("signature") != signature:
            raise RunFolderError(f"{cache} was made with other settings ({saved.get('signature')}); "
                                 "use a new --output_dir or --overwrite")
        logger.info("baseline completions reused from %s", cache)
        return saved["completions"]

    def save_baseline(self, signature: dict, completions: list[str]) -> None:
        atomic_write_json(self.path / "baseline_completions.json", {"signature": signature, "completions": completions})
        self.written.add("baseline_completions.json")

    # ------------------------------------------------------------ checkpoints of several arms (checkpoints.py's format)
    def checkpoint_path(self, arm: str, step: int) -> Path:
        return self.checkpoint_root / arm / checkpoint_name(step)

    def write_checkpoint_marker(self, step: int, arms: list[str]) -> None:
        write_marker(self.checkpoint_root, step, arms)

    def checkpoint_marker_step(self) -> int | None:
        """The step the marker names (every arm has it); None without a marker."""
        return read_latest_marker(self.checkpoint_root / MARKER_FILE)

    def resume_checkpoints(self, arms: list[str]) -> tuple[int, dict[str, Path]]:
        """(step, {arm: its checkpoint}) to resume from; (-1, {}) when there is no checkpoint
        (checkpoints.resume_point: the marker's step, else the newest step intact for every arm)."""
        try:
            return resume_point(self.checkpoint_root, arms)
        except CheckpointError as err:
            raise RunFolderError(str(err)) from None
