"""docs/reading_a_run.md: the shipped example run holds every file and summary field the page names, and
W&B receives what the page says (a stand-in for the wandb module records each call of an online run)."""
import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import pytest

import eval_online_sdpo

REPO = Path(__file__).resolve().parent.parent
PAGE = (REPO / "docs" / "reading_a_run.md").read_text()
EXAMPLE = REPO / "docs" / "example_run"


def online_section() -> str:
    return PAGE.split("## An online run")[1].split("## An offline run")[0]


def test_the_example_run_holds_every_file_the_page_names():
    table = online_section().split("Every field of every file")[0]
    files = re.findall(r"^\| `([\w.]+)` \|", table, flags=re.M)
    assert "summary.json" in files and len(files) >= 7
    assert [f for f in files if not (EXAMPLE / f).is_file()] == []
    assert sum(p.stat().st_size for p in EXAMPLE.iterdir()) < 500_000  # small in bytes


def test_the_shipped_example_names_no_machines_folders():
    texts = {p.name: p.read_text() for p in EXAMPLE.iterdir() if p.suffix in {".json", ".jsonl", ".log"}}
    assert {"summary.json", "config.json", "run.log", ".sdpo_run.json"} <= set(texts)
    assert [name for name, text in texts.items() if "/tmp/" in text or "/work/" in text] == []
    summary = json.loads(texts["summary.json"])
    assert summary["output_dir"] == "<run>" and summary["winrate_png"] == "<run>/winrate.png"


def test_the_recorder_writes_run_repo_and_cache_as_placeholders(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("record_example_run", REPO / "docs" / "record_example_run.py")
    recorder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recorder)
    monkeypatch.setenv("CACHE_DIR", str(tmp_path / "cache"))
    run_dir = tmp_path / "example_run"
    text = (f"output dir: {run_dir}\nfrom {REPO}/data/samples/train.jsonl\n"
            f'"model_path": "{tmp_path}/cache/smollm2-135m-instruct", "png": "{run_dir}/winrate.png"')
    assert recorder.placeholder_paths(text, run_dir) == (
        'output dir: <run>\nfrom <repo>/data/samples/train.jsonl\n'
        '"model_path": "<cache>/smollm2-135m-instruct", "png": "<run>/winrate.png"')


def test_the_recorder_copies_a_finished_run_without_checkpoints_or_the_search_record(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("record_example_run", REPO / "docs" / "record_example_run.py")
    recorder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recorder)
    monkeypatch.setattr(recorder, "TARGET", tmp_path / "example_run")
    run_dir = tmp_path / "demo"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"output_dir": str(run_dir)}))
    (run_dir / "winrate.png").write_bytes(b"\x89PNG")
    (run_dir / "search_run.json").write_text("{}")
    (run_dir / ".lock").write_text("")
    assert recorder.main(["--from", str(run_dir)]) == 0
    assert sorted(p.name for p in (tmp_path / "example_run").iterdir()) == ["summary.json", "winrate.png"]
    assert json.loads((tmp_path / "example_run" / "summary.json").read_text()) == {"output_dir": "<run>"}
    with pytest.raises(SystemExit, match="no summary.json"):
        recorder.main(["--from", str(tmp_path / "example_run" / "nothing")])


def test_the_summary_fields_the_page_names_are_in_the_example():
    summary = json.loads((EXAMPLE / "summary.json").read_text())
    (style, headline), = summary["headline"].items()
    for key in ("head_to_head", "paired_rule_score", "win_rate_vs_baseline", "net_effect", "degenerate_replies"):
        assert f"`{key}`" in online_section() and key in headline, key
    assert {"diff", "se"} <= set(headline["net_effect"])
    for key in ("final", "head_to_head_feedback_vs_placebo", "paired_style_score_feedback_minus_placebo",
                "collapse_monitors", "baseline_mean_words", "final_step", "winrate_png", "output_dir"):
        assert f"`{key}" in online_section() and key in summary, key
    assert set(summary["final"][style]) >= {"feedback", "placebo", "net_effect"}
    record = json.loads((EXAMPLE / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("followup", "style_problems", "loss", "grad_norm", "reply_distinct_2", "reply_entropy"):
        assert key in record["feedback"], key


class FakeRun:
    def __init__(self, config):
        self.config, self.logged, self.summary = config, [], {}

    def log(self, values):
        self.logged.append(values)

    def finish(self):
        self.finished = True


def test_wandb_receives_what_the_page_says(tiny_model_dir, tmp_path, monkeypatch):
    runs = []

    def init(**kwargs):
        runs.append(FakeRun(kwargs["config"]))
        return runs[-1]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, Image=lambda path: ("image", path)))
    out = tmp_path / "run"
    argv = ["--model", str(tiny_model_dir), "--train_jsonl", str(REPO / "data/samples/train.jsonl"),
            "--val_jsonl", str(REPO / "data/samples/validation.jsonl"), "--style", "concise", "--placebo",
            "--train_n", "2", "--eval_n", "2", "--eval_every", "0", "--max_new_tokens", "8",
            "--eval_max_new_tokens", "8", "--output_dir", str(out), "--wandb"]
    assert eval_online_sdpo.main(argv) == 0
    (run,) = runs
    assert run.config == json.loads((out / "config.json").read_text())
    keys = set().union(*run.logged)
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    numbers = {k for k, v in metrics["feedback"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert {f"feedback/{k}" for k in numbers} | {f"placebo/{k}" for k in numbers} <= keys
    # win_rate and se are logged when defined: the tiny model ties every pair
    assert {"interaction", "winrate_plot", "eval/concise/feedback/wins", "eval/concise/placebo/coverage"} <= keys
    assert {"final", "head_to_head"} <= set(run.summary) and run.finished
    for name in ("feedback/loss", "eval/<style>/<arm>/<stat>", "winrate_plot", "`interaction`"):
        assert name in PAGE, name
