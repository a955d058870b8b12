"""Small, shared file helpers: JSONL reading with precise errors and atomic writes.

Every result file of the project goes through `atomic_write_*` so that a crash never
leaves a half-written file behind (temporary file in the same folder, fsync, rename).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


def base_work_dir() -> Path:
    """Where outputs, caches and adapters go by default, never $HOME: $BASE_WORK, else $SCRATCH, else $TMPDIR,
    else /tmp (the wrappers use the same chain)."""
    return Path(os.environ.get("BASE_WORK") or os.environ.get("SCRATCH") or os.environ.get("TMPDIR") or "/tmp")


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the field."""


_COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"PK\x03\x04": "zip",
                     b"\x28\xb5\x2f\xfd": "zstd", b"PAR1": "parquet"}


def check_looks_like_text(path: Path) -> None:
    """A compressed or binary file given as JSONL fails with what it looks like, not a decode traceback."""
    with path.open("rb") as handle:
        head = handle.read(8)
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):  # a UTF-16 byte order mark (Windows editors, PowerShell's >)
        raise DataError(f"{path}: UTF-16 text, not UTF-8; convert it with iconv -f utf-16 -t utf-8")
    for magic, kind in _COMPRESSED_MAGIC.items():
        if head.startswith(magic):
            hint = "decompress it first (e.g. gunzip)" if kind != "parquet" else "convert it to JSONL"
            raise DataError(f"{path}: looks like a {kind} file, not JSONL text; {hint}")


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, record) for each non-empty line; malformed lines raise DataError."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    check_looks_like_text(path)
    with path.open("rb") as handle:  # decoded line by line, so an encoding error names its line
        for line_number, raw_line in enumerate(handle, start=1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{line_number}: not UTF-8 text "
                                f"(byte 0x{err.object[err.start]:02x}; a latin-1 or other legacy encoding? "
                                "convert it with iconv -f latin1 -t utf-8)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_number}: malformed JSON ({err.msg} at column {err.colno})") from None
            except ValueError as err:  # a number json.loads refuses to convert (over 4300 digits)
                raise DataError(f"{path}:{line_number}: unreadable JSON ({str(err).split(':')[0]})") from None
            except RecursionError:
                raise DataError(f"{path}:{line_number}: JSON nested too deeply (more than {MAX_JSON_DEPTH} "
                                "levels)") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            problem = text_problem(record)
            if problem:
                raise DataError(f"{path}:{line_number}: {problem}")
            yield line_number, record


MAX_JSON_DEPTH = 64  # a conversation is 3 levels deep; far deeper is a broken or hostile file


def text_problem(record: dict) -> str | None:
    """What makes a parsed record unusable as text, naming its top-level field: nesting deeper than
    MAX_JSON_DEPTH, or a string with a lone surrogate (JSON's "\\ud800" escape; no tokenizer takes it)."""
    for field_name, value in record.items():
        stack = [(field_name, 1), (value, 1)]
        while stack:
            item, depth = stack.pop()
            if depth > MAX_JSON_DEPTH:
                return f"field {field_name!r} is nested more than {MAX_JSON_DEPTH} levels deep"
            if isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as err:
                    return (f"field {field_name!r} holds a lone surrogate ({item[err.start]!r}): not valid Unicode "
                            "text (a \\ud800-style escape without its pair)")
            elif isinstance(item, dict):
                stack.extend((part, depth + 1) for pair in item.items() for part in pair)
            elif isinstance(item, list):
                stack.extend((part, depth + 1) for part in item)
    return None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return [record for _, record in iter_jsonl(path)]


def describe_os_error(err: OSError) -> str:
    """One line for an environment error: what failed on which path, and what that usually means."""
    import errno

    path = err.filename or "?"
    hints = {errno.ENOSPC: " (the disk is full: free space or choose another output folder)",
             errno.EROFS: " (read-only file system: choose another output folder)",
             errno.EACCES: " (no permission: choose another output folder)",
             errno.EDQUOT: " (disk quota exceeded)", errno.EFBIG: " (a file size limit: see ulimit -f)"}
    return f"cannot write {path}: {err.strerror or err}{hints.get(err.errno, '')}"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; results are ordinary files
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    fsync_dir(path.parent)  # make the rename itself durable


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file under `folder` (and the folders themselves) to disk: called on a checkpoint
    written under a temporary name before it is renamed into place, so that a marker naming it never
    outlives its contents after a power loss."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(root)


def fsync_dir(folder: str | os.PathLike) -> None:
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # some file systems cannot fsync a folder


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def to_json(obj: Any, indent: int | None = None) -> str:
    """Strict JSON: NaN and +-inf become null (bare NaN is Python-only and breaks jq, JS, pandas' strict readers)."""
    return json.dumps(_finite_or_null(obj), indent=indent, ensure_ascii=False, default=_json_default, allow_nan=False)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, to_json(obj, indent) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    lines = [to_json(r) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def append_jsonl(path: str | os.PathLike, record: dict, private: bool = False) -> None:
    """Append one line and fsync (used for metrics.jsonl; resume truncates by step).

    private: a new file is created readable by its owner only (the chat's interaction log)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE_MODE)
        os.fchmod(fd, PRIVATE_FILE_MODE)  # also tightens a log written by an older version
        handle = os.fdopen(fd, "a", encoding="utf-8")
    else:
        handle = path.open("a", encoding="utf-8")
    with handle:
        handle.write(to_json(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _finite_or_null(obj: Any):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite_or_null(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(value) for value in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy / torch scalars
        return _finite_or_null(obj.item())
    return obj


def _json_default(obj: Any):
    if hasattr(obj, "item"):
        return _finite_or_null(obj.item())
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ---------------------------------------------------------------------- private folders

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def folders_to_create(path: str | os.PathLike) -> list[Path]:
    """The folders that creating `path` would make: itself and its missing parents, innermost first ([] when it
    exists). A run notes them before it writes anything, so that run_folder.remove_unstarted knows what it made."""
    missing, probe = [], Path(path)
    while not os.path.lexists(probe) and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    return missing


def require_writable_folder(path: str | os.PathLike, flag: str = "--output_dir") -> Path:
    """That `path` is a folder this process can write in, or one it could create (its nearest existing parent is
    a folder it can write in), without creating it: a tool that writes its results only at the end creates the
    folder then (atomic_write_* make the parents), so a run that fails before leaves no empty folder. DataError."""
    path = Path(path).expanduser()
    missing = folders_to_create(path)
    probe = missing[-1].parent if missing else path
    if not probe.is_dir():
        raise DataError(f"{flag} {path}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DataError(f"{flag} {path}: {probe} is not writable")
    return path


def private_dir(path: str | os.PathLike, tighten_existing: bool = True) -> Path:
    """Create `path` (and missing parents) readable by its owner only, or tighten an existing one
    (tighten_existing=False: a folder that was there before keeps its mode, e.g. a user's own folder).

    The default chat and run folders live under a world-writable base (/tmp): a folder that
    someone else created there could hold files planted for us, so one not owned by this user
    is refused rather than used."""
    path = Path(path)
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:  # created meanwhile by another process: checked below
            pass
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a folder")
    owner = path.stat().st_uid
    if owner != os.getuid():
        raise PermissionError(f"{path} belongs to user id {owner}, not to you ({os.getuid()}): "
                              "refusing to read or write it; choose another folder")
    for folder in dict.fromkeys(([path] if tighten_existing else []) + missing):
        os.chmod(folder, PRIVATE_DIR_MODE)  # mkdir's mode is reduced by the umask; set it exactly
    return path


# ---------------------------------------------------------------------- crash-safe folder replacement
#
# A folder (checkpoint, adapter) is replaced in four steps so that at every moment either the old
# or the new complete folder exists: write the new one as NAME.partial, rename NAME to NAME.old,
# rename NAME.partial to NAME, delete NAME.old. `recover_folder` repairs what a crash left.

PARTIAL_SUFFIX = ".partial"
OLD_SUFFIX = ".old"


def partial_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def old_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + OLD_SUFFIX)


def recover_folder(path: str | os.PathLike) -> str:
    """Undo what an interrupted `replace_folder` left behind; returns what it did ("" when nothing).

    A .partial is never complete-by-name: it is deleted. NAME missing with NAME.old present means
    the crash came between the two renames: the old folder is put back. NAME and NAME.old both
    present means the crash came after the second rename: NAME is the new complete one."""
    import shutil

    path = Path(path)
    done = []
    partial, old = partial_path(path), old_path(path)
    if partial.exists():
        shutil.rmtree(partial)
        done.append(f"deleted the unfinished {partial.name}")
    if old.exists():
        if path.exists():
            shutil.rmtree(old)
            done.append(f"deleted the replaced {old.name}")
        else:
            old.rename(path)
            done.append(f"restored {path.name} from {old.name}")
    if done:
        fsync_dir(path.parent)
    return "; ".join(done)


def replace_folder(partial: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Move the complete folder `partial` to `path`, replacing what is there, crash-safely."""
    import shutil

    partial, path = Path(partial), Path(path)
    old = old_path(path)
    if old.exists():
        shutil.rmtree(old)  # recover_folder ran before the new folder was written: NAME is intact
    if path.exists():
        path.rename(old)
        fsync_dir(path.parent)
    partial.rename(path)
    fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old)
    return path
