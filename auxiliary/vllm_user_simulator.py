"""Simulated user served by vLLM (optional; `pip install -r requirements-vllm.txt` on a GPU).

    VLLMUserSimulator(model_name_or_path, style, max_new_tokens=96, temperature=0.7, top_p=0.95,
                      seed=0, llm=None, gpu_memory_utilization=0.4, tensor_parallel_size=1,
                      empty_retries=2, **llm_kwargs)
    .generate_feedback(prompts, completions) -> list[str]

`vllm` is imported inside the constructor only, so nothing else needs it installed. Pass a
running `vllm.LLM` as `llm` to share an engine. The prompt is
user_simulator.build_simulator_messages; Qwen3 thinking is switched off where the chat
template knows the switch. Empty follow-ups are sampled again (up to `empty_retries` times, not
when greedy), then raise EmptyFeedbackError.
"""
from __future__ import annotations

from auxiliary.personas import get_persona
from auxiliary.user_simulator import UserSimulator, build_simulator_messages, clean_feedback, retry_empty_feedback
from auxiliary.vllm_adapter import import_vllm  # the one lazy vLLM import


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
    from auxiliary.model_loading import resolve_model_path

    return vllm.LLM(model=resolve_model_path(model_name_or_path), gpu_memory_utilization=gpu_memory_utilization,
                    tensor_parallel_size=tensor_parallel_size, seed=seed, **llm_kwargs)


class VLLMUserSimulator(UserSimulator):
    def __init__(self, model_name_or_path, style: str, max_new_tokens: int = 96, temperature: float = 0.7,
                 top_p: float = 0.95, seed: int = 0, llm=None, gpu_memory_utilization: float = 0.4,
                 tensor_parallel_size: int = 1, empty_retries: int = 2, **llm_kwargs):
        get_persona(style)
        vllm = import_vllm()
        self.style = style
        self.temperature, self.empty_retries = temperature, empty_retries
        self.llm = llm or make_llm(vllm, model_name_or_path, gpu_memory_utilization, tensor_parallel_size, seed,
                                   **llm_kwargs)
        self.sampling = vllm.SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p)

    def _feedback(self, prompts, completions):
        conversations = [build_simulator_messages(self.style, p, c) for p, c in zip(prompts, completions)]

        def ask(indices):
            return [clean_feedback(text) for text in vllm_chat(self.llm, [conversations[i] for i in indices],
                                                               self.sampling)]

        # Sampling again can fix an empty message; greedy decoding would only repeat it.
        retries = self.empty_retries if self.temperature > 0 else 0
        return retry_empty_feedback(ask(range(len(conversations))), lambda indices, _attempt: ask(indices), retries,
                                    "vLLM user", "the vLLM user model gave empty follow-ups for items {items}"
                                    f" after {retries} retries")
