"""In-context oracle end to end on a tiny model with the rule judge, and its system prompt."""
import json

import pytest

from auxiliary.evals import style_eval
from auxiliary.eval_incontext_oracle import DEFAULT_ORACLE_SYSTEM_TEMPLATE, ORACLE_LABEL, main, with_persona
from auxiliary.runtime.io_utils import read_jsonl
from auxiliary.feedback.personas import get_persona
from auxiliary.feedback.style_judge import RuleBasedJudge

STYLES = ["no_emojis", "no_first_person"]
EVAL_N = 3


@pytest.fixture(scope="module")
def oracle_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("oracle_out")
    code = main(["--model", tiny_model_dir, "--eval_styles", *STYLES, "--judge", "rule", "--eval_n", str(EVAL_N),
                 "--data_dir", "data/samples", "--max_new_tokens", "8", "--seed", "3", "--n_bootstrap", "100",
                 "--output_dir", str(out), "--device", "cpu"])
    assert code == 0
    return out, json.loads((out / "results.json").read_text()), read_jsonl(out / "completions.jsonl")


def test_one_row_per_style_in_the_shared_format(oracle_run):
    _, results, completions = oracle_run
    rows = results["results"]
    assert [(r["checkpoint"], r["kind"], r["style"]) for r in rows] == [(ORACLE_LABEL, "oracle", s) for s in STYLES]
    prompts = [r["prompt"] for r in completions if r["source"] == "baseline"]
    baseline = [r["completion"] for r in completions if r["source"] == "baseline"]
    assert len(prompts) == EVAL_N
    for row in rows:
        oracle = [r["completion"] for r in completions if r["source"] == ORACLE_LABEL and r["style"] == row["style"]]
        assert len(oracle) == EVAL_N
        assert row["decisions"] == RuleBasedJudge(row["style"]).compare(prompts, oracle, baseline)
        assert row["wins"] == row["decisions"].count("A") and row["n"] == EVAL_N
        for key in ("coverage", "win_rate", "se", "se_bootstrap", "mean_length_words", "seconds"):
            assert key in row


def test_persona_changes_the_context(oracle_run):
    """With a random tiny model the persona system prompt changes what is sampled (same seed)."""
    _, _, completions = oracle_run
    baseline = [r["completion"] for r in completions if r["source"] == "baseline"]
    oracle = [r["completion"] for r in completions if r["source"] == ORACLE_LABEL and r["style"] == STYLES[0]]
    assert oracle != baseline


def test_plot_written(oracle_run):
    import matplotlib.image as mpimg

    out, _, _ = oracle_run
    width, height = style_eval.bar_figure_size(1, len(STYLES))
    assert mpimg.imread(out / "winrate.png").shape[:2] == (round(height * 100), round(width * 100))


def test_with_persona_adds_or_merges_system_message():
    system = DEFAULT_ORACLE_SYSTEM_TEMPLATE.format(persona=get_persona("no_emojis"))
    assert get_persona("no_emojis") in system
    user = [{"role": "user", "content": "Hi"}]
    assert with_persona(user, system) == [{"role": "system", "content": system}, *user]
    merged = with_persona([{"role": "system", "content": "Be brief. "}, *user], system)
    assert merged[0] == {"role": "system", "content": f"Be brief.\n\n{system}"} and merged[1:] == user


def test_bad_template_and_missing_data(tiny_model_dir, tmp_path, capsys):
    assert main(["--model", tiny_model_dir, "--oracle_system_template", "no placeholder"]) == 2
    assert "{persona}" in capsys.readouterr().err
    assert main(["--model", tiny_model_dir, "--eval_styles", "no_emojis", "--data_dir", str(tmp_path),
                 "--device", "cpu"]) == 2
    assert "validation.jsonl: prompt file not found" in capsys.readouterr().err


def test_a_judge_model_that_cannot_be_loaded_stops_before_anything_is_generated(tiny_model_dir, tmp_path, capsys,
                                                                                  monkeypatch):
    """As eval_checkpoints: the judge's model is checked before the replies are generated (minutes on a CPU)."""
    monkeypatch.setattr(style_eval, "generate", lambda *a, **k: pytest.fail("generated"))
    code = main(["--model", tiny_model_dir, "--eval_styles", "no_emojis", "--judge", "local",
                 "--judge_model", "sdpo-tests/not-in-any-cache", "--eval_n", "2", "--max_new_tokens", "4",
                 "--data_dir", "data/samples", "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "could not load model 'sdpo-tests/not-in-any-cache'" in err[0]
    assert not (tmp_path / "out").exists()
