"""Simulated user served by vLLM (optional; `pip install -r requirements-vllm.txt` on a GPU).

    VLLMUserSimulator(model_name_or_path, style, max_new_tokens=96, temperature=0.0, top_p=0.95,
                      seed=0, llm=None, gpu_memory_utilization=0.4, tensor_parallel_size=1,
                      empty_retries=2, **llm_kwargs)
    .generate_feedback(prompts, completions, seed=None) -> list[str]

`vllm` is imported inside the constructor only, so nothing else needs it installed. Pass a
running `vllm.LLM` as `llm` to share an engine. The prompt is
user_simulator.build_simulator_messages; Qwen3 thinking is switched off where the chat
template knows the switch. Empty follow-ups are sampled again (up to `empty_retries` times, not
when greedy), then raise EmptyFeedbackError. A call's `seed` goes into its SamplingParams (a
retry adds user_simulator.retry_seed's offset); without one the engine's own stream is used
(`seed` of the constructor seeds the engine).
"""
from __future__ import annotations

from auxiliary.feedback.user_simulator import (UserSimulator, build_simulator_messages, clean_feedback,
                                               retry_empty_feedback, retry_seed)
from auxiliary.runtime.vllm_adapter import import_vllm, make_llm, vllm_chat  # the one lazy vLLM import


class VLLMUserSimulator(UserSimulator):
    def __init__(self, model_name_or_path, style: str, max_new_tokens: int = 96, temperature: float = 0.0,
                 top_p: float = 0.95, seed: int = 0, llm=None, gpu_memory_utilization: float = 0.4,
                 tensor_parallel_size: int = 1, empty_retries: int = 2, **llm_kwargs):
        self.style = style  # an unknown style fails before vLLM is imported
        vllm = import_vllm()
        self.temperature, self.empty_retries = temperature, empty_retries
        self.llm = llm or make_llm(vllm, model_name_or_path, gpu_memory_utilization, tensor_parallel_size, seed,
                                   **llm_kwargs)
        self._sampling_params = vllm.SamplingParams
        self.sampling_options = {"max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}

    def _sampling(self, seed: int | None):
        return self._sampling_params(**self.sampling_options, **({} if seed is None else {"seed": seed}))

    def _feedback(self, prompts, completions, seed):
        conversations = [build_simulator_messages(self.style, p, c) for p, c in zip(prompts, completions)]

        def ask(indices, attempt):
            return [clean_feedback(text) for text in vllm_chat(self.llm, [conversations[i] for i in indices],
                                                               self._sampling(retry_seed(seed, attempt)))]

        # Sampling again can fix an empty message; greedy decoding would only repeat it.
        retries = self.empty_retries if self.temperature > 0 else 0
        return retry_empty_feedback(ask(range(len(conversations)), 0), ask, retries,
                                    "vLLM user", "the vLLM user model gave empty follow-ups for items {items}"
                                    f" after {retries} retries")
