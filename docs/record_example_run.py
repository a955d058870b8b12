"""Record docs/example_run/: the small finished online run that docs/reading_a_run.md explains.

    python docs/record_example_run.py          # 26 min on the shared 2-core machine (load average 15-20)

The run: SmolLM2-135M-Instruct (the demo's model), a rule-based user who wants concise replies and its
rule-based judge, a placebo arm, 6 interactions, 6 held-out prompts judged at steps 0, 3 and 6, replies cut
at 48 tokens. It runs in a temporary folder; what a run writes is then copied into docs/example_run/
(replacing the earlier copy), without checkpoints and without the lock, so the folder stays small (about
100 KB). The absolute paths inside (run.log, config.json, summary.json) are written as placeholders:
<run>/ for the temporary run folder, <repo>/ for this checkout and <cache>/ for the model cache, so the
shipped files name no machine's folders.
"""
from __future__ import annotations

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
SKIPPED = {"checkpoints", ".lock", "wandb"}  # .sdpo_run.json, the run marker, is kept
TEXT_SUFFIXES = {".json", ".jsonl", ".log"}


def placeholder_paths(text: str, run_dir: Path) -> str:
    """`text` with the run folder, the repository and the model cache written as <run>, <repo>, <cache>."""
    from auxiliary.runtime.model_loading import default_cache_dir

    folders = {str(run_dir): "<run>", str(ROOT): "<repo>", str(default_cache_dir()): "<cache>"}
    for folder in sorted(folders, key=len, reverse=True):  # the longest first: one may hold another
        text = text.replace(folder, folders[folder])
    return text


def main() -> int:
    import eval_online_sdpo

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "example_run"
        code = eval_online_sdpo.main(ARGS + ["--output_dir", str(out)])
        if code != 0:
            return code
        if TARGET.exists():
            shutil.rmtree(TARGET)
        TARGET.mkdir(parents=True)
        for path in sorted(out.iterdir()):
            if path.name in SKIPPED or not path.is_file():
                continue
            if path.suffix in TEXT_SUFFIXES:
                (TARGET / path.name).write_text(placeholder_paths(path.read_text(), out))
            else:
                shutil.copy2(path, TARGET / path.name)
    print(f"wrote {TARGET}: {', '.join(sorted(p.name for p in TARGET.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
