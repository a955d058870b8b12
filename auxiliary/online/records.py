"""The rows an online run writes per step: metrics.jsonl records and completions.jsonl rows."""
from __future__ import annotations

from auxiliary.evals.online_report import words

# Wall-clock fields of metrics.jsonl and eval_history.json: the only values a resumed run does not reproduce.
TIMING_KEYS = ("time", "seconds", "gen_time_s", "sim_time_s", "train_time_s", "eval_gen_time_s", "judge_time_s")


def step_rows(answers, learned: dict, users: dict, phase_of, now: float, show=None
              ) -> tuple[list[dict], list[list[dict]]]:
    """(one metrics record per step, the completions rows of each step) of a batch: `answers` a BatchAnswers,
    `learned` {arm: (the update's metrics, its seconds)}; the update's metrics are shared by the batch's rows
    (`update` names it). `show(conversation, reply, followup, signal)`: called with step 1 of the feedback arm
    (--debug_first_example)."""
    steps, styles = answers.steps, answers.styles
    records = [{"step": step, "time": now, "style": style, "phase": phase_of(step)}
               for step, style in zip(steps, styles)]
    completions = [[] for _ in steps]
    # A row's part of the batch's phase times: the rows add up to the run's time (with --overlap_generation
    # the answering ran beside the previous update, so they add up to more).
    share = 1 / len(steps)
    for arm, answered in answers.arms.items():
        update, train_time = learned[arm]
        signals = update.pop("signal_per_sequence")
        update["update"] = update.pop("step")  # the updater's count of updates: rows of one batch share it
        times = {"gen_time_s": round(share * answered.gen_time, 4), "sim_time_s": round(share * answered.sim_time, 4),
                 "train_time_s": round(share * train_time, 4)}
        for i, (step, style, prompt, reply, followup) in enumerate(zip(steps, styles, answers.prompts,
                                                                       answered.replies, answered.followups)):
            monitors = answered.monitors[i]
            metrics = dict(update, generated_by_update=answered.generated_by, followup=followup,
                           reply_tokens=len(reply.ids), reply_words=words(reply.text),
                           reply_finished=reply.finished, **times, reply_degenerate=monitors["degenerate"],
                           reply_distinct_2=round(monitors["distinct_2"], 4), reply_entropy=monitors["entropy"])
            problems = users["feedback"][style].problems(reply.text)  # what a rule user would complain about
            if problems is not None:
                metrics["style_problems"] = problems
            records[i][arm] = metrics
            completions[i].append({"step": step, "phase": "train", "arm": arm, "style": style, "prompt": prompt,
                                   "completion": reply.text, "followup": followup})
            if show is not None and step == 1 and arm == "feedback":
                show(answers.conversations[i], reply, followup, signals[i])
    return records, completions
