"""The checkpoint format, in one place: what a checkpoint folder holds, its manifest, the RNG state,
listing and pruning, the marker of a run of several arms, and which checkpoint is the newest intact one.

    <root>/step_000012/              a checkpoint (CHECKPOINT_PREFIX and the update count)
        model/                       weights or LoRA adapter, and the tokenizer (save_pretrained)
        optimizer.pt                 tensors and plain values, loaded with weights_only=True
        updater_state.json           step, skipped updates, lr scheduler, extra state
        rng.pt, rng.json             torch (and CUDA) generator states; python's and numpy's as JSON
        teacher_ema.safetensors      --teacher ema only
        config.json                  the updater's settings, secrets masked
        manifest.json                size and sha256 of every other file
    <run>/checkpoints/latest.json    a run of several arms: the step every arm has

Nothing read is unpickled; every write goes through a temporary file or folder (io_utils). The updater
(online_sdpo_updater.py) writes and reads the contents; the online run folder (run_folder.py) asks here
which step to resume from.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from auxiliary.runtime.io_utils import OLD_SUFFIX, PARTIAL_SUFFIX, atomic_write_json, recover_folder

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
STATE_FILE = "updater_state.json"
OPTIMIZER_FILE = "optimizer.pt"
TEACHER_FILE = "teacher_ema.safetensors"  # the EMA teacher's weights (--teacher ema only)
RNG_TENSORS_FILE = "rng.pt"      # torch (and CUDA) generator states: tensors only
RNG_JSON_FILE = "rng.json"       # python's and numpy's generator states as JSON lists
MANIFEST_FILE = "manifest.json"
MARKER_FILE = "latest.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted; the message names the bad file."""


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def step_of(path: Path) -> int:
    return int(CHECKPOINT_NAME.match(Path(path).name).group(1))


def safe_torch_load(path: Path, map_location=None):
    """torch.load restricted to tensors and plain containers: a planted pickle cannot run code."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # UnpicklingError for a disallowed object, others for garbage
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: refusing to load ({first_line})") from None


# ------------------------------------------------------------------ RNG state
def save_rng_state(folder: Path) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(tensors, folder / RNG_TENSORS_FILE)
    version, internal, gauss_next = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    atomic_write_json(folder / RNG_JSON_FILE, {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {"name": name, "keys": keys.tolist(), "position": int(position), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)}})


def load_rng_state(folder: Path) -> None:
    tensors = safe_torch_load(folder / RNG_TENSORS_FILE)
    try:
        values = json.loads((folder / RNG_JSON_FILE).read_text())
        python, numpy_state = values["python"], values["numpy"]
        python_state = (python["version"], tuple(python["state"]), python["gauss_next"])
        numpy_tuple = (numpy_state["name"], np.asarray(numpy_state["keys"], dtype=np.uint32),
                       numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{folder / RNG_JSON_FILE}: unreadable RNG state ({err})") from None
    random.setstate(python_state)
    np.random.set_state(numpy_tuple)
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])


# ------------------------------------------------------------------ manifest
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """manifest.json: size and sha256 of every other file under the checkpoint folder."""
    files = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = file.relative_to(folder).as_posix()
        if relative != MANIFEST_FILE and not file.name.endswith(".tmp"):
            files[relative] = {"size": file.stat().st_size, "sha256": _sha256(file)}
    atomic_write_json(folder / MANIFEST_FILE, {"files": files})


def verify_checkpoint(path: str | Path) -> None:
    """Raise CheckpointError naming the first bad file: a missing or unreadable manifest, a file
    listed there that is missing, of another size (truncated) or another checksum."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    try:
        files = json.loads(manifest_path.read_text())["files"]
        if not isinstance(files, dict) or not all(isinstance(v, dict) and {"size", "sha256"} <= v.keys()
                                                  for v in files.values()):
            raise ValueError("malformed entries")
    except FileNotFoundError:
        raise CheckpointError(f"{manifest_path}: missing (an incomplete checkpoint, or one written "
                              "before checksums were recorded)") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{manifest_path}: corrupted ({err})") from None
    required = (STATE_FILE, OPTIMIZER_FILE, RNG_TENSORS_FILE, RNG_JSON_FILE)
    for name in required:
        if name not in files:
            raise CheckpointError(f"{manifest_path}: does not list {name}")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        size = file.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(f"{file}: {size} bytes, the manifest says {expected['size']} (truncated?)")
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file}: checksum differs from the manifest (corrupted)")


# ------------------------------------------------------------------ listing, pruning, the marker
def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in a folder (by name: step_N with its state file), oldest first.
    Folders mid-replacement (.partial, .old) are never listed."""
    folder = Path(folder)
    if not folder.exists():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT_NAME.match(p.name)
             and (p / STATE_FILE).exists()]
    return sorted(found, key=step_of)


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def prune_checkpoints(folder: str | Path, keep: int) -> None:
    """Delete all but the `keep` newest complete checkpoints in `folder` (keep <= 0: delete none)."""
    if keep <= 0:
        return
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def write_marker(root: Path, step: int, arms: list[str]) -> None:
    """latest.json: `step` is complete for every arm (written only once each arm's checkpoint is)."""
    atomic_write_json(Path(root) / MARKER_FILE, {"step": step, "arms": arms})


def read_latest_marker(marker: str | Path) -> int | None:
    """The step a run's latest.json names (None when there is no marker); CheckpointError if corrupted."""
    marker = Path(marker)
    if not marker.exists():
        return None
    try:
        step = json.loads(marker.read_text())["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step {step!r} is not a step number")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{marker}: corrupted checkpoint marker ({err})") from None
    return step


# ------------------------------------------------------------------ the newest intact checkpoint
def newest_intact(candidates: Iterable, verify: Callable, skipped: Callable) -> tuple:
    """(the first of `candidates`, newest first, that `verify` passes, the first CheckpointError met before
    it); (None, that error) when none passes. `skipped(candidate, error)` hears of each one passed over."""
    first_error = None
    for candidate in candidates:
        try:
            verify(candidate)
        except CheckpointError as err:
            first_error = first_error or err
            skipped(candidate, err)
            continue
        return candidate, first_error
    return None, first_error


def latest_intact_checkpoint(folder: str | Path) -> Path | None:
    """The newest checkpoint that passes `verify_checkpoint`, warning about each newer bad one;
    None when the folder holds no checkpoint; CheckpointError (naming the bad file of the newest)
    when it holds some and none is intact. Repairs interrupted replacements first."""
    folder = Path(folder)
    if not folder.exists():
        return None
    for leftover in folder.iterdir():
        for suffix in (PARTIAL_SUFFIX, OLD_SUFFIX):
            if leftover.name.endswith(suffix) and CHECKPOINT_NAME.match(leftover.name[:-len(suffix)]):
                done = recover_folder(folder / leftover.name[:-len(suffix)])
                if done:
                    logger.warning("%s: %s", folder, done)
    candidates = sorted((p for p in folder.iterdir() if p.is_dir() and CHECKPOINT_NAME.match(p.name)),
                        key=step_of, reverse=True)
    found, first_error = newest_intact(candidates, verify_checkpoint,
                                       lambda _, err: logger.warning("skipping damaged checkpoint: %s", err))
    if found is not None:
        if first_error is not None:
            logger.warning("falling back to %s, the newest intact checkpoint", found)
        return found
    if first_error is not None:
        raise CheckpointError(f"no intact checkpoint in {folder}: {first_error}")
    return None


def resume_point(root: Path, arms: list[str]) -> tuple[int, dict[str, Path]]:
    """(step, {arm: its checkpoint}) of a run of several arms under `root` (root/<arm>/step_N and the
    marker); (-1, {}) when there is none. The marker's step when every arm's checkpoint there is intact;
    else, with a warning, the newest step at which every arm's is; CheckpointError naming the bad file
    when there is none."""
    root = Path(root)
    try:
        step = read_latest_marker(root / MARKER_FILE)
    except CheckpointError as err:
        logger.warning("--resume: %s; looking for the newest intact checkpoint", err)
        step = -2  # corrupted: fall back below
    if step is None:
        logger.warning("--resume: no checkpoint in %s, starting again from step 0 (baseline cache kept)", root)
        return -1, {}
    steps = sorted(set.intersection(*[{step_of(p) for p in list_checkpoints(root / arm)} for arm in arms]),
                   reverse=True)
    candidates = ([step] if step >= 0 else []) + [s for s in steps if step < 0 or s < step]

    def paths_at(candidate: int) -> dict[str, Path]:
        return {arm: root / arm / checkpoint_name(candidate) for arm in arms}

    def verify(candidate: int) -> None:
        for path in paths_at(candidate).values():
            if not path.exists():
                raise CheckpointError(f"{path} is missing (the run had arms {arms}?)")
            verify_checkpoint(path)

    found, first_error = newest_intact(
        candidates, verify, lambda candidate, err: logger.warning("--resume: skipping step %d: %s", candidate, err))
    if found is None:
        raise CheckpointError(f"--resume: no intact checkpoint in {root}: {first_error}")
    if first_error is not None or step < 0:
        logger.warning("--resume: falling back to step %d, the newest intact checkpoint of every arm", found)
    return found, paths_at(found)
