"""The project's vLLM paths on a real vLLM engine (`make test-vllm`: the CPU build vllm-cpu 0.32 in .venv-vllm).

Each test starts real engines (SmolLM2-135M, embedded, and a tiny Qwen3 whose chat template has
`enable_thinking`), in the dtype of the HF model (fp32 on CPU), greedy, so that every reply can be
compared token for token with HF generation under the same weights and adapter. After each test,
pass or fail, no engine process (VLLM::EngineCore, VLLM::Worker) of this process may be left.
Marked `vllm`: `make test` leaves them out, and they skip where vLLM is not installed.
"""
import json
import os
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: the default takes a share of the RAM
vllm = pytest.importorskip("vllm")
psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.vllm

SMOLLM2 = "smollm2-135m-instruct"
SAMPLES = ["--train_jsonl", "data/samples/train.jsonl", "--val_jsonl", "data/samples/validation.jsonl"]


def alive(process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def engine_processes() -> list:
    """This process's descendants that are vLLM engine processes (their titles start with VLLM::)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if alive(child) and child.name().startswith("VLLM"):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.fixture(autouse=True)
def no_engine_left_behind():
    """Every engine a test started is stopped when it ends, even when it fails: an engine the code under
    test left running fails the test, and so does a process that outlives its engine's shutdown (it is
    killed, so that the next test has the machine)."""
    yield
    import multiprocessing

    from auxiliary.runtime.vllm_adapter import live_engines, shutdown_engines

    left_running = live_engines()
    processes = engine_processes()  # the workers are the engine's children: listed before it stops
    shutdown_engines()  # a no-op when the code under test stopped its engines, as it must
    deadline = time.monotonic() + 20  # a stopped engine's worker is killed, not waited for
    while any(alive(p) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.5)
        multiprocessing.active_children()  # reaps the engine processes that are our children
    stragglers = [f"{p.pid} {p.name()}" for p in processes if alive(p)]
    for process in processes:
        if alive(process):
            process.kill()
    assert not left_running, f"{left_running} engine(s) left running by the code under test"
    assert not stragglers, f"engine processes alive 20 s after their engine stopped: {stragglers}"


def hf_greedy(model, tokenizer, conversations, max_new_tokens):
    from auxiliary.runtime.generation import generate_responses

    return [r.ids for r in generate_responses(model, tokenizer, conversations, max_new_tokens, 0.0, 1.0, 8, None, None)]


def test_online_run_engine_answers_with_the_trained_adapter(tmp_path, monkeypatch):
    """--use_vllm --use_lora: after each update the engine's greedy replies are HF's under the same adapter."""
    import eval_online_sdpo
    from online_sdpo_updater import OnlineSDPOUpdater

    compared, changed = [], []
    generate = OnlineSDPOUpdater.generate

    def generate_and_compare(self, conversations, max_new_tokens=None, *args, **kwargs):
        replies = generate(self, conversations, max_new_tokens, *args, **kwargs)
        limit = max_new_tokens or self.config.max_new_tokens
        conversations = [list(c) for c in conversations]
        hf = hf_greedy(self.model, self.tokenizer, conversations, limit)
        compared.append((self.step, [r.ids for r in replies], hf))
        with self.model.disable_adapter():
            changed.append(hf != hf_greedy(self.model, self.tokenizer, conversations, limit))
        return replies

    monkeypatch.setattr(OnlineSDPOUpdater, "generate", generate_and_compare)
    adapter_folders = set(Path(tempfile.gettempdir()).glob("sdpo_vllm_adapter_*"))
    out = tmp_path / "run"
    code = eval_online_sdpo.main(["--model", SMOLLM2, *SAMPLES, "--use_vllm", "--use_lora", "--lora_r", "8",
                                  "--lr", "3e-3", "--temperature", "0", "--max_new_tokens", "24",
                                  "--eval_max_new_tokens", "24", "--train_n", "3", "--eval_n", "2", "--eval_every", "0",
                                  "--style", "concise", "--output_dir", str(out)])
    assert code == 0
    steps = [step for step, _, _ in compared]
    assert steps[0] == 0 and steps[-1] == 3 and len(set(steps)) == 4  # before the updates, after each one
    for step, engine_ids, hf_ids in compared:
        assert engine_ids == hf_ids, f"step {step}: the engine's replies are not the trained policy's"
    assert any(changed), "the adapter never changed a reply: the comparison would not see a stale adapter"
    assert len((out / "metrics.jsonl").read_text().splitlines()) >= 3
    assert set(Path(tempfile.gettempdir()).glob("sdpo_vllm_adapter_*")) == adapter_folders  # its own removed


def test_vllm_user_and_judge_share_one_engine_with_thinking_off(tmp_path, monkeypatch):
    """--user_simulator vllm --judge vllm on the same model: one engine answers both, every prompt with the
    template's thinking switch off (the tiny Qwen3's template has `enable_thinking`, as Qwen3's)."""
    import eval_online_sdpo
    from auxiliary.runtime.tiny_model import save_tiny_model

    tiny = save_tiny_model(tmp_path / "tiny_qwen3", hidden_size=128)  # vLLM's CPU attention needs head_dim >= 32
    engines, prompts = set(), []
    chat = vllm.LLM.chat

    def recording_chat(self, messages, *args, **kwargs):
        outputs = chat(self, messages, *args, **kwargs)
        engines.add(id(self))
        prompts.extend(o.prompt for o in outputs)
        return outputs

    monkeypatch.setattr(vllm.LLM, "chat", recording_chat)
    code = eval_online_sdpo.main(["--model", tiny, *SAMPLES, "--user_simulator", "vllm", "--user_model_name_or_path",
                                  tiny, "--judge", "vllm", "--judge_model", tiny, "--train_n", "2", "--eval_n", "2",
                                  "--eval_every", "0", "--max_new_tokens", "8", "--eval_max_new_tokens", "8",
                                  "--judge_max_new_tokens", "4", "--style", "concise", "--output_dir",
                                  str(tmp_path / "run")])
    assert code == 0
    assert len(engines) == 1 and len(prompts) >= 2 + 2 * 2  # the follow-ups, and both orders of each judged pair
    assert all(p.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") for p in prompts), prompts[0]


def test_eval_checkpoints_with_a_lora_and_a_full_checkpoint(tmp_path):
    """--use_vllm: the baseline and a LoRA checkpoint on one engine, a full checkpoint on its own; each
    checkpoint's replies are HF's for the same weights."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from auxiliary.eval_checkpoints import main
    from auxiliary.evals.evaluation_helpers import prompt_as_messages
    from auxiliary.runtime.model_loading import load_model_and_tokenizer
    from auxiliary.runtime.tiny_model import save_tiny_model

    base, tokenizer, base_path = load_model_and_tokenizer(SMOLLM2, device="cpu")
    torch.manual_seed(0)
    adapter = tmp_path / "adapter"  # a random B: the adapter changes the replies
    get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                    init_lora_weights=False)).save_pretrained(adapter)
    full = save_tiny_model(tmp_path / "full", hidden_size=128, seed=1)
    out, n, limit = tmp_path / "out", 3, 16
    assert main(["--baseline_model", SMOLLM2, "--checkpoints", f"{adapter} {full}", "--eval_styles", "concise",
                 "--judge", "rule", "--eval_n", str(n), "--data_dir", "data/samples", "--max_new_tokens", str(limit),
                 "--temperature", "0", "--n_bootstrap", "20", "--output_dir", str(out), "--use_vllm"]) == 0
    records = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    by_source = {}
    for record in records:
        by_source.setdefault(record["source"], []).append(record)
    assert sorted(by_source) == ["adapter", "baseline", "full"] and all(len(v) == n for v in by_source.values())
    conversations = [prompt_as_messages(r["prompt"]) for r in by_source["baseline"]]

    def texts(model, tok):
        replies = hf_greedy(model, tok, conversations, limit)
        return [tok.decode(ids, skip_special_tokens=True).strip() for ids in replies]

    base, tokenizer, _ = load_model_and_tokenizer(SMOLLM2, device="cpu")
    assert [r["completion"] for r in by_source["baseline"]] == texts(base, tokenizer)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    assert [r["completion"] for r in by_source["adapter"]] == texts(merged, tokenizer)
    assert by_source["adapter"] != by_source["baseline"]
    tiny, tiny_tokenizer, _ = load_model_and_tokenizer(full, device="cpu")
    assert [r["completion"] for r in by_source["full"]] == texts(tiny, tiny_tokenizer)
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [r["checkpoint"] for r in rows] == ["adapter", "full"]


def test_incontext_oracle_on_one_engine(tmp_path):
    from auxiliary.eval_incontext_oracle import main
    from auxiliary.evals.evaluation_helpers import prompt_as_messages
    from auxiliary.feedback.personas import get_persona
    from auxiliary.eval_incontext_oracle import OracleArgs, with_persona
    from auxiliary.runtime.model_loading import load_model_and_tokenizer

    out, limit = tmp_path / "oracle", 16
    assert main(["--model", SMOLLM2, "--eval_styles", "concise", "--judge", "rule", "--eval_n", "2", "--data_dir",
                 "data/samples", "--max_new_tokens", str(limit), "--temperature", "0", "--n_bootstrap", "20",
                 "--output_dir", str(out), "--use_vllm"]) == 0
    records = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    oracle = [r for r in records if r["source"] != "baseline"]
    assert len(oracle) == 2
    model, tokenizer, _ = load_model_and_tokenizer(SMOLLM2, device="cpu")
    system_text = OracleArgs().oracle_system_template.format(persona=get_persona("concise"))
    conversations = [with_persona(prompt_as_messages(r["prompt"]), system_text) for r in oracle]
    hf = [tokenizer.decode(ids, skip_special_tokens=True).strip()
          for ids in hf_greedy(model, tokenizer, conversations, limit)]
    assert [r["completion"] for r in oracle] == hf


@pytest.mark.parametrize("flags, expected", [
    (["--vllm_enable_sleep_mode"], "--vllm_enable_sleep_mode: this vLLM has no sleep mode here"),
    (["--vllm_gpu_start", "0"], "GPUs 0..0 (first GPU 0, tensor parallel 1) requested, but 0 are visible"),
])
def test_what_the_cpu_build_cannot_do_is_refused_in_one_line(flags, expected, tmp_path, capsys):
    import eval_online_sdpo

    code = eval_online_sdpo.main(["--model", SMOLLM2, *SAMPLES, "--use_vllm", "--use_lora", "--train_n", "1",
                                  "--eval_n", "1", "--output_dir", str(tmp_path / "run"), *flags])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("eval_online_sdpo.py: error:")]
    assert code == 2 and len(lines) == 1 and expected in lines[0]
