"""Offline SDPO end to end on a tiny model: train, log, save, reload, resume, LoRA, and 2 CPU processes."""
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offline_sdpo.main_offline_sdpo import CONFIG_FILENAME, OfflineSDPOArguments, main
from reliability_helpers import read_metrics, run_in_process

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "offline" / "interactions.jsonl"
SECRET = "sk-test-not-a-real-key-1234567890"
SDPO_METRICS = ("loss", "signal_mean", "signal_std", "signal_seq_mean", "logp_x", "logp_xo", "eos_signal")


def common_flags(model_dir, out_dir):
    return ["--base_model", str(model_dir), "--train_jsonl", str(FIXTURE), "--output_dir", str(out_dir),
            "--learning_rate", "1e-3", "--warmup_ratio", "0", "--lr_scheduler_type", "constant", "--save_steps", "2"]


def state_dict(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).state_dict()


@pytest.fixture(scope="module")
def three_steps(tiny_model_dir, tmp_path_factory):
    """3 optimizer steps of 2 micro-batches of 2 interactions (8 records per epoch), one process."""
    out = tmp_path_factory.mktemp("offline_run")
    yaml_file = out.parent / "offline.yaml"
    yaml_file.write_text("batch_size: 2\ngrad_accum: 2\nmax_steps: 3\n")  # YAML keys are flags too
    os.environ["ANTHROPIC_API_KEY"] = SECRET  # must never reach any output file
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            result = run_in_process(main, common_flags(tiny_model_dir, out) + ["--config", str(yaml_file)])
    finally:
        os.environ.pop("ANTHROPIC_API_KEY", None)
    result["printed"] = printed.getvalue()
    return out, result


def test_one_process_trains_logs_and_saves_a_loadable_model(three_steps, tiny_model_dir):
    out, result = three_steps
    assert result["global_step"] == 3 and result["interactions_seen"] == 12
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for line in metrics:
        assert all(math_is_finite(line[k]) for k in SDPO_METRICS), line
        assert line["learning_rate"] == pytest.approx(1e-3)
        assert line["completion_tokens"] > 1
    trained, base = state_dict(out), state_dict(tiny_model_dir)
    changed = [k for k in base if not torch.equal(trained[k], base[k])]
    assert len(changed) == len(base)  # full fine-tuning moved every tensor
    assert (out / "checkpoint-2" / "optimizer.pt").exists() and (out / "checkpoint-2" / "trainer_state.json").exists()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out)).chat_template


def test_the_run_prints_plain_numbers_and_plots_its_training(three_steps):
    out, result = three_steps
    lines = [line for line in result["printed"].splitlines() if line.startswith("step ") and "  loss " in line]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"], result["printed"]
    first = read_metrics(out)[0]
    assert f"  loss {first['loss']:.4g}  " in lines[0] and "'" not in lines[0]
    assert "{'loss'" not in result["printed"]  # transformers' dict of quoted strings is gone
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resolved_config_is_saved_without_secrets(three_steps):
    out, _ = three_steps
    config = json.loads((out / CONFIG_FILENAME).read_text())
    assert config["batch_size"] == 2 and config["grad_accum"] == 2  # from the YAML file
    assert config["lr"] == 1e-3 and config["ignore_first_k"] == 2 and config["loss_mode"] == "simple_signal"
    resolved = config["resolved"]
    assert resolved["precision"] == "fp32" and resolved["optim"] == "adamw_torch"  # CPU choices
    assert resolved["effective_batch_size"] == 4 and resolved["world_size"] == 1
    assert resolved["data"] == {"path": str(FIXTURE), "read": 10, "kept": 8,
                                "skipped": {"empty completion": 1, "empty user_response": 1}}
    for file in out.rglob("*"):
        if file.is_file() and file.suffix in (".json", ".jsonl", ".txt", ".md", ".bin"):
            assert SECRET.encode() not in file.read_bytes(), file


def test_resume_continues_the_step_count_exactly(three_steps, tiny_model_dir, tmp_path):
    out, _ = three_steps
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoint-3")  # as if the job had died after step 2
    flags = common_flags(tiny_model_dir, resumed) + ["--batch_size", "2", "--grad_accum", "2", "--max_steps", "3"]
    result = run_in_process(main, flags + ["--resume_from_checkpoint", "latest"])
    assert result["global_step"] == 3 and result["interactions_seen"] == 4  # only step 3 was trained
    metrics = read_metrics(resumed)
    assert [m["step"] for m in metrics] == [1, 2, 3]  # the old step-3 line was dropped, the new one written
    # optimizer, schedule, RNG and data position all restored: step 3 is the same as without the interruption
    assert metrics[2]["loss"] == pytest.approx(read_metrics(out)[2]["loss"], rel=1e-5)
    resumed_weights, straight_weights = state_dict(resumed), state_dict(out)
    for key, value in straight_weights.items():
        torch.testing.assert_close(resumed_weights[key], value, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        run_in_process(main, flags + ["--resume_from_checkpoint", str(tmp_path / "nowhere")])


def test_lora_with_reference_kl_and_full_distillation(tiny_model_dir, tmp_path):
    out = tmp_path / "lora"
    result = run_in_process(main, common_flags(tiny_model_dir, out) + [
        "--batch_size", "4", "--grad_accum", "1", "--max_steps", "1", "--learning_rate", "1e-2",
        "--use_lora", "--lora_r", "4", "--lora_alpha", "8", "--beta", "0.1", "--loss_mode", "full_distillation"])
    assert result["global_step"] == 1
    (line,) = read_metrics(out)
    assert line["ref_kl"] == pytest.approx(0.0, abs=1e-6)  # the policy equals the reference before the first step
    assert line["distill_kl"] >= 0
    assert (out / "adapter" / "adapter_config.json").exists()
    merged, base = state_dict(out), state_dict(tiny_model_dir)
    assert set(merged) == set(base)  # a plain model, no LoRA keys
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed and all(k.endswith("proj.weight") for k in changed)  # only the adapted linear layers moved


def test_cli_errors_are_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.delenv("OUTPUT_DIR", raising=False)
    with pytest.raises(SystemExit, match="--train_jsonl is required"):
        main([])
    with pytest.raises(SystemExit, match="OUTPUT_DIR"):
        main(["--train_jsonl", str(FIXTURE)])
    with pytest.raises(SystemExit, match="unknown loss_mode 'bogus'"):
        main(["--train_jsonl", str(FIXTURE), "--output_dir", str(tmp_path), "--loss_mode", "bogus"])
    monkeypatch.setenv("OUTPUT_DIR", str(tmp_path / "from_env"))
    assert OfflineSDPOArguments(train_jsonl="x").output_dir == str(tmp_path / "from_env")
    assert OfflineSDPOArguments(train_jsonl="x", output_dir="flag").output_dir == "flag"


def test_malformed_data_fails_before_training(tiny_model_dir, tmp_path):
    from auxiliary.runtime.io_utils import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text(FIXTURE.read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        run_in_process(main, common_flags(tiny_model_dir, tmp_path / "out") + ["--train_jsonl", str(bad)])
    assert not (tmp_path / "out" / "checkpoint-1").exists()


@pytest.mark.slow  # two extra Python processes: ~20 s alone, more on a busy machine
def test_two_cpu_processes_match_one_process_with_accumulation(three_steps, tiny_model_dir, tmp_path):
    """torchrun, 2 ranks x 1 micro-batch == 1 rank x 2 accumulated micro-batches: same data, same losses."""
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "offline_sdpo" / "main_offline_sdpo.py"), *common_flags(tiny_model_dir, out),
               "--batch_size", "2", "--grad_accum", "1", "--max_steps", "3"]
    proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "rank 0/2: trained on 6 interactions" in output and "rank 1/2: trained on 6 interactions" in output
    assert output.count("steps, final model in") == 1  # only rank 0 reports (and writes)
    # one checkpoint per save (step 2, and the last step), not one per rank
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-3"]
    state = json.loads((out / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3]  # logged once per step
    ddp, single = read_metrics(out), read_metrics(three_steps[0])
    assert [m["step"] for m in ddp] == [1, 2, 3]
    for mine, reference in zip(ddp, single):
        for key in SDPO_METRICS:
            assert mine[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-6), key
    ddp_weights, single_weights = state_dict(out), state_dict(three_steps[0])
    for key, value in single_weights.items():
        torch.testing.assert_close(ddp_weights[key], value, rtol=1e-4, atol=1e-6)


def math_is_finite(value):
    return isinstance(value, (int, float)) and value == value and abs(value) != float("inf")


def test_optimizer_and_precision_follow_the_machine(monkeypatch):
    import importlib.util

    from offline_sdpo import main_offline_sdpo as entry

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert entry.resolve_optim("auto") == "adamw_torch" and entry.resolve_precision("auto") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a))
    assert entry.resolve_optim("auto") == "adamw_bnb_8bit"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # bitsandbytes cannot update FSDP's sharded tensors
    assert entry.resolve_optim("auto") == "adamw_torch"
    assert entry.resolve_optim("adafactor") == "adafactor" and entry.resolve_precision("fp16") == "fp16"


def test_an_earlier_run_is_never_overwritten_silently(three_steps, tiny_model_dir, tmp_path, capsys):
    out, _ = three_steps
    earlier = shutil.copytree(out, tmp_path / "earlier")
    before = (earlier / "metrics.jsonl").read_bytes()
    flags = common_flags(tiny_model_dir, earlier) + ["--batch_size", "2", "--grad_accum", "2", "--max_steps", "1"]
    with pytest.raises(SystemExit) as refused:
        run_in_process(main, flags)
    assert "already holds an earlier run" in str(refused.value) and "--overwrite" in str(refused.value)
    assert (earlier / "metrics.jsonl").read_bytes() == before and (earlier / "checkpoint-3").is_dir()
    result = run_in_process(main, flags + ["--overwrite"])
    assert result["global_step"] == 1 and not (earlier / "checkpoint-3").exists()
    assert [m["step"] for m in read_metrics(earlier)] == [1]


def test_overwrite_with_bad_input_deletes_nothing(three_steps, tiny_model_dir, tmp_path):
    from auxiliary.runtime.io_utils import DataError
    from auxiliary.runtime.model_loading import ModelLoadError

    out, _ = three_steps
    earlier = shutil.copytree(out, tmp_path / "earlier")
    def checksums():
        return {str(p.relative_to(earlier)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(earlier.rglob("*")) if p.is_file()}

    before = checksums()
    flags = common_flags(tiny_model_dir, earlier) + ["--max_steps", "1", "--overwrite"]
    for bad in (["--train_jsonl", str(tmp_path / "missing.jsonl")], ["--base_model", str(tmp_path / "no_model")]):
        with pytest.raises((DataError, ModelLoadError)):
            run_in_process(main, flags + bad)
        assert checksums() == before  # the checks come before any deletion, and nothing is written either


def test_overwrite_refuses_a_model_folder_no_run_of_ours_wrote(tiny_model_dir, tmp_path):
    RUN_MARKER = ".sdpo_run.json"

    user = shutil.copytree(tiny_model_dir, tmp_path / "my_model")
    (user / "adapter").mkdir()
    os.chmod(user, 0o755)
    before = {p.name: p.read_bytes() for p in user.iterdir() if p.is_file()}
    with pytest.raises(SystemExit) as refused:
        run_in_process(main, common_flags(tiny_model_dir, user) + ["--max_steps", "1", "--overwrite"])
    assert f"not the run marker {RUN_MARKER}" in str(refused.value) and "nothing was deleted" in str(refused.value)
    assert {p.name: p.read_bytes() for p in user.iterdir() if p.is_file()} == before and (user / "adapter").is_dir()
    assert os.stat(user).st_mode & 0o777 == 0o755


@pytest.mark.parametrize("forgery", ["empty", "link"])
def test_overwrite_refuses_a_folder_whose_run_marker_is_forged(tmp_path, forgery):
    from offline_sdpo.main_offline_sdpo import BadInput, OfflineTrainingArguments, check_output_dir

    real = tmp_path / "real_run"
    real.mkdir()
    check_output_dir(OfflineTrainingArguments(output_dir=str(real)))  # writes a genuine marker
    user = tmp_path / "mine"
    user.mkdir()
    (user / "config.json").write_text("mine")
    if forgery == "empty":
        (user / ".sdpo_run.json").write_text("")
    else:
        (user / ".sdpo_run.json").symlink_to(real / ".sdpo_run.json")
    with pytest.raises(BadInput, match="not the run marker .sdpo_run.json"):
        check_output_dir(OfflineTrainingArguments(output_dir=str(user), overwrite=True))
    assert (user / "config.json").read_text() == "mine"


def test_a_hub_model_that_cannot_be_fetched_stops_with_one_line_naming_what_it_needs(tmp_path):
    """Without network the wrapper's default model (a hub id not in the cache) was a 100-line traceback through
    huggingface_hub; now one line: the model, the first line of transformers' reason, and what a hub id needs."""
    from auxiliary.runtime.model_loading import ModelLoadError

    out = tmp_path / "out"
    with pytest.raises(ModelLoadError) as caught:
        run_in_process(main, ["--train_jsonl", str(FIXTURE), "--output_dir", str(out),
                              "--base_model", "sdpo-tests/not-in-any-cache"])
    line = str(caught.value)
    assert "\n" not in line and line.startswith("could not load model 'sdpo-tests/not-in-any-cache': ")
    assert "it needs the Hugging Face hub or a copy in the cache" in line and "smollm2-135m-instruct" in line


def test_a_missing_train_jsonl_says_where_interactions_come_from(tmp_path):
    """A paper preset's data/wildfeedback/... before prepare_data.sh said only 'file not found'."""
    from auxiliary.runtime.io_utils import DataError

    missing = tmp_path / "wildfeedback_interactions.jsonl"
    with pytest.raises(DataError) as caught:
        run_in_process(main, ["--train_jsonl", str(missing), "--output_dir", str(tmp_path / "out"),
                              "--base_model", "tiny-random"])
    assert str(caught.value).startswith(f"--train_jsonl {missing}: file not found. scripts/prepare_data.sh writes")
    assert "data/samples/interactions.jsonl" in str(caught.value)
