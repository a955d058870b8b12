"""The SFT baseline (offline_sdpo/main_offline_sft.py) next to offline SDPO, on the same fixture and a tiny model:
it learns the logged replies, only completion tokens carry loss, LoRA works, the run folder has the SDPO
trainer's layout, bad input is one line with exit 2, and the wrappers resolve the SFT entry point."""
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offline_sdpo.main_offline_sdpo import main as sdpo_main
from offline_sdpo.main_offline_sft import CONFIG_FILENAME, OfflineSFTArguments, main as sft_main
from reliability_helpers import main_block, read_metrics, run_in_process

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "offline" / "interactions.jsonl"
SHORT_RUN = ["--batch_size", "2", "--grad_accum", "2", "--max_steps", "3"]


def flags(model_dir, out_dir):
    return ["--base_model", str(model_dir), "--train_jsonl", str(FIXTURE), "--output_dir", str(out_dir),
            "--learning_rate", "1e-3", "--warmup_ratio", "0", "--lr_scheduler_type", "constant", "--save_steps", "2"]


def load_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def training_pairs(model_dir):
    """(prompt ids, completion ids) of every kept record, built here from the chat template and the tokenizer."""
    from transformers import AutoTokenizer

    from offline_sdpo.offline_sdpo_trainer import load_interactions
    from sdpo_objective import render_context_ids

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    records, _ = load_interactions(FIXTURE)
    return [(render_context_ids(tokenizer, r["prompt"]),
             tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
            for r in records]


@torch.no_grad()
def completion_logprobs(model, pairs) -> list[torch.Tensor]:
    """Per-token log p(y_t | x, y_<t) of each pair, one unpadded sequence at a time."""
    out = []
    for prompt, completion in pairs:
        ids = torch.tensor([prompt + completion])
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
        targets = ids[0, 1:]
        out.append(logp[torch.arange(len(targets)), targets][len(prompt) - 1:])
    return out


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """3 optimizer steps of each trainer from the same file, same flags."""
    base = tmp_path_factory.mktemp("sft_and_sdpo")
    sft = run_in_process(sft_main, flags(tiny_model_dir, base / "sft") + SHORT_RUN)
    sdpo = run_in_process(sdpo_main, flags(tiny_model_dir, base / "sdpo") + SHORT_RUN)
    return {"sft": (base / "sft", sft), "sdpo": (base / "sdpo", sdpo)}


def test_sft_and_sdpo_train_on_the_same_records_and_sft_learns_the_replies(runs, tiny_model_dir):
    (sft_out, sft), (_, sdpo) = runs["sft"], runs["sdpo"]
    assert sft["global_step"] == sdpo["global_step"] == 3
    assert sft["config"]["resolved"]["data"] == sdpo["config"]["resolved"]["data"] == {
        "path": str(FIXTURE), "read": 10, "kept": 8, "skipped": {"empty completion": 1, "empty user_response": 1}}
    losses = [m["loss"] for m in read_metrics(sft_out)]
    assert [m["step"] for m in read_metrics(sft_out)] == [1, 2, 3] and losses[-1] < losses[0]
    pairs = training_pairs(tiny_model_dir)
    before = torch.cat(completion_logprobs(load_model(tiny_model_dir), pairs)).mean()
    after = torch.cat(completion_logprobs(load_model(sft_out), pairs)).mean()
    assert after > before + 0.05  # the logged replies became likelier
    assert sft["config"]["resolved"]["completion_tokens"] == sum(len(c) for _, c in pairs)


def test_only_completion_tokens_carry_loss_and_padding_changes_nothing(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    from offline_sdpo.main_offline_sft import build_sft_config, build_sft_dataset
    from offline_sdpo.offline_sdpo_trainer import load_interactions

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # build_training_arguments sets it; restored after
    cfg = OfflineSFTArguments(model=str(tiny_model_dir), train_jsonl=str(FIXTURE), output_dir=str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    records, _ = load_interactions(FIXTURE)
    model = load_model(tiny_model_dir)
    trainer = SFTTrainer(model=model, args=build_sft_config(cfg, "fp32", "adamw_torch"),
                         train_dataset=build_sft_dataset(records, tokenizer, cfg), processing_class=tokenizer)
    pairs = training_pairs(tiny_model_dir)
    examples = [trainer.train_dataset[i] for i in range(len(pairs))]
    for example, (prompt, completion) in zip(examples, pairs):
        assert example["input_ids"] == prompt + completion
        assert example["labels"] == [-100] * len(prompt) + completion  # the prompt is masked out
    # TRL's loss over a padded batch == the mean NLL of the completion tokens, each sequence scored alone
    expected = -torch.cat(completion_logprobs(model, pairs)).mean()
    with torch.no_grad():
        for size in (len(pairs), 3):
            loss = trainer.compute_loss(model, trainer.data_collator(examples[:size]))
            reference = -torch.cat(completion_logprobs(model, pairs[:size])).mean()
            assert float(loss) == pytest.approx(float(reference), rel=1e-5)
    assert float(loss) != pytest.approx(float(expected), rel=1e-3)  # the subset really is another number


def test_lora_trains_an_adapter_and_saves_a_merged_model(tiny_model_dir, tmp_path):
    out = tmp_path / "lora"
    result = run_in_process(sft_main,
                            flags(tiny_model_dir, out) + ["--batch_size", "4", "--grad_accum", "1", "--max_steps", "1",
                                                              "--learning_rate", "1e-2", "--use_lora", "--lora_r", "4",
                                                              "--lora_alpha", "8"])
    assert result["global_step"] == 1 and (out / "adapter" / "adapter_config.json").exists()
    merged, base = load_model(out).state_dict(), load_model(tiny_model_dir).state_dict()
    assert set(merged) == set(base)  # a plain model, no LoRA keys
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed and all(k.endswith("proj.weight") for k in changed)  # only the adapted linear layers moved


def test_the_run_folder_has_the_sdpo_trainers_layout(runs):
    def names(folder):
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                      if "adapter" not in p.parts and p.name not in ("rng_state.pth",))

    sft_out, sdpo_out = runs["sft"][0], runs["sdpo"][0]
    # the one renamed file, and TRL's model card
    sft_names = [n for n in names(sft_out) if n not in (CONFIG_FILENAME, "README.md")]
    sdpo_names = [n for n in names(sdpo_out) if n != "offline_sdpo_config.json"]
    assert sft_names == sdpo_names
    assert "checkpoint-2/optimizer.pt" in sft_names and "model.safetensors" in sft_names
    config = json.loads((sft_out / CONFIG_FILENAME).read_text())
    assert config["resolved"]["method"] == "sft" and config["resolved"]["effective_batch_size"] == 4
    assert config["lr"] == 1e-3 and "loss_mode" not in config and "hindsight_template" not in config


def test_flags_and_defaults_are_the_sdpo_trainers():
    from offline_sdpo.main_offline_sdpo import OfflineSDPOArguments

    sft, sdpo = OfflineSFTArguments(), OfflineSDPOArguments()
    assert vars(sft) == {k: vars(sdpo)[k] for k in vars(sft)}  # every setting SFT has, with SDPO's default
    from auxiliary.runtime.cli import parse_dataclasses

    (parsed,) = parse_dataclasses([OfflineSFTArguments], ["--base_model", "m", "--learning_rate", "3e-6",
                                                          "--per_device_train_batch_size", "2"])
    assert (parsed.model, parsed.lr, parsed.batch_size) == ("m", 3e-6, 2)


def test_bad_input_is_one_line_naming_file_line_and_field_with_exit_2(tiny_model_dir, tmp_path, capsys):
    from auxiliary.runtime.io_utils import DataError

    good = FIXTURE.read_text().splitlines()
    missing = dict(json.loads(good[0]))
    missing.pop("completion")
    (tmp_path / "missing.jsonl").write_text(good[0] + "\n" + json.dumps(missing) + "\n")
    with pytest.raises(DataError, match=r"missing\.jsonl:2: missing field\(s\) completion"):
        run_in_process(sft_main,
                       flags(tiny_model_dir, tmp_path / "out1") + ["--train_jsonl", str(tmp_path / "missing.jsonl")])
    (tmp_path / "bad.jsonl").write_text(good[0] + "\n{not json\n")
    # the script's own __main__ block (bad input -> one line, exit 2), run in this process: a child adds only imports
    argv = [*flags(tiny_model_dir, tmp_path / "out2"), "--train_jsonl", str(tmp_path / "bad.jsonl")]
    capsys.readouterr()
    code = run_in_process(main_block(REPO / "offline_sdpo" / "main_offline_sft.py"), argv)
    proc = subprocess.CompletedProcess(argv, code, *capsys.readouterr())
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(r"bad\.jsonl:2: malformed JSON", errors[0]) and "Traceback" not in proc.stderr
    assert not (tmp_path / "out2" / "checkpoint-1").exists() and not (tmp_path / "out2" / CONFIG_FILENAME).exists()


# --------------------------------------------------------------------------- DeepSpeed

@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_parse_and_the_wrapper_launches_with_them(stage, tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    path = REPO / "offline_sdpo" / "configs" / f"deepspeed_zero{stage}.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type == "DEEPSPEED" and config.deepspeed_config["zero_stage"] == stage
    assert config.num_processes in (None, -1, 1)  # no process count baked in: --num_processes decides
    env = wrapper_env(tmp_path, TRAIN_JSONL=FIXTURE, WORLD_SIZE="2", ACCELERATE_CONFIG=path)
    (launch,) = printed_commands(subprocess.run(["bash", str(REPO / "scripts" / "train_offline_sft.sh"), "--dry-run"],
                                                env=env, capture_output=True, text=True, timeout=60).stdout)
    assert launch[launch.index("--config_file") + 1] == str(path) and launch[launch.index("--num_processes") + 1] == "2"


@pytest.mark.slow  # two DeepSpeed processes on CPU: ~40 s alone
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="deepspeed not installed (requirements-dev.txt)")
def test_two_cpu_processes_under_zero3_match_one_process(tiny_model_dir, tmp_path):
    """accelerate + DeepSpeed ZeRO-3, 2 ranks x 1 micro-batch == 1 process x 2 accumulated micro-batches."""
    out = tmp_path / "zero3"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--num_processes", "2", "--main_process_port", "29517",
               "--config_file", str(REPO / "offline_sdpo" / "configs" / "deepspeed_zero3.yaml"),
               str(REPO / "offline_sdpo" / "main_offline_sdpo.py"), *flags(tiny_model_dir, out),
               "--batch_size", "2", "--grad_accum", "1", "--max_steps", "3"]
    proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert (out / "checkpoint-2" / "zero_to_fp32.py").exists()  # a DeepSpeed checkpoint: ZeRO really ran
    # The reference: one process on the head path ZeRO-3 takes (its sharded head has no fused head), so
    # both round alike; the fused head's log-probs round differently (tests/test_softcap.py: ~5e-6).
    reference_out = tmp_path / "one_process_checkpointed_head"
    run_in_process(sdpo_main, flags(tiny_model_dir, reference_out) + SHORT_RUN + ["--fused_lm_head", "false"])
    single = read_metrics(reference_out)
    for mine, reference in zip(read_metrics(out), single, strict=True):
        for key in ("loss", "grad_norm", "signal_mean", "logp_x"):
            assert mine[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-6), key
    gathered, straight = load_model(out).state_dict(), load_model(reference_out).state_dict()
    for key, value in straight.items():  # the final save gathered the full weights
        torch.testing.assert_close(gathered[key], value, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- wrappers

def wrapper_env(base_work: Path, **extra) -> dict:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(BASE_WORK=str(base_work), SDPO_ENV_FILE="", SDPO_PYTHON=sys.executable, HF_HUB_OFFLINE="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def printed_commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line) for line in stdout.splitlines() if line.strip() and not line.startswith("#")]


def test_wrapper_dry_run_resolves_the_sft_entry_point_and_touches_nothing(tmp_path):
    base = tmp_path / "work"
    base.mkdir()
    env = wrapper_env(base, TRAIN_JSONL=FIXTURE, BASE_MODEL="my-org/base-7b", LR="3e-5", BS="2", GA="16",
                      NUM_EPOCHS="3", WORLD_SIZE="1")
    result = subprocess.run(["bash", str(REPO / "scripts" / "train_offline_sft.sh"), "--dry-run", "--use_lora"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    (argv,) = printed_commands(result.stdout)
    script = argv.index(str(REPO / "offline_sdpo" / "main_offline_sft.py"))
    assert argv[script - 1] == sys.executable  # WORLD_SIZE=1: plain python
    flags_given = argv[script + 1:]
    for pair in (["--train_jsonl", str(FIXTURE)], ["--base_model", "my-org/base-7b"], ["--learning_rate", "3e-5"],
                 ["--batch_size", "2"], ["--grad_accum", "16"], ["--num_epochs", "3"]):
        assert any(flags_given[i:i + 2] == pair for i in range(len(flags_given))), pair
    output_dir = flags_given[flags_given.index("--output_dir") + 1]
    assert output_dir.startswith(f"{base}/sdpo_outputs/offline_sft_base-7b_") and flags_given[-1] == "--use_lora"
    assert list(base.iterdir()) == []  # a dry run creates nothing
    # two processes: accelerate, as for SDPO; the SLURM template runs this wrapper
    launch = printed_commands(subprocess.run(["bash", str(REPO / "scripts" / "train_offline_sft.sh"), "--dry-run"],
                                             env={**env, "WORLD_SIZE": "2"}, capture_output=True, text=True,
                                             timeout=60).stdout)[0]
    assert "launch" in launch and launch[launch.index("--num_processes") + 1] == "2"
    assert str(REPO / "offline_sdpo" / "main_offline_sft.py") in launch
    slurm = subprocess.run(["bash", str(REPO / "scripts" / "slurm" / "train_offline_sft.sbatch"), "--dry-run"],
                           env={**env, "GPUS_PER_NODE": "2"}, capture_output=True, text=True, timeout=60)
    assert slurm.returncode == 0, slurm.stderr
    (node,) = printed_commands(slurm.stdout)
    assert str(REPO / "offline_sdpo" / "main_offline_sft.py") in node and node[node.index("--num_processes") + 1] == "2"
    # the SDPO wrapper, run directly, still runs SDPO
    sdpo = printed_commands(subprocess.run(["bash", str(REPO / "scripts" / "train_offline_sdpo.sh"), "--dry-run"],
                                           env=env, capture_output=True, text=True, timeout=60).stdout)[0]
    assert str(REPO / "offline_sdpo" / "main_offline_sdpo.py") in sdpo


@pytest.mark.parametrize("script", ["scripts/train_offline_sft.sh", "scripts/slurm/train_offline_sft.sbatch"])
def test_help_equals_the_generated_docs(script, tmp_path):
    result = subprocess.run(["bash", str(REPO / script), "--help"], env=wrapper_env(tmp_path),
                            capture_output=True, text=True, timeout=120)
    rows = [line for line in result.stdout.partition("Read by every wrapper:")[0].splitlines()
            if line.startswith("| `")]
    assert rows and "\n".join(rows) in (REPO / "docs" / "env_vars.md").read_text()
