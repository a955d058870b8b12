"""The one place that talks to vLLM (an optional extra: `pip install -r requirements-vllm.txt`).

Policy generation with vLLM keeps the trained weights in the HF model and ships only the LoRA
adapter to vLLM after each update (adapter-only weight sync: a few MB instead of the model).
Imported lazily, so nothing else needs vLLM installed.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from auxiliary.runtime.generation import GeneratedResponse, cut_at_stop
from sdpo_objective import render_context_ids


def import_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        raise ImportError("vLLM is not installed: pip install -r requirements-vllm.txt (GPU machines only), "
                          "or drop --use_vllm / choose a non-vllm user simulator or judge") from err
    return vllm


class VLLMPolicyGenerator:
    def __init__(self, model_path: str, tokenizer, config):
        if not config.use_lora:
            raise ValueError("--use_vllm syncs LoRA adapters only: add --use_lora (full-weight sync is not supported)")
        vllm = import_vllm()
        self._vllm = vllm
        self.tokenizer = tokenizer
        self.config = config
        self.llm = vllm.LLM(model=model_path, enable_lora=True, max_lora_rank=config.lora_r,
                            gpu_memory_utilization=config.vllm_gpu_memory_utilization, seed=config.seed,
                            dtype="bfloat16" if config.dtype in ("auto", "bf16", "bfloat16") else config.dtype)
        self._adapter_dir = Path(tempfile.mkdtemp(prefix="sdpo_vllm_adapter_"))
        self._synced_step = -1
        self._lora_request = None

    def sync_weights(self, peft_model, step: int) -> None:
        if step == self._synced_step:
            return
        target = self._adapter_dir / f"step_{step}"
        peft_model.save_pretrained(target)
        from vllm.lora.request import LoRARequest

        self._lora_request = LoRARequest(f"policy_step_{step}", step + 1, str(target))
        self._synced_step = step

    def generate(self, conversations, max_new_tokens, temperature, top_p, seed=None) -> list[GeneratedResponse]:
        params = self._vllm.SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                           seed=seed, stop_token_ids=[self.tokenizer.eos_token_id])
        prompts = [{"prompt_token_ids": render_context_ids(self.tokenizer, c)} for c in conversations]
        outputs = self.llm.generate(prompts, params, lora_request=self._lora_request, use_tqdm=False)
        results = []
        stops = {self.tokenizer.eos_token_id}
        for output in outputs:
            ids, finished = cut_at_stop(list(output.outputs[0].token_ids), stops)
            if output.outputs[0].finish_reason == "stop" and (not ids or ids[-1] not in stops):
                ids.append(self.tokenizer.eos_token_id)  # vLLM drops the stop token; y keeps its EOS
                finished = True
            results.append(GeneratedResponse(self.tokenizer.decode(ids, skip_special_tokens=True).strip(), ids, finished))
        return results


def vllm_chat(llm, conversations: list[list[dict]], sampling_params) -> list[str]:
    """Batched chat generation with thinking off (where the template has the switch)."""
    tokenizer = llm.get_tokenizer()
    template = getattr(tokenizer, "chat_template", "") or ""
    extra = {"chat_template_kwargs": {"enable_thinking": False}} if "enable_thinking" in str(template) else {}
    outputs = llm.chat(conversations, sampling_params, use_tqdm=False, **extra)
    return [output.outputs[0].text for output in outputs]


def make_llm(vllm, model_name_or_path: str, gpu_memory_utilization: float, tensor_parallel_size: int,
             seed: int, **llm_kwargs):
    if not model_name_or_path:
        raise ValueError("a vLLM component needs model_name_or_path")
    from auxiliary.runtime.model_loading import resolve_model_path

    return vllm.LLM(model=resolve_model_path(model_name_or_path), gpu_memory_utilization=gpu_memory_utilization,
                    tensor_parallel_size=tensor_parallel_size, seed=seed, **llm_kwargs)
