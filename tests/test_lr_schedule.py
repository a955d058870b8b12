"""The online learning-rate schedule (--lr_scheduler, --warmup_steps, --scheduler_steps).

The rates an updater applies are checked against the schedules' formulas written out here, a
checkpoint in the middle of a schedule resumes on the same rates, and bad settings fail at once.
"""
import math

import pytest

from online_sdpo_updater_config import OnlineSDPOConfig
from reliability_helpers import tiny_updater

MESSAGES = [{"role": "user", "content": "Write a short email to my manager."}]
LR = 1e-3


def make_updater(tokenizer, **overrides):
    return tiny_updater(tokenizer, **{"lr": LR, "max_new_tokens": 6, "loss_mode": "simple_signal", **overrides})


def expected_rate(kind: str, update: int, warmup: int, total: int) -> float:
    """The rate of the update-th update (0-based): linear warm-up from 0, then the decay to 0."""
    if update < warmup:
        return LR * update / warmup
    if kind == "constant":
        return LR
    progress = (update - warmup) / (total - warmup)
    if kind == "linear":
        return LR * max(0.0, 1.0 - progress)
    return LR * 0.5 * (1.0 + math.cos(math.pi * progress))


def applied_rates(updater, n: int, reply_ids) -> list[float]:
    return [updater.train_step(MESSAGES, reply_ids, "Shorter, please.")["lr"] for _ in range(n)]


@pytest.mark.parametrize("kind,warmup", [("constant", 0), ("constant", 2), ("linear", 1), ("cosine", 2)])
def test_rates_follow_the_schedule(tiny_tokenizer, kind, warmup):
    total = 6
    updater = make_updater(tiny_tokenizer, lr_scheduler=kind, warmup_steps=warmup, scheduler_steps=total)
    reply = updater.generate([MESSAGES], seed=1)[0]
    rates = applied_rates(updater, total, reply.ids)
    assert rates == pytest.approx([expected_rate(kind, i, warmup, total) for i in range(total)], rel=1e-9, abs=1e-15)


def test_each_gradient_step_of_an_interaction_advances_the_schedule(tiny_tokenizer):
    updater = make_updater(tiny_tokenizer, lr_scheduler="linear", scheduler_steps=6, train_steps_per_example=2)
    reply = updater.generate([MESSAGES], seed=1)[0]
    # metrics["lr"] is the rate of the interaction's first update: updates 0, 2, 4
    assert applied_rates(updater, 3, reply.ids) == pytest.approx([expected_rate("linear", i, 0, 6) for i in (0, 2, 4)])


def test_resume_in_the_middle_of_the_schedule_continues_on_the_same_rates(tiny_tokenizer, tmp_path):
    settings = dict(lr_scheduler="cosine", warmup_steps=1, scheduler_steps=6)
    uninterrupted = make_updater(tiny_tokenizer, **settings)
    reply = uninterrupted.generate([MESSAGES], seed=1)[0]
    straight = applied_rates(uninterrupted, 6, reply.ids)

    first = make_updater(tiny_tokenizer, **settings)
    before = applied_rates(first, 3, reply.ids)
    path = first.save_checkpoint(tmp_path / "step_000003")
    resumed = make_updater(tiny_tokenizer, **settings)
    resumed.load_checkpoint(path)
    assert before + applied_rates(resumed, 3, reply.ids) == pytest.approx(straight, rel=1e-12)
    # without the saved schedule state the resumed updater would start the warm-up again
    fresh = make_updater(tiny_tokenizer, **settings)
    assert applied_rates(fresh, 1, reply.ids)[0] != pytest.approx(straight[3])


def test_bad_schedules_fail_before_anything_loads(tiny_tokenizer):
    with pytest.raises(ValueError, match="--lr_scheduler must be one of constant, cosine, linear"):
        OnlineSDPOConfig(model="tiny", lr_scheduler="exponential")
    with pytest.raises(ValueError, match="--warmup_steps 6 must be below --scheduler_steps 6"):
        OnlineSDPOConfig(model="tiny", lr_scheduler="cosine", warmup_steps=6, scheduler_steps=6)
    with pytest.raises(ValueError, match="--warmup_steps must be >= 0"):
        OnlineSDPOConfig(model="tiny", warmup_steps=-1)
    with pytest.raises(ValueError, match="needs --scheduler_steps"):
        make_updater(tiny_tokenizer, lr_scheduler="linear")
    # the upstream spelling of the flag is accepted by the command line
    from auxiliary.runtime.cli import parse_dataclasses

    (config,) = parse_dataclasses((OnlineSDPOConfig,), ["--model", "tiny", "--lr_scheduler_type", "cosine"])
    assert config.lr_scheduler == "cosine"


def test_an_online_run_decays_over_its_interactions(tiny_model_dir, tmp_path, capsys):
    import json

    import eval_online_sdpo
    from reliability_helpers import flags_from_values

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(
        "".join(json.dumps({"prompt": f"Tell me about topic {i}."}) + "\n" for i in range(4)))
    (data / "val.jsonl").write_text(json.dumps({"prompt": "Explain gravity."}) + "\n")
    out = tmp_path / "run"
    argv = flags_from_values(
        {"model": tiny_model_dir, "train_jsonl": data / "train.jsonl", "val_jsonl": data / "val.jsonl",
                              "style": "concise", "train_n": 4, "eval_n": 1, "eval_every": 0, "max_new_tokens": 6,
                              "eval_max_new_tokens": 6, "lr": LR, "loss_mode": "simple_signal", "output_dir": out,
                              "lr_scheduler": "linear"})
    assert eval_online_sdpo.main(argv) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # --scheduler_steps defaults to the run's interactions: 4 updates from LR down to LR / 4
    assert [row["feedback"]["lr"]
            for row in rows] == pytest.approx([expected_rate("linear", i, 0, 4) for i in range(4)])
