"""auxiliary/eval_benchmarks.py: both harnesses really run (lm_eval on local IFEval prompts,
alpaca_eval with the weighted annotator's logprob path sent to a local OpenAI-format stub)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "benchmarks"
HAVE_HARNESSES = all(importlib.util.find_spec(name) for name in ("lm_eval", "alpaca_eval", "langdetect"))
needs_harnesses = pytest.mark.skipif(not HAVE_HARNESSES, reason="lm_eval[ifeval] / alpaca_eval not installed "
                                     "(pip install 'lm-eval[ifeval]==0.4.13' 'alpaca-eval==0.6.6')")


class JudgeStub(BaseHTTPRequestHandler):
    """OpenAI chat-completions stub: one token with top logprobs for 'm' and 'M', as the weighted
    AlpacaEval annotator requests; P('m') depends on the prompt so the preferences differ."""
    requests_seen: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        JudgeStub.requests_seen.append(body)
        text = json.dumps(body["messages"])
        p_first = 0.2 + 0.6 * (sum(map(ord, text)) % 7) / 6
        top = [{"token": "m", "bytes": [109], "logprob": math.log(p_first)},
               {"token": "M", "bytes": [77], "logprob": math.log(1 - p_first)}]
        reply = {"id": "stub", "object": "chat.completion", "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": "m"},
                              "logprobs": {"content": [dict(top[0], top_logprobs=top)]}}],
                 "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def judge_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), JudgeStub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def offline_lc_cache(root: Path, n_instructions: int) -> Path:
    """The length-controlled GLM reads df_gamed.csv (instruction difficulty + two gamed baselines)
    from the hub; offline it comes from the HF cache, laid out here as hf_hub_download expects."""
    commit = "0" * 40
    repo = root / "datasets--tatsu-lab--alpaca_eval"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    rows = ["model,index,preference,std_delta_len,instruction_difficulty,not_gamed_baseline"]
    # One baseline's rows first, in instruction order: alpaca_eval reads the difficulty of
    # instruction i from row i (as in the hub file).
    for model, preference, delta_len in (("gamed_concise", 0.2, -1.0), ("gamed_verbose", 0.8, 1.0)):
        rows += [f"{model},{index},{preference},{delta_len},{0.1 * index},False" for index in range(n_instructions)]
    (snapshot / "df_gamed.csv").write_text("\n".join(rows) + "\n")
    return root


def run_tool(args: list[str], env_extra: dict) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OPENAI_API_KEY="stub-key", **env_extra)
    return subprocess.run([sys.executable, str(REPO / "auxiliary" / "eval_benchmarks.py")] + args, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def run_tool_in_process(args: list[str], monkeypatch, capsys, **env) -> subprocess.CompletedProcess:
    """eval_benchmarks.main(args) in this process, with run_tool's annotator key and `env`; its exit code and
    output as a CompletedProcess (the refusals and the dry run need no child process)."""
    from auxiliary import eval_benchmarks

    for name, value in {"OPENAI_API_KEY": "stub-key", **env}.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    code = eval_benchmarks.main(args)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from auxiliary.runtime.tiny_model import save_tiny_model

    root = tmp_path_factory.mktemp("models")
    return save_tiny_model(root / "base"), save_tiny_model(root / "step_000003" / "model", seed=1)


@needs_harnesses
def test_dry_run_prints_calls_and_writes_nothing(tmp_path, tiny_models, monkeypatch, capsys):
    pytest.importorskip("transformers")
    base, checkpoint = tiny_models
    out = tmp_path / "out"
    result = run_tool_in_process(
        ["--baseline_model", base, "--checkpoints", str(Path(checkpoint).parent), "--tasks", "ifeval,alpaca_eval",
                       "--ifeval_jsonl", str(FIXTURES / "ifeval.jsonl"), "--alpaca_eval_json",
                       str(FIXTURES / "alpaca_eval.json"),
                       "--limit", "2", "--output_dir", str(out), "--dry-run"], monkeypatch, capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lm_eval.simple_evaluate(" in result.stdout and "ifeval_local" in result.stdout
    assert result.stdout.count("alpaca_eval.evaluate(") == 2  # baseline and step_000003
    assert "weighted_alpaca_eval_gpt4_turbo" in result.stdout and "dataset_path: json" in result.stdout
    assert not out.exists()


def test_unknown_task_is_refused(tmp_path, monkeypatch, capsys):
    result = run_tool_in_process(
        ["--baseline_model", "x", "--tasks", "ifeval,gsm8k", "--output_dir", str(tmp_path), "--dry_run"], monkeypatch,
        capsys)
    assert result.returncode == 2 and "unknown --tasks gsm8k" in result.stderr


@needs_harnesses
@pytest.mark.slow
def test_base_and_checkpoint_through_both_harnesses(tmp_path, tiny_models, judge_url, monkeypatch, capsys):
    base, checkpoint = tiny_models
    out = tmp_path / "out"
    cache = offline_lc_cache(tmp_path / "hf_cache", n_instructions=2)
    args = ["--baseline_model", base, "--checkpoints", str(Path(checkpoint).parent), "--tasks", "ifeval,alpaca_eval",
            "--ifeval_jsonl", str(FIXTURES / "ifeval.jsonl"), "--alpaca_eval_json", str(FIXTURES / "alpaca_eval.json"),
            "--nltk_data", str(FIXTURES / "nltk_data"), "--alpaca_annotator_base_url", judge_url,
            "--limit", "2", "--max_new_tokens", "12", "--batch_size", "2", "--device", "cpu", "--output_dir", str(out)]
    JudgeStub.requests_seen.clear()
    result = run_tool(args, {"HF_HUB_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(JudgeStub.requests_seen) == 4  # 2 instructions x (baseline, checkpoint), the paper's annotator model
    assert {body["model"] for body in JudgeStub.requests_seen} == {"gpt-4-1106-preview"}

    report = json.loads((out / "benchmarks.json").read_text())
    assert [m["model"] for m in report["models"]] == ["baseline", "step_000003"]
    assert report["config"]["args"]["limit"] == 2
    from alpaca_eval import constants as alpaca_constants

    monkeypatch.setattr(alpaca_constants, "DEFAULT_CACHE_DIR", str(cache))  # the recomputation below reads df_gamed.csv
    for entry in report["models"]:
        label = entry["model"]
        # lm_eval: the number is the harness's, and it is the mean of its per-prompt verdicts.
        raw = json.loads((out / "lm_eval" / f"{label}.json").read_text())
        ifeval = entry["scores"]["ifeval"]
        assert ifeval["value"] == raw["results"]["ifeval_local"]["prompt_level_strict_acc,none"]
        assert ifeval["stderr"] == raw["results"]["ifeval_local"]["prompt_level_strict_acc_stderr,none"]
        verdicts = [s["prompt_level_strict_acc"] for s in raw["samples"]["ifeval_local"]]
        assert len(verdicts) == 2 and ifeval["n"] == 2
        assert ifeval["value"] == pytest.approx(sum(verdicts) / 2)
        # alpaca_eval: the leaderboard row it wrote, and the LC win rate recomputed from its annotations.
        import pandas as pd
        from alpaca_eval.metrics import get_length_controlled_winrate

        folder = out / "alpaca_eval" / label
        row = pd.read_csv(folder / "leaderboard.csv", index_col=0).loc[label]
        alpaca = entry["scores"]["alpaca_eval"]
        assert alpaca["value"] == pytest.approx(row["length_controlled_winrate"])
        assert alpaca["stderr"] == pytest.approx(row["lc_standard_error"])
        assert alpaca["win_rate"] == pytest.approx(row["win_rate"]) and alpaca["n"] == 2
        annotations = pd.read_json(folder / "annotations.json")
        assert len(annotations) == 2 and annotations["preference"].between(1, 2).all()
        again = get_length_controlled_winrate(annotations, save_weights_dir=None)
        assert alpaca["value"] == pytest.approx(again["length_controlled_winrate"])
        assert 0 < alpaca["value"] < 100
        line = next(l for l in result.stdout.splitlines() if l.startswith(label))
        assert f"{ifeval['value']:.4f}" in line and f"{alpaca['value']:.4f} ± {alpaca['stderr']:.4f}" in line

    # earlier results are kept unless --overwrite
    rerun = run_tool_in_process(args, monkeypatch, capsys, HF_HUB_CACHE=str(cache))
    assert rerun.returncode == 2 and "--overwrite" in rerun.stderr


@needs_harnesses
@pytest.mark.parametrize("base_url", [None, "http://127.0.0.1:9/v1"])
def test_a_missing_annotator_key_stops_the_run_before_any_answer_is_generated(base_url, tmp_path, monkeypatch,
                                                                              capsys):
    from auxiliary import eval_benchmarks
    from auxiliary.evals import benchmarks as bench

    for name in ("OPENAI_API_KEY", "OPENAI_API_KEYS", "OPENAI_CLIENT_CONFIG_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(bench, "build_lm", lambda *a, **k: pytest.fail("a model was loaded before the key check"))
    out = tmp_path / "out"
    argv = ["--baseline_model", str(tmp_path), "--tasks", "alpaca_eval", "--alpaca_eval_json",
            str(FIXTURES / "alpaca_eval.json"), "--output_dir", str(out)]
    code = eval_benchmarks.main(argv + (["--alpaca_annotator_base_url", base_url] if base_url else []))
    err = capsys.readouterr().err
    assert code == 2 and "OPENAI_API_KEY" in err and "Traceback" not in err, err
    assert ("any value" in err) if base_url else ("leave alpaca_eval out of --tasks" in err)
    assert not out.exists()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-set")
    assert bench.annotator_key_problem(bench.BenchmarkArgs(baseline_model="x", tasks=["alpaca_eval"])) is None
    assert bench.annotator_key_problem(bench.BenchmarkArgs(baseline_model="x", tasks=["ifeval"])) is None


@needs_harnesses
def test_missing_nltk_data_for_ifeval_is_one_line_before_any_model_loads(tmp_path, tiny_models, monkeypatch, capfd):
    import nltk

    from auxiliary import eval_benchmarks
    from auxiliary.evals import benchmarks as bench

    empty = tmp_path / "nltk_data"
    empty.mkdir()
    monkeypatch.setattr(nltk.data, "path", [])  # only --nltk_data is searched (set_nltk_data puts it in)
    monkeypatch.setenv("NLTK_DATA", str(empty))  # set_nltk_data sets it: restored after the test
    monkeypatch.setattr(bench, "build_lm", lambda *a, **k: pytest.fail("a model was loaded before the NLTK check"))
    downloads = []

    def failing_download(name, quiet=False, **kw):  # what nltk.download prints without network, then False
        downloads.append(name)
        print("[nltk_data] Error loading punkt_tab: <urlopen error no network>")
        print("[nltk_data] Error loading punkt_tab: <urlopen error no network>", file=sys.stderr)
        return False

    monkeypatch.setattr(nltk, "download", failing_download)
    out = tmp_path / "out"
    argv = ["--baseline_model", tiny_models[0], "--tasks", "ifeval", "--ifeval_jsonl", str(FIXTURES / "ifeval.jsonl"),
            "--nltk_data", str(empty), "--limit", "1", "--output_dir", str(out)]
    for offline, tried in (("1", []), ("0", ["punkt_tab"])):  # offline: not even tried; else lm_eval's try, quiet
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        downloads.clear()
        capfd.readouterr()
        code = eval_benchmarks.main(argv)
        captured = capfd.readouterr()
        printed = captured.out + captured.err
        assert code == 2 and "Traceback" not in printed, printed
        line = [text for text in captured.err.splitlines() if text.strip()][-1]
        assert line.startswith("error:") and "punkt_tab" in line and bench.NLTK_DOWNLOAD in line, printed
        assert f"--nltk_data {empty}" in line and "[nltk_data]" not in printed and downloads == tried, printed
        assert not out.exists()
    downloads.clear()
    assert eval_benchmarks.main(argv + ["--dry_run"]) == 0  # a dry run warns and downloads nothing
    assert "# warning: IFEval's scorer needs NLTK's punkt_tab" in capfd.readouterr().out and downloads == []
    bench.set_nltk_data(str(FIXTURES / "nltk_data"))  # the data there: no problem, nothing downloaded
    assert bench.ifeval_nltk_problem(bench.BenchmarkArgs(baseline_model="x", tasks=["ifeval"])) is None
    assert bench.ifeval_nltk_problem(bench.BenchmarkArgs(baseline_model="x", tasks=["alpaca_eval"])) is None
    assert downloads == []


@needs_harnesses
def test_lm_eval_records_this_repositorys_commit_without_git_noise(tmp_path, monkeypatch, capfd):
    import lm_eval
    import lm_eval.evaluator

    from auxiliary.evals import benchmarks as bench

    monkeypatch.chdir(tmp_path)  # not a git checkout: lm_eval's own lookup prints "fatal: not a git repository"
    seen = {}
    monkeypatch.setattr(lm_eval.evaluator, "get_git_commit_hash", lm_eval.evaluator.get_git_commit_hash)
    monkeypatch.setattr(lm_eval, "simple_evaluate",
                        lambda **kw: seen.setdefault("hash", lm_eval.evaluator.get_git_commit_hash()))
    bench.run_lm_eval(None, [], None, bench.BenchmarkArgs(baseline_model="x"))
    captured = capfd.readouterr()
    assert "fatal" not in captured.err + captured.out
    expected = subprocess.run(["git", "describe", "--always"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert seen["hash"] == (expected or None)


@needs_harnesses
def test_alpaca_eval_is_imported_without_the_pkg_resources_deprecation_warning(tmp_path):
    # A child process: pkg_resources warns once per process, on its first import by anyone.
    code = ("from auxiliary.evals import benchmarks as bench\n"
            "bench.annotator_key_problem(bench.BenchmarkArgs(baseline_model='x', tasks=['alpaca_eval']))\n"
            "import sys, warnings; assert 'alpaca_eval.utils' in sys.modules\n"
            "warnings.warn('a warning of ours')\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), OPENAI_API_KEY="unused")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pkg_resources" not in result.stderr + result.stdout
    assert "UserWarning: a warning of ours" in result.stderr  # only that notice is hidden


@needs_harnesses
@pytest.mark.parametrize("task", ["ifeval", "alpaca_eval"])
def test_a_benchmark_set_the_hub_cannot_give_is_one_line_not_a_write_error(task, tmp_path, tiny_models, monkeypatch,
                                                                          capsys):
    """Without network, IFEval from the hub ended in 'error: cannot write ?: Couldn't reach ...': the OSError of
    datasets read as a file that could not be written. Now it says what works offline."""
    base, _ = tiny_models
    out = tmp_path / "out"
    nltk = ["--nltk_data", str(FIXTURES / "nltk_data")] if task == "ifeval" else []  # else that is the line
    result = run_tool_in_process(["--baseline_model", base, "--tasks", task, "--limit", "1", "--output_dir", str(out)]
                                 + nltk, monkeypatch, capsys, HF_DATASETS_OFFLINE="1")
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2, result.stderr[-2000:]
    assert last.startswith("error: a benchmark's data could not be loaded from the Hugging Face hub") and \
        "--ifeval_jsonl and --alpaca_eval_json take local copies" in last, last
    assert "cannot write" not in result.stderr
