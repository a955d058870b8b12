"""Win-rate metrics against hand-computed values, the plot, prompt loading and the bundled prompts."""
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from auxiliary.evals.evaluation_helpers import (load_prompts, net_effect, plot_win_rates, prompt_as_messages,
                                          prompt_as_text, win_rate_stats)
from auxiliary.runtime.io_utils import DataError

REPO = Path(__file__).resolve().parents[1]


def test_win_rate_stats_hand_computed():
    stats = win_rate_stats(["A"] * 6 + ["B"] * 2 + ["C"] * 2)
    assert (stats["n"], stats["wins"], stats["losses"], stats["ties"]) == (10, 6, 2, 2)
    assert stats["coverage"] == pytest.approx(0.8)
    assert stats["win_rate"] == pytest.approx(75.0)  # 6 / (6 + 2), ties excluded
    assert stats["se"] == pytest.approx(100 * math.sqrt(0.75 * 0.25 / 8))  # 15.309
    assert stats["se"] == pytest.approx(15.3093, abs=1e-4)


def _bootstrap_by_index_resampling(decisions, n_bootstrap, seed):
    """Independent recomputation: resample the decision list itself, row by row."""
    rng = np.random.default_rng(seed)
    values = np.array(decisions)
    rates = []
    for _ in range(n_bootstrap):
        sample = values[rng.integers(0, len(values), len(values))]
        wins, losses = np.sum(sample == "A"), np.sum(sample == "B")
        if wins + losses:
            rates.append(100.0 * wins / (wins + losses))
    return float(np.std(rates, ddof=1))


def test_bootstrap_se_matches_index_resampling_and_is_seeded():
    decisions = ["A"] * 30 + ["B"] * 14 + ["C"] * 16
    stats = win_rate_stats(decisions, n_bootstrap=10000, seed=3)
    independent = _bootstrap_by_index_resampling(decisions, 4000, seed=11)
    assert stats["se_bootstrap_all"] == pytest.approx(independent, rel=0.06)
    # ties make the number of decisive pairs random, so the bootstrap SE is close to, not equal to, the analytic one
    assert stats["se_bootstrap_all"] == pytest.approx(stats["se"], rel=0.1)
    # the paper's SE resamples the 44 decisive pairs only: the binomial SE up to Monte-Carlo noise
    decisive_only = _bootstrap_by_index_resampling([d for d in decisions if d != "C"], 4000, seed=12)
    assert stats["se_bootstrap"] == pytest.approx(decisive_only, rel=0.06)
    assert stats["se_bootstrap"] == pytest.approx(100 * math.sqrt(30 / 44 * 14 / 44 / 44), rel=0.03)
    again = win_rate_stats(decisions, n_bootstrap=10000, seed=3)
    assert again["se_bootstrap"] == stats["se_bootstrap"]  # reproducible with the seed
    other = win_rate_stats(decisions, n_bootstrap=10000, seed=4)["se_bootstrap"]
    assert other != stats["se_bootstrap"] and other == pytest.approx(stats["se_bootstrap"], rel=0.05)


def test_win_rate_including_ties_and_effective_n_by_hand():
    stats = win_rate_stats(["A"] * 30 + ["B"] * 14 + ["C"] * 16, n_bootstrap=100)
    assert stats["n_effective"] == 44 and stats["n"] == 60
    assert stats["winrate_inc_ties"] == pytest.approx(100 * (30 + 8) / 60)  # 63.33
    assert stats["win_rate"] == pytest.approx(100 * 30 / 44)                # 68.18
    only_ties = win_rate_stats(["C"] * 4)
    assert only_ties["winrate_inc_ties"] == 50.0 and only_ties["n_effective"] == 0


def test_bootstrap_without_ties_equals_the_binomial_se():
    # resampling n decisions without ties: Var = p(1-p)/n exactly, so only Monte-Carlo noise (~0.7%) remains
    stats = win_rate_stats(["A"] * 70 + ["B"] * 30, n_bootstrap=10000, seed=0)
    assert stats["se"] == pytest.approx(100 * math.sqrt(0.7 * 0.3 / 100))  # 4.583
    assert stats["se_bootstrap"] == pytest.approx(stats["se"], rel=0.03)


def test_degenerate_cases():
    perfect = win_rate_stats(["A"] * 5)
    assert perfect["win_rate"] == 100.0 and perfect["se"] == 0.0 and perfect["se_bootstrap"] == 0.0
    assert perfect["se_bootstrap_all"] == 0.0 and perfect["winrate_inc_ties"] == 100.0
    ties = win_rate_stats(["C"] * 4)
    assert ties["coverage"] == 0.0 and ties["win_rate"] is None and ties["se"] is None and ties["se_bootstrap"] is None
    empty = win_rate_stats([])
    assert empty["n"] == 0 and empty["win_rate"] is None and empty["coverage"] == 0.0
    with pytest.raises(ValueError, match="'A', 'B' or 'C'"):
        win_rate_stats(["A", "win"])


def test_net_effect_adds_variances():
    effect = net_effect({"win_rate": 70.0, "se": 3.0}, {"win_rate": 55.0, "se": 4.0})
    assert effect["diff"] == pytest.approx(15.0) and effect["se"] == pytest.approx(5.0)
    assert net_effect({"win_rate": None, "se": None}, {"win_rate": 55.0, "se": 4.0}) == {"diff": None, "se": None}
    # computed from real stats: 75 (se 15.309) minus 50 (se 0.5/sqrt(6)*100 = 20.412)
    feedback = win_rate_stats(["A"] * 6 + ["B"] * 2)
    placebo = win_rate_stats(["A"] * 3 + ["B"] * 3)
    effect = net_effect(feedback, placebo)
    assert effect["diff"] == pytest.approx(25.0)
    assert effect["se"] == pytest.approx(math.sqrt(15.3093 ** 2 + 20.4124 ** 2), abs=1e-3)


def test_the_se_is_undefined_below_the_minimum_of_decisive_pairs():
    from auxiliary.evals.evaluation_helpers import MIN_DECISIVE_FOR_SE
    from auxiliary.evals.online_report import fmt_cell, fmt_diff, fmt_rate

    one_win = win_rate_stats(["A", "C", "C"])  # one prompt judged: a win and two ties
    assert one_win["win_rate"] == 100.0 and one_win["se"] is None and one_win["se_bootstrap"] is None
    assert fmt_rate(one_win) == f"100.0, SE undefined (1/3 decisive; {MIN_DECISIVE_FOR_SE} needed)"
    assert fmt_cell(one_win) == "100.0 (SE undefined)" and "+-" not in fmt_cell(one_win)
    enough = win_rate_stats(["A"] * (MIN_DECISIVE_FOR_SE - 1) + ["B"])
    p = (MIN_DECISIVE_FOR_SE - 1) / MIN_DECISIVE_FOR_SE
    assert enough["se"] == pytest.approx(100 * math.sqrt(p * (1 - p) / MIN_DECISIVE_FOR_SE))
    net = net_effect(enough, one_win)
    assert net["diff"] == pytest.approx(100 * p - 100) and net["se"] is None
    assert fmt_diff(net) == f"{100 * p - 100:+.1f} (SE undefined)"


def test_plot_win_rates_writes_a_png(tmp_path):
    records = []
    for step in (0, 5, 10):
        for style in ("no_emojis", "concise"):
            for arm, rate in (("feedback", 50 + 2 * step), ("placebo", 50 + step)):
                records.append({"step": step, "style": style, "arm": arm, "win_rate": rate, "se": 5.0})
    records.append({"step": 15, "style": "concise", "arm": "feedback", "win_rate": None, "se": None})
    path = plot_win_rates(records, tmp_path / "plots" / "winrate.png")
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["winrate.png"]  # no temp file left
    plain = plot_win_rates([{"step": 0, "style": "concise", "win_rate": 50.0, "se": 0.0}], tmp_path / "plain.png")
    assert Path(plain).exists()


def test_win_rate_figure_shows_arms_in_colours_undefined_points_words_and_degenerate_replies():
    from matplotlib.colors import to_rgba

    from auxiliary.evals.evaluation_helpers import ARM_COLOURS, SE_UNDEFINED_LABEL, UNDEFINED_LABEL, win_rate_figure

    records = []
    # three eval steps 0, 1, 2: a default locator would put ticks at 0.25, 0.5, ...
    for step, (feedback_rate, placebo_rate) in zip((0, 1, 2), ((50.0, 50.0), (None, 60.0), (70.0, 55.0))):
        for arm, rate, words, broken in (("feedback", feedback_rate, 70 - 10 * step, step),
                                         ("placebo", placebo_rate, 72 - 5 * step, 0)):
            for style in ("concise", "no_emojis"):  # the same replies judged on two styles
                # placebo at step 2: a rate from too few decisive pairs, its SE undefined
                se = None if rate is None or (arm, step) == ("placebo", 2) else 5.0
                records.append({"step": step, "style": style, "arm": arm, "win_rate": rate, "se": se,
                                "mean_words": words,
                                "monitors": {"degenerate_replies": broken}})
    fig = win_rate_figure(records, reference={"mean_words": 75.4, "degenerate_replies": 2, "n": 30})
    top, bottom, bars = fig.axes
    lines = {line.get_label(): line for line in top.get_lines()}
    assert to_rgba(lines["feedback (concise)"].get_color()) == to_rgba(ARM_COLOURS["feedback"])
    assert to_rgba(lines["placebo (no_emojis)"].get_color()) == to_rgba(ARM_COLOURS["placebo"])
    assert lines["feedback (concise)"].get_linestyle() != lines["feedback (no_emojis)"].get_linestyle()
    # the undefined point (feedback at step 1) is drawn as an x on the 50% line
    undefined = lines[UNDEFINED_LABEL]
    assert list(undefined.get_xdata()) == [1.0] and list(undefined.get_ydata()) == [50.0]
    assert undefined.get_marker() == "x"
    ringed = lines[SE_UNDEFINED_LABEL]
    assert list(ringed.get_xdata()) == [2.0] and list(ringed.get_ydata()) == [55.0]
    # equal win rates of the two arms stay visible: other markers, a wider feedback line
    assert lines["feedback (concise)"].get_marker() != lines["placebo (concise)"].get_marker()
    # bottom panel: words per reply per arm and step (one record per arm and step), the baseline's line
    words = {line.get_label(): list(line.get_ydata()) for line in bottom.get_lines()}
    assert words["feedback: words per reply"] == [70, 60, 50] and words["placebo: words per reply"] == [72, 67, 62]
    assert list(words["baseline: 75.4 words; 2/30 degenerate"]) == [75.4, 75.4]
    # degenerate replies as bars: feedback 0, 1, 2 and placebo 0, 0, 0
    heights = {}
    for container in bars.containers:
        heights[container.get_label()] = [patch.get_height() for patch in container]
    assert heights == {"feedback: degenerate replies": [0, 1, 2], "placebo: degenerate replies": [0, 0, 0]}
    ticks = [tick for tick in bottom.get_xticks() if -0.5 < tick < 2.5]
    assert ticks and all(float(tick).is_integer() for tick in ticks)


@pytest.mark.parametrize("steps, arms", [((0, 20), ("feedback", "placebo")), ((0, 5, 20), ("feedback", "placebo")),
                                          ((0, 20), ("feedback",))])
def test_degenerate_reply_bars_are_narrow_and_centred_on_their_eval_step(steps, arms):
    """A run with eval steps 0 and 20 drew bars 6 steps wide: the widths come from the smallest gap between eval
    steps, the arms' bars of one step side by side, together centred on the step."""
    from auxiliary.evals.evaluation_helpers import win_rate_figure

    records = [{"step": step, "style": "concise", "arm": arm, "win_rate": 50.0, "se": 5.0, "mean_words": 40,
                "monitors": {"degenerate_replies": 1 + index}} for step in steps for index, arm in enumerate(arms)]
    _, _, bars = win_rate_figure(records).axes
    smallest_gap = min(b - a for a, b in zip(steps, steps[1:]))
    patches = {container.get_label().split(":")[0]: list(container) for container in bars.containers}
    assert sorted(patches) == sorted(arms) and all(len(drawn) == len(steps) for drawn in patches.values())
    widths = {round(patch.get_width(), 9) for drawn in patches.values() for patch in drawn}
    assert len(widths) == 1  # one width for every bar
    (width,) = widths
    assert 0.05 * smallest_gap <= width * len(arms) <= 0.25 * smallest_gap  # narrow, still visible
    for i, step in enumerate(steps):
        at_step = sorted((drawn[i].get_x(), drawn[i].get_x() + drawn[i].get_width()) for drawn in patches.values())
        assert at_step[0][0] + at_step[-1][1] == pytest.approx(2 * step)  # the group centred on its step
        assert all(left[1] == pytest.approx(right[0]) for left, right in zip(at_step, at_step[1:]))  # side by side


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_load_prompts_formats_shuffle_and_clamp(tmp_path, caplog):
    rows = [{"prompt": f"question {i}"} for i in range(8)]
    rows.append({"messages": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                              {"from": "human", "value": "what now?"}]})
    rows.append({"prompt": [{"role": "user", "content": "a conversation prompt"}]})
    path = _write_jsonl(tmp_path / "p.jsonl", rows)
    prompts, dropped = load_prompts(path)
    assert dropped == 0 and len(prompts) == 10
    assert sorted(map(str, prompts)) == sorted(map(str, [r.get("prompt", None) or
                                                        [{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": "hello"},
                                                         {"role": "user", "content": "what now?"}] for r in rows]))
    assert load_prompts(path, seed=1)[0] == load_prompts(path, seed=1)[0]
    assert load_prompts(path, seed=1)[0] != load_prompts(path, seed=2)[0]
    assert load_prompts(path, n=3, seed=1)[0] == load_prompts(path, seed=1)[0][:3]
    with caplog.at_level(logging.WARNING):
        clamped, _ = load_prompts(path, n=50)
    assert len(clamped) == 10 and "asked for 50 prompts, only 10 available" in caplog.text
    conversation = next(p for p in prompts if isinstance(p, list) and len(p) == 3)
    assert prompt_as_messages(conversation)[-1] == {"role": "user", "content": "what now?"}
    assert prompt_as_text(conversation) == "User: hi\n\nAssistant: hello\n\nUser: what now?"
    assert prompt_as_messages("plain") == [{"role": "user", "content": "plain"}]


def test_load_prompts_drops_and_counts_long_prompts(tmp_path, tiny_tokenizer):
    from sdpo_objective import render_context_ids

    texts = ["short one", "tell me a joke", " ".join(["word"] * 300), "another short request", " ".join(["x y"] * 200)]
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": t} for t in texts])
    lengths = [len(render_context_ids(tiny_tokenizer, [{"role": "user", "content": t}])) for t in texts]
    limit = 60
    assert sorted(lengths)[2] <= limit < sorted(lengths)[3]  # the fixture really has 3 short and 2 long prompts
    prompts, dropped = load_prompts(path, tokenizer=tiny_tokenizer, max_prompt_tokens=limit)
    assert dropped == 2 and sorted(prompts) == sorted(t for t, n in zip(texts, lengths) if n <= limit)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        load_prompts(path, max_prompt_tokens=10)


@pytest.mark.parametrize("rows, expected", [
    ([{"prompt": "ok"}, {"text": "no prompt"}], r"p\.jsonl:2: missing field 'prompt'"),
    ([{"prompt": ""}], r"p\.jsonl:1: field 'prompt' is empty"),
    ([{"prompt": 3}], r"p\.jsonl:1: field 'prompt' must be"),
    ([{"messages": "hi"}], r"p\.jsonl:1: field 'messages' must be a list"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
     r"p\.jsonl:1: field 'messages' must end with a user message"),
    ([{"messages": [{"role": "user"}]}], r"p\.jsonl:1: field 'messages': message 0 needs role/content"),
    (['{"prompt": "ok"}', '{"prompt": '], r"p\.jsonl:2: malformed JSON"),
])
def test_load_prompts_errors_name_file_line_and_field(tmp_path, rows, expected):
    path = _write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError, match=expected):
        load_prompts(path)


def test_bundled_sample_prompts():
    train, _ = load_prompts(REPO / "data/samples/train.jsonl")
    validation, _ = load_prompts(REPO / "data/samples/validation.jsonl")
    # 150 held-out prompts: the demo's paired comparisons need more than the first 30 gave (issue #27)
    assert len(train) >= 55 and len(validation) >= 150
    everything = [p.strip().lower() for p in train + validation]
    assert len(set(everything)) == len(everything)  # no duplicates within or across splits
    assert all(isinstance(p, str) and 4 <= len(p.split()) <= 40 for p in train + validation)
