"""Sequential and flipped preferences, several users and per-user adapters in eval_online_sdpo.py, end to end.

Tiny model, rule-based user and judge (issue #16); the per-phase timings of issue #15. Every
number the run reports is recomputed here from the files it wrote.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest

import eval_online_sdpo
from auxiliary.evals.evaluation_helpers import win_rate_stats
from auxiliary.feedback.factory import make_judge
from auxiliary.feedback.schedule import MultiUserDraw
from reliability_helpers import data_dir, one_torch_thread  # noqa: F401 (fixtures)
from reliability_helpers import ERROR_PREFIX, online_args, read_json, read_jsonl, without_timings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FLIP = "concise:3,detailed:2"


def run_main(argv: list[str]) -> tuple[int, str]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = eval_online_sdpo.main(argv)
    return code, printed.getvalue()


@pytest.fixture(scope="module")
def flip_run(tiny_model_dir, data_dir, tmp_path_factory):
    """A flip after 3 interactions (concise, then detailed) with a placebo arm and phase snapshots."""
    out = tmp_path_factory.mktemp("flip") / "run"
    code, printed = run_main(online_args(tiny_model_dir, data_dir, out, style_schedule=FLIP, train_n=None,
                                         eval_every=4, placebo=True, phase_baseline="snapshot", lr=5e-3))
    assert code == 0
    return out, printed


def eval_replies(out, step: int, arm: str, adapter: str | None = None) -> tuple[list, list[str]]:
    rows = sorted((r for r in read_jsonl(out / "completions.jsonl") if r["phase"] == "eval" and r["step"] == step
                   and r["arm"] == arm and r.get("adapter") == adapter), key=lambda r: r["index"])
    return [r["prompt"] for r in rows], [r["completion"] for r in rows]


def test_a_flip_follows_the_schedule_step_by_step(flip_run):
    out, _ = flip_run
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]  # the schedule's length, not --train_n
    assert [(m["style"], m["phase"]) for m in metrics] == [("concise", 1)] * 3 + [("detailed", 2)] * 2
    for m in metrics:
        assert m["placebo"]["followup"] == "OK, thanks."  # the placebo arm keeps its neutral user
        for arm in ("feedback", "placebo"):
            assert all(m[arm][key] >= 0 for key in ("gen_time_s", "sim_time_s", "train_time_s"))
    # the rule user of each phase is the one that wrote the follow-ups (a concise user never asks for more)
    config = read_json(out / "config.json")
    assert config["resolved"]["user_styles"] == ["concise", "detailed"] and config["resolved"]["boundaries"] == [3]


def test_evaluation_at_the_boundary_covers_every_style_of_the_schedule(flip_run):
    out, _ = flip_run
    history = read_json(out / "eval_history.json")
    initial = [r for r in history if r["baseline"] == "initial"]
    # step 0, eval_every 4, the boundary 3 and the end 5; both styles (the one still to come too), both arms
    assert sorted({r["step"] for r in initial}) == [0, 3, 4, 5]
    assert len(initial) == 4 * 2 * 2
    assert {(r["step"], r["phase"]) for r in initial} == {(0, 1), (3, 1), (4, 2), (5, 2)}
    assert all(r["eval_gen_time_s"] >= 0 and r["judge_time_s"] >= 0 for r in history)
    baseline = read_json(out / "baseline_completions.json")["completions"]
    for record in initial:
        prompts, texts = eval_replies(out, record["step"], record["arm"])
        again = win_rate_stats(make_judge("rule", record["style"]).compare(prompts, texts, baseline))
        assert (again["wins"], again["losses"], again["ties"]) == (record["wins"], record["losses"], record["ties"])


def test_phase_snapshots_judge_each_phase_against_its_start(flip_run):
    out, printed = flip_run
    snapshots = [r for r in read_json(out / "eval_history.json") if r["baseline"] == "snapshot"]
    # phase 1 (concise) at steps 3 vs step 0; phase 2 (detailed) at 4 and 5 vs the boundary's replies (step 3)
    assert sorted((r["step"], r["style"], r["snapshot_step"]) for r in snapshots if r["arm"] == "feedback") == [
        (3, "concise", 0), (4, "detailed", 3), (5, "detailed", 3)]
    for record in snapshots:
        prompts, texts = eval_replies(out, record["step"], record["arm"])
        _, start = eval_replies(out, record["snapshot_step"], record["arm"])
        again = win_rate_stats(make_judge("rule", record["style"]).compare(prompts, texts, start))
        assert (again["wins"], again["losses"], again["ties"]) == (record["wins"], record["losses"], record["ties"])
    summary = read_json(out / "summary.json")
    ends = {(r["phase"], r["arm"]): r["step"] for r in summary["vs_phase_snapshot"]}
    assert ends == {(1, "feedback"): 3, (1, "placebo"): 3, (2, "feedback"): 5, (2, "placebo"): 5}
    assert "phase 2 (detailed, feedback) at step 5 vs the policy at step 3:" in printed


def test_the_forgetting_table_has_a_row_per_phase_end_and_a_column_per_style(flip_run):
    out, printed = flip_run
    summary = read_json(out / "summary.json")
    rows = summary["forgetting"]
    assert [(r["label"], r["step"]) for r in rows] == [("start", 0), ("end of phase 1 (concise)", 3),
                                                       ("end of phase 2 (detailed)", 5)]
    history = read_json(out / "eval_history.json")
    for row in rows:
        for arm in ("feedback", "placebo"):
            assert set(row["win_rates"][arm]) == {"concise", "detailed"}
            for style, cell in row["win_rates"][arm].items():
                record = next(r for r in history if r["baseline"] == "initial" and r["step"] == row["step"]
                              and r["arm"] == arm and r["style"] == style)
                assert (cell["win_rate"], cell["se"], cell["wins"]) == (record["win_rate"], record["se"],
                                                                        record["wins"])
    assert "forgetting table, feedback arm" in printed and "forgetting table, placebo arm" in printed
    assert "end of phase 2 (detailed)" in printed
    assert (out / "winrate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_one_style_run_has_no_forgetting_table(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "one"
    code, printed = run_main(online_args(tiny_model_dir, data_dir, out, train_n=2, eval_every=0))
    assert code == 0
    assert "forgetting" not in read_json(out / "summary.json") and "forgetting table" not in printed
    assert [(m["style"], m["phase"]) for m in read_jsonl(out / "metrics.jsonl")] == [("concise", 1)] * 2
    assert all(r["baseline"] == "initial" for r in read_json(out / "eval_history.json"))


def test_a_resume_in_phase_two_continues_in_phase_two_as_an_uninterrupted_run(tiny_model_dir, data_dir, tmp_path):
    flags = dict(style_schedule=FLIP, train_n=None, eval_every=2, placebo=True, save_checkpoints=True,
                 checkpoint_every=4, max_checkpoints=0, phase_baseline="snapshot")
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_main(online_args(tiny_model_dir, data_dir, full, **flags))[0] == 0
    shutil.copytree(full, cut)  # the same run a second time would write the same folder
    # the state a kill during step 5 (phase 2) leaves: records of step 4 and its checkpoint, nothing after
    marker = cut / "checkpoints" / "latest.json"
    marker.write_text(json.dumps({**read_json(marker), "step": 4}))
    for arm in ("feedback", "placebo"):
        shutil.rmtree(cut / "checkpoints" / arm / "step_000005")
    code, _ = run_main(online_args(tiny_model_dir, data_dir, cut, resume=True, **flags))
    assert code == 0
    resumed, uninterrupted = read_jsonl(cut / "metrics.jsonl"), read_jsonl(full / "metrics.jsonl")
    assert [(m["step"], m["style"], m["phase"]) for m in resumed] == [
        (1, "concise", 1), (2, "concise", 1), (3, "concise", 1), (4, "detailed", 2), (5, "detailed", 2)]
    assert without_timings(resumed) == without_timings(uninterrupted)
    assert without_timings(read_json(cut / "eval_history.json")) == without_timings(read_json(full /
                                                                                            "eval_history.json"))
    assert read_json(cut / "summary.json")["forgetting"] == read_json(full / "summary.json")["forgetting"]
    # a resume with another schedule changes the experiment: refused before anything loads
    other = dict(flags, style_schedule="concise:3,detailed:3")
    assert run_main(online_args(tiny_model_dir, data_dir, cut, resume=True, **other))[0] == 2


def test_several_users_draw_the_user_of_each_interaction(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "users"
    code, _ = run_main(online_args(tiny_model_dir, data_dir, out, users="concise,detailed", train_n=6,
                                   eval_every=0, seed=3))
    assert code == 0
    metrics = read_jsonl(out / "metrics.jsonl")
    draw = MultiUserDraw(["concise", "detailed"], seed=3)
    assert [m["style"] for m in metrics] == [draw.style_at(s) for s in range(1, 7)]
    assert {m["style"] for m in metrics} == {"concise", "detailed"}  # seed 3 draws both in 6 steps
    history = read_json(out / "eval_history.json")
    assert {(r["step"], r["style"]) for r in history} == {(s, style) for s in (0, 6) for style in ("concise",
                                                                                                    "detailed")}


def test_per_user_adapters_train_one_adapter_per_user_on_one_base(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    import peft

    created = []
    original = peft.PeftModel.add_adapter
    monkeypatch.setattr(peft.PeftModel, "add_adapter",
                        lambda self, name, *a, **kw: (created.append(name), original(self, name, *a, **kw))[1])
    out = tmp_path / "adapters"
    code, _ = run_main(online_args(tiny_model_dir, data_dir, out, users="concise,detailed", per_user_adapters=True,
                                   use_lora=True, lr=5e-2, train_n=6, eval_every=3, seed=3, placebo=True))
    assert code == 0
    assert created == ["concise", "detailed"] * 2  # both arms: one adapter per user
    history = read_json(out / "eval_history.json")
    # each adapter is judged on its own user's style
    assert all(r["adapter"] == r["style"] for r in history)
    assert {(r["step"], r["style"], r["arm"]) for r in history} == {
        (s, style, arm) for s in (0, 3, 6) for style in ("concise", "detailed") for arm in ("feedback", "placebo")}
    baseline = read_json(out / "baseline_completions.json")["completions"]
    for record in history:
        prompts, texts = eval_replies(out, record["step"], record["arm"], record["adapter"])
        again = win_rate_stats(make_judge("rule", record["style"]).compare(prompts, texts, baseline))
        assert (again["wins"], again["losses"], again["ties"]) == (record["wins"], record["losses"], record["ties"])
    # the two users' adapters learned different things: their final replies differ
    _, concise = eval_replies(out, 6, "feedback", "concise")
    _, detailed = eval_replies(out, 6, "feedback", "detailed")
    assert concise != detailed


def test_an_adapter_learns_only_from_its_own_user(tiny_model_dir):
    """Training user A's adapter leaves user B's adapter and the base weights bit for bit unchanged."""
    import torch

    from auxiliary.online.arms import Arms
    from online_sdpo_updater_config import OnlineSDPOConfig

    sdpo = OnlineSDPOConfig(model=str(tiny_model_dir), use_lora=True, lr=5e-2, max_new_tokens=6,
                            loss_mode="simple_signal", device="cpu")
    arms = Arms(["feedback"], user_styles=["concise", "detailed"], per_user=True)
    arms.load(sdpo)
    model = arms.adapter_updaters["feedback"]["concise"].model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    updater = arms.policy("feedback", "concise")
    messages = [{"role": "user", "content": "Say something."}]
    reply = updater.generate([messages], seed=1)[0]
    updater.train_step(messages, reply.ids, "Shorter, please.")
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".concise." in n for n in changed)
    assert not any("default" in n for n in before)  # the wrapping adapter is gone: one adapter per user


@pytest.mark.parametrize("flags, message", [
    (dict(style_schedule="concise:3,detailed"), "item 'detailed' is not STYLE:N"),
    (dict(style_schedule="concise:0"), "N must be >= 1"),
    (dict(style_schedule="concise:2,no_emojiz:2"), "unknown style 'no_emojiz'"),
    (dict(style_schedule="concise:2,detailed:2", users="concise,detailed"), "are exclusive"),
    (dict(users="concise"), "at least two styles"),
    (dict(per_user_adapters=True), "--per_user_adapters needs --users"),
    (dict(users="concise,detailed", per_user_adapters=True), "needs --use_lora"),
    (dict(phase_baseline="snapshot"), "needs --style_schedule"),
    (dict(phase_baseline="latest", style_schedule="concise:2"), "initial or snapshot"),
])
def test_bad_schedules_and_user_lists_fail_in_one_line_before_anything_loads(flags, message, data_dir, tmp_path,
                                                                             capsys):
    out = tmp_path / "bad"
    code = eval_online_sdpo.main(online_args(tmp_path / "no_model_here", data_dir, out, **flags))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(ERROR_PREFIX)]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and not (out / "metrics.jsonl").exists()
