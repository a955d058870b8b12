"""Signal analysis end to end on a tiny model: files, JSON contract, figure sizes, and the signals
recomputed independently (plain forward pass on concatenated ids, no sdpo_objective code)."""
import json

import numpy as np
import pytest
import torch

from auxiliary.evals import signal_plots
from auxiliary.runtime.generation import GeneratedResponse
from auxiliary.runtime.io_utils import DataError
from auxiliary.sdpo_signal_analysis import (SignalAnalysisArgs, load_cases, main, sample_replies, summarize,
                                            token_plot_indices)

CASES = [
    {"id": "formal", "tag": "constrain", "prompt": "Write a short email to my manager.",
     "followup": "Use a formal tone.", "unrelated_followup": "What is 27 times 4?"},
    {"id": "with_system", "tag": "reinforce", "system": "You are terse.",
     "prompt": "Give me three tips for better sleep.",
     "followup": "Thanks, that was helpful!", "unrelated_followup": "What is 27 times 4?"},
    {"id": "two_turns", "tag": "constrain",
     "messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi, how are you today?"},
                  {"from": "human", "value": "Explain how photosynthesis works."}],
     "followup": "Too long, be concise.", "unrelated_followup": "No emojis please."},
]
EXPECTED_KEYS = {"id", "tag", "messages", "completion_ids", "tokens", "followup", "unrelated_followup",
                 "sig_follow", "sig_unrel"}


@pytest.fixture(scope="module")
def analysis(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("signals")
    cases_path = folder / "cases.json"
    cases_path.write_text(json.dumps(CASES))
    out = folder / "out"
    code = main(["--model", tiny_model_dir, "--cases_json", str(cases_path), "--n_cases", "3", "--output_dir", str(out),
                 "--seed", "7", "--max_new_tokens", "12", "--min_tokens", "5", "--max_tries", "2",
                 "--temperature", "1.0", "--dtype", "fp32", "--device", "cpu", "--token_plot_cases", "0,2"])
    assert code == 0
    return out, json.loads((out / "sdpo_signals.json").read_text())


def test_json_contract(analysis):
    _, data = analysis
    meta, cases = data["meta"], data["cases"]
    assert meta["seed"] == 7 and meta["generation"]["max_new_tokens"] == 12
    assert "{followup}" in meta["template"] and "=== HINDSIGHT CONTEXT ===" in meta["template"]
    assert [c["id"] for c in cases] == ["formal", "with_system", "two_turns"]
    for case in cases:
        assert set(case) == EXPECTED_KEYS
        n = len(case["completion_ids"])
        assert 1 <= n <= 12
        assert len(case["tokens"]) == len(case["sig_follow"]) == len(case["sig_unrel"]) == n
        assert all(isinstance(t, int) for t in case["completion_ids"])
        assert all(np.isfinite(case["sig_follow"])) and all(np.isfinite(case["sig_unrel"]))
        assert case["sig_follow"] != case["sig_unrel"]
    assert cases[1]["messages"][0] == {"role": "system", "content": "You are terse."}
    assert cases[2]["messages"][-1] == {"role": "user", "content": "Explain how photosynthesis works."}


def test_signals_match_independent_recomputation(analysis):
    """log p(y_t | xo, y<t) - log p(y_t | x, y<t) from one plain forward pass per context, fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, data = analysis
    meta = data["meta"]
    tokenizer = AutoTokenizer.from_pretrained(meta["model_path"])
    model = AutoModelForCausalLM.from_pretrained(meta["model_path"], dtype=torch.float32).eval()

    def logprobs(messages, reply):
        # SPEC: thinking off (the tiny template, like Qwen3's, knows the switch; others ignore it)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)
        context = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context + reply])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        positions = torch.arange(len(context) - 1, len(context) + len(reply) - 1)
        return logp[positions, torch.tensor(reply)]

    for case in data["cases"]:
        reply = case["completion_ids"]
        base = logprobs(case["messages"], reply)
        for key, followup in (("sig_follow", case["followup"]), ("sig_unrel", case["unrelated_followup"])):
            hindsight = [dict(m) for m in case["messages"]]
            hindsight[-1]["content"] += meta["template"].format(followup=followup)
            expected = logprobs(hindsight, reply) - base
            np.testing.assert_allclose(case[key], expected.numpy(), atol=1e-4)


def test_tokens_decode_their_ids(analysis, tiny_tokenizer):
    _, data = analysis
    for case in data["cases"]:
        assert case["tokens"] == [tiny_tokenizer.decode([t]) for t in case["completion_ids"]]


def test_summary_is_token_weighted_mean(analysis):
    _, data = analysis
    cases, summary = data["cases"], data["meta"]["summary"]
    all_unrel = np.abs(np.concatenate([c["sig_unrel"] for c in cases]))
    constrain_follow = np.abs(np.concatenate([c["sig_follow"] for c in cases if c["tag"] == "constrain"]))
    assert summary["all"]["mean_abs_unrelated"] == pytest.approx(all_unrel.mean())
    assert summary["constrain"]["mean_abs_followup"] == pytest.approx(constrain_follow.mean())
    assert summary["reinforce"]["n_cases"] == 1 and summary["all"]["n_tokens"] == all_unrel.size


def test_figures_are_images_of_expected_size(analysis):
    import matplotlib.image as mpimg

    out, data = analysis
    n = len(data["cases"])
    expected = {"unrelated.png": signal_plots.heatmap_size(n), "followup.png": signal_plots.heatmap_size(n),
                "stacked.png": signal_plots.heatmap_size(2 * n), "side_by_side.png": signal_plots.side_by_side_size(n)}
    assert expected["unrelated.png"] == (14.0, pytest.approx(1.6 + 0.3 * 3))
    for name, (width, height) in expected.items():
        image = mpimg.imread(out / name)
        assert image.shape[:2] == (round(height * signal_plots.DPI), round(width * signal_plots.DPI)), name
        assert image[..., :3].std() > 0.05  # not a blank canvas
    assert sorted(p.name for p in out.glob("case*_tokens.png")) == ["case0_tokens.png", "case2_tokens.png"]
    tokens = data["cases"][0]["tokens"]
    n_lines = signal_plots.layout_tokens(tokens)[-1][0] + 1
    width, height = signal_plots.token_view_size(n_lines)
    image = mpimg.imread(out / "case0_tokens.png")
    assert image.shape[:2] == (round(height * signal_plots.DPI), round(width * signal_plots.DPI))


def test_layout_wraps_lines_and_newlines():
    cells = signal_plots.layout_tokens(["ab", "c\n", "d" * 5, "e" * 4], chars_per_line=8)
    assert cells == [(0, 0, "ab"), (0, 2, "c\u21b5"), (1, 0, "ddddd"), (2, 0, "eeee")]


def test_resampling_keeps_longest_and_counts_tries(monkeypatch):
    """Round 1: case 0 long enough, case 1 short; round 2 only re-asks case 1, which stays short but longer."""
    calls = []
    lengths = iter([[6, 2], [3]])

    def fake_generate(model, tokenizer, conversations, **kwargs):
        calls.append((len(conversations), kwargs["seed"]))
        return [GeneratedResponse(text="x", ids=[1] * n, finished=True) for n in next(lengths)]

    monkeypatch.setattr("auxiliary.runtime.generation.generate_responses", fake_generate)
    args = SignalAnalysisArgs(min_tokens=5, max_tries=2, seed=10)
    best, tries = sample_replies(None, None, [[{}], [{}]], args)
    assert [len(r.ids) for r in best] == [6, 3] and tries == [1, 2]
    assert calls == [(2, 10), (1, 1010)]


def test_bad_cases_name_the_field(tmp_path):
    path = tmp_path / "cases.json"
    path.write_text(json.dumps([{"id": "a", "tag": "reinforce", "prompt": "hi", "followup": " "}]))
    with pytest.raises(DataError, match=r"case 0 \(id 'a'\): field 'followup'"):
        load_cases(path)
    path.write_text(json.dumps([{**CASES[0], "tag": "praise"}]))
    with pytest.raises(DataError, match="field 'tag' must be one of reinforce, constrain"):
        load_cases(path)
    assert main(["--model", "tiny-random", "--cases_json", str(tmp_path / "missing.json")]) == 2


def test_bundled_cases_file():
    cases = load_cases("auxiliary/signal_analysis_cases.json", n_cases=0)
    assert len(cases) >= 14
    assert {c["tag"] for c in cases} == {"reinforce", "constrain"}
    assert len(load_cases("auxiliary/signal_analysis_cases.json", n_cases=5)) == 5


def test_token_plot_spec():
    assert token_plot_indices("all", 3) == [0, 1, 2]
    assert token_plot_indices("none", 3) == []
    with pytest.raises(ValueError, match="out of range"):
        token_plot_indices("0,5", 3)


def test_summarize_hand_computed():
    cases = [{"tag": "reinforce", "sig_unrel": [0.1, -0.1], "sig_follow": [1.0, -3.0]},
             {"tag": "constrain", "sig_unrel": [0.4], "sig_follow": [-2.0]}]
    summary = summarize(cases)
    assert summary["all"]["mean_abs_unrelated"] == pytest.approx(0.2)
    assert summary["all"]["mean_abs_followup"] == pytest.approx(2.0)
    assert summary["all"]["ratio_abs_followup_to_unrelated"] == pytest.approx(10.0)
    assert summary["reinforce"]["mean_followup"] == pytest.approx(-1.0)
    assert summary["all"]["mean_abs_difference"] == pytest.approx((0.9 + 2.9 + 2.4) / 3)
    # case 1: corr([1, -3], [0.1, -0.1]) = 1; case 2 has one token (undefined) -> mean over case 1 only
    assert summary["all"]["mean_case_correlation"] == pytest.approx(1.0)


def test_replot_from_json_needs_no_model(analysis, tmp_path):
    out, _ = analysis
    assert main(["--from_json", str(out / "sdpo_signals.json"), "--output_dir", str(tmp_path),
                 "--model", "/no/such/model", "--token_plot_cases", "1"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "case1_tokens.png", "followup.png", "side_by_side.png", "stacked.png", "unrelated.png"]
