"""Record docs/example_run/: the finished online run that docs/reading_a_run.md explains.

    python docs/record_example_run.py --from RUN_DIR [--repo CHECKOUT]  # copy a finished run (`make demo`'s)
    python docs/record_example_run.py                  # or record a small one: 26 min on the shared 2-core machine

The shipped example is `make demo`'s own run (configs/demo.yaml, seed 1234), copied with `--from`. Without
`--from` it records a small run instead: SmolLM2-135M-Instruct, the concise rule user and judge, a placebo arm,
6 interactions, 6 held-out prompts judged at steps 0, 3 and 6, replies cut at 48 tokens (too few to learn).
What the run wrote is copied into docs/example_run/ (replacing the earlier copy), without checkpoints, the lock
and bench/demo_search.py's record, so the folder stays small (about 350 KB for a demo run). The absolute paths
inside (run.log, config.json, summary.json) are written as placeholders: <run>/ for the run folder, <repo>/
for this checkout and <cache>/ for the model cache, so the shipped files name no machine's folders.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "docs" / "example_run"
ARGS = ["--model", "smollm2-135m-instruct", "--device", "cpu",
        "--train_jsonl", "data/samples/train.jsonl", "--val_jsonl", "data/samples/validation.jsonl",
        "--style", "concise", "--user_simulator", "rule", "--judge", "rule", "--placebo",
        "--train_n", "6", "--eval_n", "6", "--eval_every", "3", "--max_new_tokens", "48",
        "--eval_max_new_tokens", "48", "--seed", "1234"]
SKIPPED = {"checkpoints", ".lock", "wandb", "search_run.json"}  # .sdpo_run.json, the run marker, is kept
TEXT_SUFFIXES = {".json", ".jsonl", ".log"}


def placeholder_paths(text: str, run_dir: Path, repo: Path = ROOT) -> str:
    """`text` with the run folder, the repository and the model cache written as <run>, <repo>, <cache>."""
    from auxiliary.runtime.model_loading import default_cache_dir

    folders = {str(run_dir): "<run>", str(repo): "<repo>", str(default_cache_dir()): "<cache>"}
    for folder in sorted(folders, key=len, reverse=True):  # the longest first: one may hold another
        text = text.replace(folder, folders[folder])
    return text


def copy_run(run_dir: Path, repo: Path = ROOT) -> None:
    """Replace docs/example_run/ with the files of the finished run in `run_dir`, paths as placeholders."""
    if not (run_dir / "summary.json").is_file():
        raise SystemExit(f"error: {run_dir}: no summary.json, not a finished online run")
    if TARGET.exists():
        shutil.rmtree(TARGET)
    TARGET.mkdir(parents=True)
    for path in sorted(run_dir.iterdir()):
        if path.name in SKIPPED or not path.is_file():
            continue
        if path.suffix in TEXT_SUFFIXES:
            (TARGET / path.name).write_text(placeholder_paths(path.read_text(), run_dir, repo))
        else:
            shutil.copy2(path, TARGET / path.name)
    print(f"wrote {TARGET}: {', '.join(sorted(p.name for p in TARGET.iterdir()))}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Either way docs/example_run/ is replaced: the shipped run is gone "
                                            "(git checkout docs/example_run brings it back).")
    parser.add_argument("--from", dest="run_dir", type=Path, help="a finished run folder to copy instead of recording")
    parser.add_argument("--repo", type=Path, default=ROOT,
                        help="the checkout the copied run ran in, written as <repo> (default: this one)")
    args = parser.parse_args(argv)
    if args.run_dir is not None:
        copy_run(args.run_dir.resolve(), args.repo.resolve())
        return 0
    import eval_online_sdpo

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "example_run"
        code = eval_online_sdpo.main(ARGS + ["--output_dir", str(out)])
        if code != 0:
            return code
        copy_run(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
