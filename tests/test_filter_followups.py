"""auxiliary/filter_followups.py on a tiny model: its scores equal the mean |log p(y|x,o) - log p(y|x)| computed
here by plain forwards, batching changes none of them, --min_signal drops exactly the records below it (in order,
unchanged), skips are counted, and bad input stops the run (exit 2) with nothing written."""
import json
from pathlib import Path

import pytest
import torch

from auxiliary.filter_followups import main, summary_path

REPO = Path(__file__).resolve().parent.parent
FOLLOWUPS = REPO / "tests" / "fixtures" / "offline" / "followups.jsonl"
INTERACTIONS = REPO / "tests" / "fixtures" / "offline" / "interactions.jsonl"  # 2 records the trainer skips


@torch.no_grad()
def independent_scores(model_dir, path) -> list[float]:
    """Per record: x and x+hindsight rendered with the chat template, y + EOS, one unpadded forward each."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offline_sdpo.offline_sdpo_trainer import load_interactions
    from sdpo_objective import DEFAULT_HINDSIGHT_TEMPLATE, hindsight_messages, render_context_ids

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    records, _ = load_interactions(path)

    def reply_logp(context, reply):
        ids = torch.tensor([context + reply])
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
        return logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]][len(context) - 1:]

    scores = []
    for r in records:
        reply = tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        x = render_context_ids(tokenizer, r["prompt"])
        xo = render_context_ids(tokenizer,
                                hindsight_messages(r["prompt"], r["user_response"], DEFAULT_HINDSIGHT_TEMPLATE))
        scores.append(float((reply_logp(xo, reply) - reply_logp(x, reply)).abs().mean()))
    return scores


def run(tmp_path, model_dir, *extra, source=FOLLOWUPS, name="kept"):
    out = tmp_path / f"{name}.jsonl"
    code = main(["--input_jsonl", str(source), "--output_jsonl", str(out), "--base_model", str(model_dir),
                 "--scores_jsonl", str(tmp_path / f"{name}_scores.jsonl"), *extra])
    return code, out


def read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_scores_equal_an_independent_computation_and_batching_changes_none(tiny_model_dir, tmp_path):
    expected = independent_scores(tiny_model_dir, FOLLOWUPS)
    for batch_size in ("1", "4"):
        code, _ = run(tmp_path, tiny_model_dir, "--batch_size", batch_size, name=f"b{batch_size}")
        assert code == 0
        scores = [s["signal_abs_mean"] for s in read(tmp_path / f"b{batch_size}_scores.jsonl")]
        assert scores == pytest.approx(expected, rel=1e-5)
    assert read(tmp_path / "b1.jsonl") == read(FOLLOWUPS)  # --min_signal 0 keeps everything, unchanged


def test_min_signal_drops_exactly_the_records_below_it(tiny_model_dir, tmp_path):
    expected = independent_scores(tiny_model_dir, FOLLOWUPS)
    ordered = sorted(expected)
    assert ordered[4] - ordered[3] > 1e-4  # a clear gap to put the threshold in
    threshold = (ordered[3] + ordered[4]) / 2  # 4 records below, 6 above
    code, out = run(tmp_path, tiny_model_dir, "--min_signal", repr(threshold))
    assert code == 0
    originals = read(FOLLOWUPS)
    assert read(out) == [r for r, s in zip(originals, expected) if s >= threshold]  # input order kept
    summary = json.loads(summary_path(str(out)).read_text())
    assert (summary["read"], summary["scored"], summary["dropped_low_signal"], summary["kept"]) == (10, 10, 4, 6)


def test_records_the_trainer_skips_are_dropped_and_counted(tiny_model_dir, tmp_path):
    code, out = run(tmp_path, tiny_model_dir, source=INTERACTIONS)
    assert code == 0
    summary = json.loads(summary_path(str(out)).read_text())
    assert summary["skipped"] == {"empty completion": 1, "empty user_response": 1}
    assert (summary["read"], summary["scored"], summary["kept"]) == (10, 8, 8) and len(read(out)) == 8


def test_bad_input_exits_2_naming_file_and_line_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    record = json.loads(FOLLOWUPS.read_text().splitlines()[0])
    record["user_response"] = 7
    bad.write_text(FOLLOWUPS.read_text().splitlines()[1] + "\n" + json.dumps(record) + "\n")
    code, out = run(tmp_path, tiny_model_dir, source=bad)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error:") and "bad.jsonl:2" in err[-1] and "user_response" in err[-1]
    assert not out.exists() and not summary_path(str(out)).exists()
    code, _ = run(tmp_path, tiny_model_dir, "--min_signal", "-1")
    assert code == 2 and "--min_signal must be >= 0" in capsys.readouterr().err
