"""Collapse monitors in an online run: every metrics row, every evaluation record, summary.json and the
printed summary carry them, and they equal an independent computation from the saved replies."""
import contextlib
import io
import json

import pytest

import eval_online_sdpo
from auxiliary.evals.collapse import distinct_n, policy_monitors, text_monitors
from auxiliary.evals.evaluation_helpers import prompt_as_messages
from auxiliary.feedback.style_checks import degeneracy
from reliability_helpers import flags_from_values

TRAIN = [f"Tell me something about topic number {i}." for i in range(4)]
EVAL = [f"Explain idea {i} in simple terms." for i in range(4)]


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("monitor_run")
    (folder / "train.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in TRAIN))
    (folder / "val.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in EVAL))
    out = folder / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = eval_online_sdpo.main(flags_from_values({
            "model": tiny_model_dir, "train_jsonl": folder / "train.jsonl", "val_jsonl": folder / "val.jsonl",
            "style": "concise", "eval_styles": "no_emojis", "train_n": 4, "eval_n": 4, "eval_every": 2,
            "max_new_tokens": 10, "eval_max_new_tokens": 10, "lr": 1e-3, "loss_mode": "simple_signal",
            "output_dir": out, "seed": 3, "placebo": True}))
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    history = json.loads((out / "eval_history.json").read_text())
    completions = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    return out, rows, history, completions, json.loads((out / "summary.json").read_text()), printed.getvalue()


def test_every_metrics_row_carries_the_reply_monitors(run):
    _, rows, _, completions, _, _ = run
    train = {(c["step"], c["arm"]): c["completion"] for c in completions if c["phase"] == "train"}
    for row in rows:
        for arm in ("feedback", "placebo"):
            text = train[(row["step"], arm)]
            assert row[arm]["reply_degenerate"] == bool(degeneracy(text))
            assert row[arm]["reply_distinct_2"] == pytest.approx(distinct_n([text]), abs=1e-4)
            assert row[arm]["reply_entropy"] is None or row[arm]["reply_entropy"] > 0


def test_every_eval_record_carries_the_monitors_recomputed_from_the_replies(run, tiny_model_dir):
    from auxiliary.runtime.model_loading import load_model_and_tokenizer

    _, _, history, completions, _, _ = run
    baseline = [c for c in completions if c["phase"] == "eval" and c["step"] == 0 and c["arm"] == "feedback"]
    baseline = sorted(baseline, key=lambda c: c["index"])
    prompts, baseline = [c["prompt"] for c in baseline], [c["completion"] for c in baseline]
    for record in history:
        texts = [c["completion"] for c in sorted((c for c in completions if c["phase"] == "eval" and
                                                  c["step"] == record["step"] and c["arm"] == record["arm"]),
                                                 key=lambda c: c["index"])]
        expected = text_monitors(texts)
        monitors = record["monitors"]
        assert monitors["degenerate_replies"] == expected["degenerate_replies"]
        assert monitors["distinct_2"] == pytest.approx(expected["distinct_2"])
        assert set(monitors) >= {"entropy", "logprob", "entropy_ratio", "logprob_drift", "warnings"}
    # step 0: the initial model itself, loaded here, scores the baseline's replies
    model, tokenizer, _ = load_model_and_tokenizer(str(tiny_model_dir), "fp32", "auto", "cpu")
    direct = policy_monitors(model, tokenizer, [prompt_as_messages(p) for p in prompts], baseline)
    start = next(r["monitors"] for r in history if r["step"] == 0)
    assert start["entropy"] == pytest.approx(direct["entropy"], rel=1e-5)
    assert start["logprob"] == pytest.approx(direct["logprob"], rel=1e-5)
    assert start["entropy_ratio"] == pytest.approx(1.0) and start["logprob_drift"] == pytest.approx(0.0)
    later = next(r["monitors"] for r in history if r["step"] == 4 and r["arm"] == "feedback")
    assert later["logprob_drift"] == pytest.approx(later["logprob"] - start["logprob"])


def test_summary_counts_degenerate_replies_per_style_and_prints_them(run):
    _, _, _, completions, summary, printed = run
    final = {arm: [c["completion"] for c in sorted((c for c in completions if c["phase"] == "eval" and c["step"] == 4
                                                    and c["arm"] == arm), key=lambda c: c["index"])]
             for arm in ("feedback", "placebo")}
    baseline = [c["completion"] for c in sorted((c for c in completions if c["phase"] == "eval" and c["step"] == 0
                                                 and c["arm"] == "feedback"), key=lambda c: c["index"])]
    expected = {"n": 4, "baseline": text_monitors(baseline)["degenerate_replies"],
                "feedback": text_monitors(final["feedback"])["degenerate_replies"],
                "placebo": text_monitors(final["placebo"])["degenerate_replies"]}
    assert summary["degenerate_replies"] == {"concise": expected, "no_emojis": expected}
    assert "degenerate replies at step 4 (concise; a repeated phrase" in printed
    assert "collapse monitors, feedback: distinct-2" in printed and "collapse monitors, placebo" in printed
