"""--interactions_per_update B: B prompts answered in one batched generation, B follow-ups, one update on them.

metrics.jsonl keeps one row per interaction; the rows of a batch share the update's metrics and its `update`
index; the lr schedule counts updates; a resume at an update boundary replays the uninterrupted run.
"""

import pytest
import torch

import eval_online_sdpo
from auxiliary.runtime.seeds import derive_seed
from reliability_helpers import flags_from_values, read_json, read_jsonl, without_timings

TRAIN = [f"Tell me something about topic number {i}." for i in range(5)]
EVAL = [f"Explain idea {i} in simple terms." for i in range(3)]


@pytest.fixture(scope="module")
def data_dir(prompt_dir):
    return prompt_dir("batched_data", TRAIN, EVAL)


def args(model_dir, data_dir, out, **overrides):
    values = {"model": model_dir, "train_jsonl": data_dir / "train.jsonl", "val_jsonl": data_dir / "validation.jsonl",
              "style": "concise", "train_n": 4, "eval_n": 3, "eval_every": 2, "max_new_tokens": 8,
              "eval_max_new_tokens": 8, "lr": 1e-3, "loss_mode": "simple_signal", "output_dir": out, "seed": 7,
              "interactions_per_update": 2}
    values.update(overrides)
    return flags_from_values(values)


@pytest.fixture(scope="module")
def batched_run(tiny_model_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("batched") / "run"
    # A linear decay shows how many updates the schedule spans: ceil(4 / 2) = 2, not 4 interactions.
    assert eval_online_sdpo.main(args(tiny_model_dir, data_dir, out, lr_scheduler="linear")) == 0
    return out


def test_rows_per_interaction_share_their_update(batched_run):
    rows = read_jsonl(batched_run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    arm = [r["feedback"] for r in rows]
    assert [m["update"] for m in arm] == [1, 1, 2, 2]
    for first, second in (arm[:2], arm[2:]):
        assert first["loss"] == second["loss"] and first["grad_norm"] == second["grad_norm"]
    assert arm[0]["loss"] != arm[2]["loss"]
    # linear decay to 0 over 2 updates: the second update runs at half the rate
    assert [m["lr"] for m in arm] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4])
    # evaluations at 0, 2 and the end, each after an update
    assert sorted({r["step"] for r in read_json(batched_run / "eval_history.json")}) == [0, 2, 4]


def test_first_update_equals_one_train_batch_on_the_two_interactions(batched_run, tiny_model_dir):
    """Independently: one batched generation of the first two prompts with the batch's seed, then train_batch
    on them with the follow-ups the run recorded, gives the run's replies and the run's loss."""
    from auxiliary.evals.evaluation_helpers import prompt_as_messages
    from online_sdpo_updater import OnlineSDPOUpdater
    from online_sdpo_updater_config import OnlineSDPOConfig

    updater = OnlineSDPOUpdater(OnlineSDPOConfig(model=str(tiny_model_dir), lr=1e-3, loss_mode="simple_signal",
                                                 max_new_tokens=8, seed=7, device="cpu"))
    train_rows = [r for r in read_jsonl(batched_run / "completions.jsonl") if r["phase"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    conversations = [prompt_as_messages(r["prompt"]) for r in train_rows[:2]]
    replies = updater.generate(conversations, seed=derive_seed(7, "train", 1))
    assert [r["completion"] for r in train_rows[:2]] == [reply.text for reply in replies]
    metrics = updater.train_batch(conversations, [r.ids for r in replies], [r["followup"] for r in train_rows[:2]])
    assert metrics["loss"] == pytest.approx(read_jsonl(batched_run / "metrics.jsonl")[0]["feedback"]["loss"], rel=1e-6)


def test_resume_at_an_update_boundary_equals_the_uninterrupted_run(tiny_model_dir, data_dir, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert eval_online_sdpo.main(args(tiny_model_dir, data_dir, full, save_checkpoints=True, placebo=True)) == 0
    assert eval_online_sdpo.main(args(tiny_model_dir, data_dir, part, train_n=2, save_checkpoints=True,
                                      placebo=True)) == 0
    assert eval_online_sdpo.main(args(tiny_model_dir, data_dir, part, save_checkpoints=True, placebo=True,
                                      resume=True)) == 0
    assert without_timings(read_jsonl(part / "metrics.jsonl")) == without_timings(read_jsonl(full / "metrics.jsonl"))
    assert read_jsonl(part / "completions.jsonl") == read_jsonl(full / "completions.jsonl")
    assert (without_timings(read_json(part / "eval_history.json"))
            == without_timings(read_json(full / "eval_history.json")))
    from safetensors.torch import load_file

    for arm in ("feedback", "placebo"):
        a = load_file(full / f"checkpoints/{arm}/step_000004/model/model.safetensors")
        b = load_file(part / f"checkpoints/{arm}/step_000004/model/model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("overrides, expected", [
    ({"eval_every": 3}, "--eval_every 3 must be a multiple of --interactions_per_update 2"),
    ({"save_checkpoints": True, "checkpoint_every": 3}, "--checkpoint_every 3 must be a multiple"),
    ({"style_schedule": "concise:3,detailed:1"}, "concise:3 is not"),
    ({"users": "concise,no_emojis", "per_user_adapters": True, "use_lora": True},
     "--per_user_adapters needs --interactions_per_update 1"),
    ({"interactions_per_update": 0}, "interactions_per_update"),
])
def test_batches_that_do_not_fit_are_refused_in_one_line(overrides, expected, tiny_model_dir, data_dir, tmp_path,
                                                          capsys):
    code = eval_online_sdpo.main(args(tiny_model_dir, data_dir, tmp_path / "out", **overrides))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("eval_online_sdpo.py: error:")]
    assert code == 2 and len(lines) == 1 and expected in lines[0], err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
