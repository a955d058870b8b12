"""Our vLLM adapters against a recording stand-in for the `vllm` package, for what the CPU build cannot show.

The stand-in follows vLLM 0.32 as tests/test_vllm_real.py runs it (`make test-vllm`, the CPU build): a
reply that stopped on EOS keeps it in token_ids, LoRARequest(lora_name, lora_int_id, lora_path), the
engine's processes stop with llm.llm_engine.engine_core.shutdown(). What stays here only: GPU placement
(CUDA_VISIBLE_DEVICES while an engine starts), sleep mode (refused by vLLM on CPU), the exact calls we
make (SamplingParams, prompts, retries, verdicts), at unit-test speed.
"""
import json
import os
import sys
import types
from pathlib import Path

import pytest

from online_sdpo_updater import OnlineSDPOUpdater
from online_sdpo_updater_config import OnlineSDPOConfig
from sdpo_objective import render_context_ids


class Recorder:
    llms: list = []
    token_scripts: list = []  # (token ids, finish reason) per prompt, for whichever engine generates


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class FakeLoRARequest:
    def __init__(self, lora_name, lora_int_id, lora_path="", base_model_name=None, load_inplace=False):
        self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path


class FakeLLM:
    """Replies from a script: generate() pops token-id lists, chat() pops texts."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.visible_gpus = os.environ.get("CUDA_VISIBLE_DEVICES")  # what the engine's processes would see
        self.generate_calls, self.chat_calls = [], []
        self.text_scripts = []
        self.tokenizer = types.SimpleNamespace(chat_template="{% if enable_thinking %}{% endif %}")
        self.shutdowns = 0
        self.llm_engine = types.SimpleNamespace(engine_core=types.SimpleNamespace(shutdown=self._shutdown))
        Recorder.llms.append(self)

    def _shutdown(self, timeout=None):
        self.shutdowns += 1

    def get_tokenizer(self):
        return self.tokenizer

    def sleep(self, level=1):
        self.generate_calls.append({"sleep": level})

    def wake_up(self):
        self.generate_calls.append({"wake_up": True})

    def generate(self, prompts, params, lora_request=None, use_tqdm=True):
        self.generate_calls.append({"prompts": prompts, "params": params, "lora_request": lora_request})
        outputs = []
        for _ in prompts:
            ids, reason = Recorder.token_scripts.pop(0)
            outputs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=ids, finish_reason=reason,
                                                                                text="")]))
        return outputs

    def chat(self, conversations, params, use_tqdm=True, **kwargs):
        self.chat_calls.append({"conversations": conversations, "params": params, **kwargs})
        return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=self.text_scripts.pop(0))])
                for _ in conversations]


@pytest.fixture()
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = FakeLLM, FakeSamplingParams
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = FakeLoRARequest
    platforms = types.ModuleType("vllm.platforms")  # a submodule: imported, not an attribute of vllm until then
    # a GPU build: sleep mode exists (the CPU build says no: tests/test_vllm_real.py)
    platforms.current_platform = types.SimpleNamespace(is_sleep_mode_available=lambda: True)
    for name, module in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request),
                         ("vllm.platforms", platforms)):
        monkeypatch.setitem(sys.modules, name, module)
    Recorder.llms, Recorder.token_scripts = [], []
    return Recorder


def test_policy_generation_syncs_lora_adapters_and_keeps_eos(fake_vllm, tiny_model, tiny_tokenizer):
    config = OnlineSDPOConfig(model="my/policy", device="cpu", use_vllm=True, use_lora=True, lora_r=4,
                              lora_target_modules="q_proj,v_proj", max_new_tokens=7, temperature=0.5, top_p=0.9)
    updater = OnlineSDPOUpdater(config, tiny_model, tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    conversations = [[{"role": "user", "content": "hello"}], [{"from": "human", "value": "bye"}]]

    for step in (0, 0, 1):
        updater.step = step
        fake_vllm.token_scripts += [([11, 12, eos], "stop"), ([13, 14, 15], "length")]
        responses = updater.generate(conversations, seed=3)
        # a reply that stopped keeps its EOS (vLLM keeps it in token_ids); a cut one has none
        assert [r.ids for r in responses] == [[11, 12, eos], [13, 14, 15]]
        assert [r.finished for r in responses] == [True, False]

    llm = fake_vllm.llms[0]
    assert len(fake_vllm.llms) == 1  # one engine for the whole run
    assert llm.kwargs["model"] == "my/policy" and llm.kwargs["enable_lora"] and llm.kwargs["max_lora_rank"] == 4
    assert llm.kwargs["dtype"] == "float32"  # the trained model's dtype, not vLLM's bf16 "auto"
    call = llm.generate_calls[0]
    assert call["params"].kwargs == {"max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3,
                                     "stop_token_ids": [eos]}
    assert call["prompts"][1]["prompt_token_ids"] == render_context_ids(tiny_tokenizer, [{"role": "user",
                                                                                          "content": "bye"}])
    requests = [c["lora_request"] for c in llm.generate_calls]
    assert requests[0] is requests[1]  # same step: no new adapter
    assert requests[2].lora_int_id != requests[0].lora_int_id and requests[2].lora_path != requests[0].lora_path
    assert (Path(requests[2].lora_path) / "adapter_config.json").exists()
    assert not Path(requests[0].lora_path).exists()  # an adapter the engine will not ask for again is gone
    updater.close()
    assert llm.shutdowns == 1 and not Path(requests[2].lora_path).parent.exists()  # engine stopped, folder gone


def test_policy_generation_refuses_full_weight_sync(fake_vllm, tiny_model, tiny_tokenizer):
    config = OnlineSDPOConfig(model="my/policy", device="cpu", use_vllm=True)
    updater = OnlineSDPOUpdater(config, tiny_model, tiny_tokenizer)
    with pytest.raises(ValueError, match="--use_lora"):
        updater.generate([[{"role": "user", "content": "hi"}]])


def test_vllm_user_turns_thinking_off_and_samples_empty_follow_ups_again(fake_vllm):
    from auxiliary.feedback.user_simulator import EmptyFeedbackError
    from auxiliary.feedback.vllm_user_simulator import VLLMUserSimulator

    llm = FakeLLM()
    user = VLLMUserSimulator(None, "concise", llm=llm, max_new_tokens=50, temperature=0.7)
    llm.text_scripts += ["Too long.", "  ", "", "<think>x</think>Shorter please."]
    assert user.generate_feedback(["q1", "q2"], ["a1", "a2"]) == ["Too long.", "Shorter please."]
    assert [len(c["conversations"]) for c in llm.chat_calls] == [2, 1, 1]  # only the empty one asked again, twice
    assert llm.chat_calls[0]["chat_template_kwargs"] == {"enable_thinking": False}
    assert llm.chat_calls[0]["params"].kwargs["max_tokens"] == 50

    llm.text_scripts += ["", "", ""]
    with pytest.raises(EmptyFeedbackError, match="after 2 retries"):
        user.generate_feedback(["q"], ["a"])
    assert "seed" not in llm.chat_calls[0]["params"].kwargs  # no seed given: the engine's own stream
    llm.text_scripts += ["", "Fine."]
    calls = len(llm.chat_calls)
    assert user.generate_feedback(["q"], ["a"], seed=11) == ["Fine."]
    assert [c["params"].kwargs["seed"] for c in llm.chat_calls[calls:]] == [11, 11 + 7919]  # a retry draws anew
    greedy = VLLMUserSimulator(None, "concise", llm=llm, temperature=0.0)
    llm.text_scripts += [""]
    calls = len(llm.chat_calls)
    with pytest.raises(EmptyFeedbackError):
        greedy.generate_feedback(["q"], ["a"])
    assert len(llm.chat_calls) == calls + 1  # greedy would only repeat itself: no retry


def test_vllm_judge_asks_both_orders_greedily(fake_vllm):
    from auxiliary.feedback.vllm_style_judge import VLLMStyleJudge

    llm = FakeLLM()
    judge = VLLMStyleJudge(None, "concise", llm=llm)
    assert judge.sampling.kwargs["temperature"] == 0.0
    # order 1 shows (short, long) and answers A; order 2 shows (long, short) and answers B: short wins both
    llm.text_scripts += ["A", "B"]
    assert judge.compare(["q"], ["ALPHA-REPLY"], ["BETA-REPLY"]) == ["A"]
    assert len(llm.chat_calls) == 1 and len(llm.chat_calls[0]["conversations"]) == 2  # both orders, one batch
    first, second = (c[-1]["content"] for c in llm.chat_calls[0]["conversations"])
    assert first.index("ALPHA-REPLY") < first.index("BETA-REPLY")
    assert second.index("BETA-REPLY") < second.index("ALPHA-REPLY")


def test_a_vllm_component_without_a_model_fails_clearly(fake_vllm):
    from auxiliary.feedback.vllm_user_simulator import VLLMUserSimulator

    with pytest.raises(ValueError, match="model_name_or_path"):
        VLLMUserSimulator(None, "concise")


# ------------------------------------------------------------------ placement on the GPUs of a node

def test_user_and_judge_engines_go_where_the_run_says(fake_vllm, monkeypatch):
    from auxiliary.feedback.factory import FeedbackFactory
    from online_sdpo_updater_config import OnlineRunConfig

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # the job's GPUs; indices count within them
    run = OnlineRunConfig(user_simulator="vllm", judge="vllm", user_vllm_tp=2, user_vllm_gpu_start=1)
    factory = FeedbackFactory(placement=run)
    factory.user("vllm", "concise", run.user_model_name_or_path, seed=1)
    factory.judges("vllm", ["concise", "no_emojis"], run.judge_model)
    (engine,) = fake_vllm.llms  # the judge on the user's model shares the user's engine
    assert engine.visible_gpus == "5,6" and engine.kwargs["tensor_parallel_size"] == 2
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"  # restored after the engine was built

    apart = OnlineRunConfig(user_simulator="vllm", judge="vllm", user_vllm_gpu_start=0, judge_vllm_gpu_start=3)
    factory = FeedbackFactory(placement=apart)
    factory.user("vllm", "concise", apart.user_model_name_or_path)
    factory.judge("vllm", "concise", apart.judge_model)
    assert [e.visible_gpus for e in fake_vllm.llms[1:]] == ["4", "7"]  # a judge engine of its own

    no_placement = FeedbackFactory()
    no_placement.user("vllm", "concise", "Qwen/Qwen3-32B")
    assert fake_vllm.llms[-1].visible_gpus == "4,5,6,7"  # vLLM's own placement: the environment untouched


def test_a_placement_beyond_the_visible_gpus_is_one_clear_error(fake_vllm, monkeypatch):
    from auxiliary.feedback.factory import FeedbackFactory
    from online_sdpo_updater_config import OnlineRunConfig

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    run = OnlineRunConfig(user_simulator="vllm", user_vllm_tp=2, user_vllm_gpu_start=1)
    with pytest.raises(ValueError,
                       match=r"GPUs 1\.\.2 \(first GPU 1, tensor parallel 2\) requested, but 2 are visible"):
        FeedbackFactory(placement=run).user("vllm", "concise", "Qwen/Qwen3-32B")
    with pytest.raises(ValueError, match="--user_vllm_gpu_start must be >= 0"):
        OnlineRunConfig(user_vllm_gpu_start=-1)


def test_policy_engine_placement(fake_vllm, monkeypatch, tiny_model, tiny_tokenizer):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    config = OnlineSDPOConfig(model="my/policy", device="cpu", use_vllm=True, use_lora=True, lora_r=4,
                              lora_target_modules="q_proj,v_proj", vllm_gpu_start=2)
    updater = OnlineSDPOUpdater(config, tiny_model, tiny_tokenizer)
    fake_vllm.token_scripts += [([11], "stop")]
    updater.generate([[{"role": "user", "content": "hi"}]])
    assert fake_vllm.llms[0].visible_gpus == "2" and fake_vllm.llms[0].kwargs["tensor_parallel_size"] == 1


def test_eval_checkpoints_generates_on_vllm_with_adapters_on_the_base_engine(fake_vllm, monkeypatch, tiny_model_dir,
                                                                            tmp_path):
    """--use_vllm: the baseline and a LoRA checkpoint on one engine (the adapter as a LoRARequest), a
    full checkpoint on an engine of its own; the judge (rule) sees the engines' replies."""
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from auxiliary.eval_checkpoints import main

    full = shutil.copytree(tiny_model_dir, tmp_path / "full")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapter = tmp_path / "adapter"
    get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"])).save_pretrained(adapter)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    n = 2
    fake_vllm.token_scripts += [([30 + i], "stop") for i in range(3 * n)]
    out = tmp_path / "out"
    assert main(["--baseline_model", tiny_model_dir, "--checkpoints", f"{adapter} {full}", "--eval_styles", "concise",
                 "--judge", "rule", "--eval_n", str(n), "--data_dir", "data/samples", "--max_new_tokens", "8",
                 "--n_bootstrap", "50", "--output_dir", str(out), "--use_vllm", "--vllm_gpu_start", "1"]) == 0
    base_engine, full_engine = fake_vllm.llms
    assert base_engine.kwargs["model"] == str(tiny_model_dir) and base_engine.kwargs["enable_lora"]
    assert base_engine.kwargs["max_lora_rank"] == 8 and base_engine.visible_gpus == "1"
    assert full_engine.kwargs["model"] == str(full)
    requests = [c["lora_request"] for c in base_engine.generate_calls]
    assert requests[0] is None and requests[1].lora_path == str(adapter)
    assert full_engine.generate_calls[0]["lora_request"] is None
    # each engine stopped before the next one (and the judge) started
    assert base_engine.shutdowns == 1 and full_engine.shutdowns == 1
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [r["checkpoint"] for r in rows] == ["adapter", "full"] and all(r["n"] == n for r in rows)


def test_incontext_oracle_generates_on_one_vllm_engine(fake_vllm, tiny_model_dir, tmp_path):
    from auxiliary.eval_incontext_oracle import main

    n, styles = 2, ["concise", "no_emojis"]
    fake_vllm.token_scripts += [([40 + i], "stop") for i in range(n * (1 + len(styles)))]
    out = tmp_path / "oracle"
    assert main(["--model", str(tiny_model_dir), "--eval_styles", ",".join(styles), "--judge", "rule",
                 "--eval_n", str(n), "--data_dir", "data/samples", "--max_new_tokens", "8", "--n_bootstrap", "50",
                 "--output_dir", str(out), "--use_vllm"]) == 0
    (engine,) = fake_vllm.llms
    assert len(engine.generate_calls) == 1 + len(styles)
    system_prompts = [c["prompts"][0]["prompt_token_ids"] for c in engine.generate_calls]
    assert system_prompts[1] != system_prompts[0]  # the persona is in the oracle's prompts
    assert not fake_vllm.token_scripts  # every reply came from the engine
    assert engine.shutdowns == 1


def test_sleep_mode_frees_the_policy_engine_during_each_update(fake_vllm, tiny_model, tiny_tokenizer):
    config = OnlineSDPOConfig(model="my/policy", device="cpu", use_vllm=True, use_lora=True, lora_r=4,
                              lora_target_modules="q_proj,v_proj", max_new_tokens=4, vllm_enable_sleep_mode=True,
                              loss_mode="simple_signal")
    updater = OnlineSDPOUpdater(config, tiny_model, tiny_tokenizer)
    messages = [{"role": "user", "content": "hi"}]
    for _ in range(2):
        fake_vllm.token_scripts += [([11, 12], "stop")]
        reply = updater.generate([messages], seed=1)[0]
        updater.train_step(messages, reply.ids, "Shorter.")
    (engine,) = fake_vllm.llms
    assert engine.kwargs["enable_sleep_mode"] is True
    events = [next(iter(c)) for c in engine.generate_calls]
    assert events == ["prompts", "sleep", "wake_up", "prompts", "sleep"]
    without = OnlineSDPOConfig(model="my/policy", device="cpu", use_vllm=True, use_lora=True, lora_r=4,
                               lora_target_modules="q_proj,v_proj", max_new_tokens=4, loss_mode="simple_signal")
    plain = OnlineSDPOUpdater(without, tiny_model, tiny_tokenizer)
    fake_vllm.token_scripts += [([11], "stop")]
    reply = plain.generate([messages])[0]
    plain.train_step(messages, reply.ids, "Shorter.")
    assert "enable_sleep_mode" not in fake_vllm.llms[1].kwargs
    assert [next(iter(c)) for c in fake_vllm.llms[1].generate_calls] == ["prompts"]


def test_sleep_mode_where_vllm_has_none_is_refused_before_an_engine_starts(fake_vllm, monkeypatch, tiny_model,
                                                                           tiny_tokenizer):
    monkeypatch.setattr(sys.modules["vllm.platforms"].current_platform, "is_sleep_mode_available", lambda: False)
    config = OnlineSDPOConfig(model="my/policy", device="cpu", use_vllm=True, use_lora=True, lora_r=4,
                              lora_target_modules="q_proj,v_proj", vllm_enable_sleep_mode=True)
    updater = OnlineSDPOUpdater(config, tiny_model, tiny_tokenizer)
    with pytest.raises(ValueError, match="--vllm_enable_sleep_mode: this vLLM has no sleep mode here"):
        updater.vllm_engine()
    assert not fake_vllm.llms


@pytest.mark.parametrize("error, code", [(ValueError("bad input"), 2), (RuntimeError("a bug"), None)])
def test_an_online_run_that_fails_in_setup_stops_the_engines_it_started(error, code, fake_vllm, monkeypatch,
                                                                        tiny_model_dir, tmp_path):
    import eval_online_sdpo

    from auxiliary.online.arms import Arms

    def failing_load(self, config):
        raise error

    monkeypatch.setattr(Arms, "load", failing_load)  # the policies load after the user's engine has started
    argv = ["--model", str(tiny_model_dir), "--user_simulator", "vllm", "--user_model_name_or_path",
            str(tiny_model_dir), "--train_jsonl", "data/samples/train.jsonl", "--val_jsonl",
            "data/samples/validation.jsonl", "--train_n", "1", "--eval_n", "1", "--output_dir", str(tmp_path / "run")]
    if code is None:
        with pytest.raises(RuntimeError, match="a bug"):
            eval_online_sdpo.main(argv)
    else:
        assert eval_online_sdpo.main(argv) == code
    (engine,) = fake_vllm.llms
    assert engine.shutdowns == 1
