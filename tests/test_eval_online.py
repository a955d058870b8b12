"""eval_online_sdpo.py end to end on a tiny model with the rule-based user and judge.

Runs go through main(argv) in-process (no interpreter start-up per run). The tiny model writes
byte-level gibberish, which is enough: lengths vary, so the rule judges for `concise` make
decisive calls, and every file the run writes can be checked and recomputed independently.
"""
import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

import eval_online_sdpo
from auxiliary.evals.evaluation_helpers import win_rate_stats
from auxiliary.feedback.style_checks import degeneracy
from auxiliary.feedback.factory import make_judge
from reliability_helpers import (copy_without_chat_template, flags_from_values, read_json, read_jsonl, read_metrics,
                                 without_timings)

TRAIN = [f"Tell me something about topic number {i}." for i in range(5)]
EVAL = [f"Explain idea {i} in simple terms." for i in range(6)]
SECRET = "sk-ant-test-PLANTED-SECRET-4242"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("online_data")
    long_prompt = "Please read this. " * 200  # far over --max_prompt_tokens 96: dropped and counted
    lines = [json.dumps({"prompt": p}) for p in TRAIN] + [json.dumps({"prompt": long_prompt})]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "validation.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in EVAL))
    return folder


def base_args(model_dir, data_dir, out, **overrides):
    values = {"model": model_dir, "train_jsonl": data_dir / "train.jsonl", "val_jsonl": data_dir / "validation.jsonl",
              "style": "concise", "eval_styles": "no_emojis", "train_n": 4, "eval_n": 6, "eval_every": 2,
              "max_new_tokens": 10, "eval_max_new_tokens": 10, "max_prompt_tokens": 96, "lr": 1e-3,
              "loss_mode": "simple_signal", "output_dir": out, "seed": 7}
    values.update(overrides)
    return flags_from_values(values)


def read_history(out):
    return read_json(Path(out) / "eval_history.json")


def read_completions(out):
    return read_jsonl(Path(out) / "completions.jsonl")


@pytest.fixture(scope="module")
def placebo_run(tiny_model_dir, data_dir, tmp_path_factory):
    """One full run with both arms and checkpoints; several tests read its outputs."""
    out = tmp_path_factory.mktemp("run") / "placebo"
    monkey = pytest.MonkeyPatch()
    monkey.setenv("ANTHROPIC_API_KEY", SECRET)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            code = eval_online_sdpo.main(base_args(tiny_model_dir, data_dir, out, train_n=10, placebo=True,
                                                   save_checkpoints=True))
    finally:
        monkey.undo()
    assert code == 0
    (out / "stdout.txt").write_text(printed.getvalue())
    return out


def test_outputs_written_and_well_formed(placebo_run):
    out = placebo_run
    config = json.loads((out / "config.json").read_text())
    assert config["sdpo"]["lr"] == 1e-3 and config["run"]["style"] == "concise"
    # train_n 10 is clamped to the 5 usable prompts; the over-long prompt was dropped and counted
    assert config["resolved"]["train_prompts"] == 5
    assert config["resolved"]["dropped_train_over_max_prompt_tokens"] == 1
    assert config["resolved"]["arms"] == ["feedback", "placebo"]

    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    for m in metrics:
        for arm in ("feedback", "placebo"):
            assert math.isfinite(m[arm]["loss"]) and m[arm]["followup"].strip()
            assert m[arm]["reply_tokens"] >= 1 and "signal_per_sequence" not in m[arm]
        assert m["placebo"]["followup"] == "OK, thanks."
    # both arms sample step 1 from the same initial weights with the same seed: the same reply
    train_rows = [r for r in read_completions(out) if r["phase"] == "train"]
    first = {r["arm"]: r["completion"] for r in train_rows if r["step"] == 1}
    assert first["feedback"] == first["placebo"]
    assert len(train_rows) == 10

    history = read_history(out)
    keys = {"step", "style", "arm", "n", "wins", "losses", "ties", "coverage", "win_rate", "se", "se_bootstrap"}
    assert all(keys <= set(r) for r in history)
    # eval at 0, every 2 steps and at the end (5), for 2 styles x 2 arms
    assert sorted({r["step"] for r in history}) == [0, 2, 4, 5]
    assert len(history) == 4 * 2 * 2
    for r in history:
        assert r["n"] == 6 and r["wins"] + r["losses"] + r["ties"] == 6
        assert r["coverage"] == pytest.approx((r["wins"] + r["losses"]) / 6)
        if r["wins"] + r["losses"]:
            assert r["win_rate"] == pytest.approx(100 * r["wins"] / (r["wins"] + r["losses"]))

    assert (out / "winrate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 5
    for arm in ("feedback", "placebo"):
        assert (out / "checkpoints" / arm / "step_000005" / "updater_state.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_step"] == 5 and "net_effect" in summary["final"]["concise"]


def test_step_zero_is_the_policy_against_itself(placebo_run):
    """Before any update the policy is the baseline: every pair is a tie."""
    for record in (r for r in read_history(placebo_run) if r["step"] == 0):
        assert record["ties"] == record["n"] and record["win_rate"] is None


def test_recorded_win_rates_match_an_independent_rejudging(placebo_run):
    baseline = json.loads((placebo_run / "baseline_completions.json").read_text())["completions"]
    rows = [r for r in read_completions(placebo_run) if r["phase"] == "eval"]
    for record in read_history(placebo_run):
        texts = [r["completion"] for r in sorted(rows, key=lambda r: r["index"])
                 if r["step"] == record["step"] and r["arm"] == record["arm"]]
        prompts = [r["prompt"] for r in sorted(rows, key=lambda r: r["index"])
                   if r["step"] == record["step"] and r["arm"] == record["arm"]]
        decisions = make_judge("rule", record["style"]).compare(prompts, texts, baseline)
        again = win_rate_stats(decisions)
        assert (again["wins"], again["losses"], again["ties"]) == (record["wins"], record["losses"], record["ties"])
    # the feedback arm changed something by the end (lr 1e-3 on a tiny model): not all ties
    final = [r for r in read_history(placebo_run) if r["step"] == 5 and r["style"] == "concise"]
    assert any(r["ties"] < r["n"] for r in final)


def test_no_secret_in_any_output(placebo_run):
    for path in placebo_run.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".log", ".txt", ""):
            assert SECRET not in path.read_text(errors="ignore"), path


def test_summary_printed_with_table_net_effect_and_plot(placebo_run):
    from auxiliary.evals.evaluation_helpers import net_effect
    from auxiliary.evals.online_report import summary_table

    table = summary_table(read_history(placebo_run), ["feedback", "placebo"], ["concise", "no_emojis"])
    lines = table.splitlines()
    assert "net (feedback - placebo)" in lines[1]
    assert len(lines) == 3 + 4 * 2  # title, header, rule, 4 eval steps x 2 styles
    printed = (placebo_run / "stdout.txt").read_text()
    assert table in printed and f"win-rate plot: {placebo_run / 'winrate.png'}" in printed
    final = {r["arm"]: r for r in read_history(placebo_run) if r["step"] == 5 and r["style"] == "concise"}
    net = net_effect(final["feedback"], final["placebo"])
    # the headline comes first: the arms paired on the same prompts, the baseline comparisons beside them
    assert printed.startswith("== headline at step 5 (concise): feedback vs placebo, paired on the same 6 held-out")
    headline = printed.split("\n\n")[0]
    assert "head to head, feedback's replies vs placebo's" in headline.splitlines()[1]
    assert "paired rule score of 'concise', feedback - placebo: " in headline.splitlines()[2]
    if net["diff"] is not None:
        from auxiliary.evals.online_report import fmt_diff

        assert f"net effect (feedback - placebo) {fmt_diff(net)} points" in headline
    # the head-to-head judges the two arms' final replies against each other
    rows = [r for r in read_completions(placebo_run) if r["phase"] == "eval" and r["step"] == 5]
    texts = {arm: [r["completion"] for r in sorted(rows, key=lambda r: r["index"]) if r["arm"] == arm]
             for arm in ("feedback", "placebo")}
    prompts = [r["prompt"] for r in sorted(rows, key=lambda r: r["index"]) if r["arm"] == "feedback"]
    expected = win_rate_stats(make_judge("rule", "concise").compare(prompts, texts["feedback"], texts["placebo"]))
    h2h = json.loads((placebo_run / "summary.json").read_text())["head_to_head_feedback_vs_placebo"]["concise"]
    assert (h2h["wins"], h2h["losses"], h2h["ties"]) == (expected["wins"], expected["losses"], expected["ties"])
    paired = json.loads((placebo_run / "summary.json").read_text())["paired_style_score_feedback_minus_placebo"]
    words = lambda t: sum(1 for tok in t.split() if any(ch.isalnum() for ch in tok))  # noqa: E731
    by_hand = sum(words(p) - words(f) for f, p in zip(texts["feedback"], texts["placebo"])) / len(prompts)
    assert not any(map(degeneracy, texts["feedback"] + texts["placebo"]))  # else the rule's floor applies (below)
    assert paired["concise"]["diff"] == pytest.approx(by_hand)
    summary = json.loads((placebo_run / "summary.json").read_text())
    assert list(summary)[0] == "headline"
    assert summary["headline"]["concise"]["head_to_head"] == h2h
    assert summary["headline"]["concise"]["paired_rule_score"] == paired["concise"]
    assert summary["headline"]["concise"]["net_effect"] == summary["final"]["concise"]["net_effect"]


def test_resume_continues_without_duplicates_and_matches_an_uninterrupted_run(tiny_model_dir, data_dir, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert eval_online_sdpo.main(base_args(tiny_model_dir, data_dir, full, save_checkpoints=True)) == 0
    # a run stopped after step 2 (its last checkpoint), then continued to 4 steps with --resume
    assert eval_online_sdpo.main(base_args(tiny_model_dir, data_dir, part, train_n=2, save_checkpoints=True)) == 0
    # a kill after step 3's records but before its checkpoint: those records must be dropped and replayed
    with open(part / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"step": 3, "feedback": {"loss": 123.0}}) + "\n")
    with open(part / "completions.jsonl", "a") as handle:
        handle.write('{"step": 3, "phase": "train", "arm": "feed')  # cut mid-line
    assert eval_online_sdpo.main(base_args(tiny_model_dir, data_dir, part, save_checkpoints=True, resume=True)) == 0

    assert [m["step"] for m in read_metrics(part)] == [1, 2, 3, 4]
    assert [m["feedback"]["loss"] for m in read_metrics(part)] == [m["feedback"]["loss"] for m in read_metrics(full)]
    assert without_timings(read_history(part)) == without_timings(read_history(full))
    assert read_completions(part) == read_completions(full)
    assert (json.loads((part / "baseline_completions.json").read_text())
            == json.loads((full / "baseline_completions.json").read_text()))
    from safetensors.torch import load_file

    weights_full = load_file(full / "checkpoints/feedback/step_000004/model/model.safetensors")
    weights_part = load_file(part / "checkpoints/feedback/step_000004/model/model.safetensors")
    assert weights_full.keys() == weights_part.keys()
    assert all(torch.equal(weights_full[k], weights_part[k]) for k in weights_full)


def test_existing_results_are_protected(tiny_model_dir, data_dir, placebo_run, capsys):
    code = eval_online_sdpo.main(base_args(tiny_model_dir, data_dir, placebo_run))
    assert code == 2 and "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["malformed_jsonl", "unknown_style", "missing_model", "no_chat_template",
                                  "unwritable_output", "rule_cannot_check"])
def test_bad_input_fails_with_one_clear_line(case, tiny_model_dir, data_dir, tmp_path, capsys):
    overrides, expected = {}, None
    if case == "malformed_jsonl":
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "fine"}\n{"prompt": "broken\n')
        overrides, expected = {"train_jsonl": bad}, f"{bad}:2"
    elif case == "unknown_style":
        overrides, expected = {"eval_styles": "no_emojiz"}, "no_emojis"  # the known styles are listed
    elif case == "missing_model":
        overrides, expected = {"model": tmp_path / "nowhere"}, "does not exist"
    elif case == "no_chat_template":
        overrides, expected = {
            "model": copy_without_chat_template(tiny_model_dir, tmp_path / "no_template")}, "chat template"
    elif case == "unwritable_output":
        blocker = tmp_path / "a_file"
        blocker.write_text("x")
        overrides, expected = {"output_dir": blocker / "run"}, "not writable"
    elif case == "rule_cannot_check":
        overrides, expected = {"style": "poetic"}, "rule-checkable styles"
    argv = base_args(tiny_model_dir, data_dir, tmp_path / "out", **overrides)
    code = eval_online_sdpo.main(argv)
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("eval_online_sdpo.py: error:")]
    assert code == 2 and len(error_lines) == 1 and expected in error_lines[0], err
    assert "Traceback" not in err


def test_derived_seeds_are_stable_and_distinct():
    from auxiliary.runtime.seeds import derive_seed

    assert derive_seed(1234, "train", 3) == derive_seed(1234, "train", 3)
    assert len({derive_seed(1234, "train", s) for s in range(100)}) == 100
    assert derive_seed(1234, "train", 3) != derive_seed(1235, "train", 3)


def test_wandb_offline_logs(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    assert eval_online_sdpo.main(base_args(tiny_model_dir, data_dir, out, train_n=2, eval_n=2, wandb=True)) == 0
    runs = list((out / "wandb").glob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())


def test_paired_style_score_difference_by_hand():
    from auxiliary.evals.online_report import paired_score_difference

    # concise scores a reply by minus its word count: diffs (-2) - (-3) = +1 and (-4) - (-3) = -1
    diff = paired_score_difference("concise", ["a b", "a b c d"], ["a b c", "x y z"])
    assert diff["n"] == 2 and diff["diff"] == pytest.approx(0.0)
    assert diff["se"] == pytest.approx(math.sqrt(2.0 / 2))  # sample variance 2, n 2
    assert diff["feedback"] == pytest.approx(-3.0) and diff["placebo"] == pytest.approx(-3.0)
    assert diff["baseline_score"] is None
    assert paired_score_difference("poetic", ["a", "b"], ["c", "d"]) is None  # no rule checks it


def test_a_degenerate_reply_scores_no_higher_than_the_worst_sound_reply_to_its_prompt():
    from auxiliary.evals.online_report import paired_score_difference

    stutter = "go on now go on now go on now go on now"  # 12 words, degenerate (a 4-gram three times)
    feedback = ["", stutter, "one two three"]
    placebo = ["one two three four five", "one two", "x"]
    baseline = ["one two three four five six", "one two three four five six seven", "a b c d"]
    diff = paired_score_difference("concise", feedback, placebo, baseline)
    # prompt 0: feedback empty (raw 0) scores as the worst sound reply, the baseline's -6: -6 - (-5) = -1
    # prompt 1: the stutter's raw -12 is already below every sound reply: -12 - (-2) = -10
    # prompt 2: both sound: -3 - (-1) = -2
    assert diff["diff"] == pytest.approx((-1 - 10 - 2) / 3)
    assert diff["feedback"] == pytest.approx((-6 - 12 - 3) / 3) and diff["placebo"] == pytest.approx((-5 - 2 - 1) / 3)
    assert diff["baseline_score"] == pytest.approx((-6 - 7 - 4) / 3)
    # both arms broken on a prompt: a tie there, whatever their lengths
    tie = paired_score_difference("concise", ["", "a b"], ["  ", "a b c"])
    assert tie["diff"] == pytest.approx((0 + 1) / 2)


def test_config_yaml_sets_flags_and_command_line_wins(tiny_model_dir, data_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("style: no_lists\ntrain_n: 1\neval_n: 2\nlr: 0.002\nplacebo_texts: [\"Fine.\", \"Noted.\"]\n")
    out = tmp_path / "yaml_run"
    argv = base_args(tiny_model_dir, data_dir, out, style=None, train_n=None, eval_n=None, lr=None, eval_styles=None)
    assert eval_online_sdpo.main(["--config", str(config), "--lr", "0.003"] + argv) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["run"]["style"] == "no_lists" and saved["run"]["train_n"] == 1
    assert saved["run"]["placebo_texts"] == ["Fine.", "Noted."]
    assert saved["sdpo"]["lr"] == 0.003  # the flag beats the YAML value
    assert [m["step"] for m in read_metrics(out)] == [1]


def test_default_output_dir_follows_the_environment(monkeypatch):
    from auxiliary.runtime.run_folder import default_output_dir

    monkeypatch.delenv("OUTPUT_DIR", raising=False)
    monkeypatch.setenv("BASE_WORK", "/scratch/me")
    assert default_output_dir("my-run", "m", "concise") == Path("/scratch/me/sdpo_runs/my-run")
    monkeypatch.delenv("BASE_WORK")
    monkeypatch.delenv("SCRATCH", raising=False)
    monkeypatch.setenv("TMPDIR", "/tmpdir")
    assert default_output_dir("my-run", "m", "concise") == Path("/tmpdir/sdpo_runs/my-run")
    monkeypatch.setenv("OUTPUT_DIR", "/exact/place")
    assert default_output_dir("my-run", "m", "concise") == Path("/exact/place")


def test_run_without_output_dir_writes_under_base_work(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """The documented default path (no --output_dir): the run lands in $BASE_WORK/sdpo_runs/<run_name>."""
    monkeypatch.delenv("OUTPUT_DIR", raising=False)
    monkeypatch.setenv("BASE_WORK", str(tmp_path))
    argv = base_args(tiny_model_dir, data_dir, None, train_n=1, eval_n=2, eval_every=0, run_name="default-place")
    assert eval_online_sdpo.main(argv) == 0
    saved = json.loads((tmp_path / "sdpo_runs" / "default-place" / "config.json").read_text())
    assert saved["run"]["train_n"] == 1


def test_every_user_gets_its_per_step_seed_as_an_argument(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    from auxiliary.feedback.factory import FeedbackFactory
    from auxiliary.runtime.seeds import derive_seed

    calls = []  # (style of the user, seed passed to generate_feedback)
    build = FeedbackFactory.user

    def recording_user(self, kind, style, *args, **kw):
        user = build(self, kind, style, *args, **kw)
        generate = user.generate_feedback
        user.generate_feedback = lambda prompts, completions, seed=None: (calls.append((kind, seed)),
                                                                          generate(prompts, completions, seed=seed))[1]
        return user

    monkeypatch.setattr(FeedbackFactory, "user", recording_user)
    out = tmp_path / "seeds"
    assert eval_online_sdpo.main(base_args(tiny_model_dir, data_dir, out, train_n=2, eval_n=2, placebo=True)) == 0
    expected = [(kind, derive_seed(7, "user", arm, step)) for step in (1, 2)
                for kind, arm in (("rule", "feedback"), ("neutral", "placebo"))]
    assert calls == expected


@pytest.mark.parametrize("keep, expected", [(0, [1, 2, 3]), (1, [3])])
def test_max_checkpoints_zero_keeps_every_checkpoint(tiny_model_dir, data_dir, tmp_path, keep, expected):
    out = tmp_path / "run"
    assert eval_online_sdpo.main(base_args(tiny_model_dir, data_dir, out, train_n=3, eval_n=0, save_checkpoints=True,
                                           checkpoint_every=1, max_checkpoints=keep)) == 0
    kept = sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints" / "feedback").iterdir())
    assert kept == expected


def test_missing_default_prompts_name_the_remedies_and_leave_no_folder(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a folder without data/: the default data/helpsteer_prompts is nowhere
    argv = [a for a in base_args(tiny_model_dir, tmp_path, tmp_path / "out") if "jsonl" not in a]
    argv = [a for a in argv if a != str(tmp_path / "train.jsonl") and a != str(tmp_path / "validation.jsonl")]
    code = eval_online_sdpo.main(argv)
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("eval_online_sdpo.py: error:")]
    assert code == 2 and "--train_jsonl data/helpsteer_prompts/train.jsonl" in line
    assert "scripts/prepare_data.sh" in line and "data/samples/train.jsonl" in line
    assert not (tmp_path / "out").exists()


def test_a_prompt_file_of_the_current_folder_shadowing_the_repositorys_is_named(tmp_path, monkeypatch, caplog):
    from auxiliary.evals.evaluation_helpers import find_data_file

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "samples").mkdir(parents=True)
    (tmp_path / "data" / "samples" / "train.jsonl").write_text('{"prompt": "mine"}\n')
    with caplog.at_level("WARNING"):
        found = find_data_file("data/samples/train.jsonl")
    assert found.resolve() == (tmp_path / "data" / "samples" / "train.jsonl").resolve()
    assert "not from the repository" in caplog.text and str(tmp_path) in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert find_data_file("data/samples/validation.jsonl").is_file()  # only in the repository: no warning
    assert caplog.text == ""


def test_debug_first_example_prints_step_one_of_the_feedback_arm_once(tiny_model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "debug"
    assert eval_online_sdpo.main(base_args(tiny_model_dir, data_dir, out, train_n=2, eval_n=0, placebo=True,
                                           debug_first_example=True)) == 0
    err = capsys.readouterr().err
    assert err.count("=== first interaction ===") == 1
    first = read_metrics(out)[0]
    reply = next(r for r in read_completions(out) if r["step"] == 1 and r["arm"] == "feedback")
    block = err.split("=== first interaction ===")[1]
    assert f"--- reply y ---\n{reply['completion']}\n--- follow-up o ---\n{first['feedback']['followup']}\n" in block
    assert first["feedback"]["followup"] != first["placebo"]["followup"]  # the placebo's step is not the one shown


def test_a_baseline_model_answers_the_eval_prompts_like_the_same_initial_policy(tiny_model_dir, data_dir, tmp_path):
    # --baseline_model: its replies are generated apart (not copied from the policy at step 0); the same weights
    # with the same eval seed give the same replies, so step 0 is all ties
    out = tmp_path / "baseline_model"
    assert eval_online_sdpo.main(base_args(tiny_model_dir, data_dir, out, train_n=1, eval_n=3,
                                           baseline_model=tiny_model_dir)) == 0
    baseline = read_json(out / "baseline_completions.json")
    assert baseline["signature"]["baseline_model"] == str(tiny_model_dir)
    rows = [r for r in read_completions(out) if r["phase"] == "eval" and r["step"] == 0]
    step0 = [r["completion"] for r in sorted(rows, key=lambda r: r["index"])]
    assert baseline["completions"] == step0 and len(step0) == 3
    assert all(r["ties"] == r["n"] for r in read_history(out) if r["step"] == 0)


def test_a_resume_without_the_cached_baseline_fails_in_one_line(tiny_model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "no_baseline"
    assert eval_online_sdpo.main(base_args(tiny_model_dir, data_dir, out, train_n=2, eval_n=2,
                                           save_checkpoints=True)) == 0
    (out / "baseline_completions.json").unlink()
    capsys.readouterr()
    assert eval_online_sdpo.main(base_args(tiny_model_dir, data_dir, out, train_n=2, eval_n=2, save_checkpoints=True,
                                           resume=True)) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("eval_online_sdpo.py: error:")]
    assert "baseline_completions.json is missing; the baseline (the initial policy) cannot be rebuilt" in line
    assert "Traceback" not in err
