"""Pairwise style judge served by vLLM (optional; imported only when used).

    VLLMStyleJudge(model_name_or_path, style, max_new_tokens=1024, seed=0, llm=None,
                   gpu_memory_utilization=0.4, tensor_parallel_size=1, framing="user", temperature=0.0,
                   **llm_kwargs)
    .compare(prompts, completions_a, completions_b) -> ["A"|"B"|"C"]   (style_judge.PairwiseJudge)

Greedy generation of style_judge.build_judge_messages for both orders in one vLLM batch, then
parse_verdict; the raw replies of the last call are in judge.last_outputs.
"""
from __future__ import annotations

from auxiliary.feedback.style_judge import PairwiseJudge, build_judge_messages, parse_verdict
from auxiliary.runtime.vllm_adapter import import_vllm, make_llm, vllm_chat


class VLLMStyleJudge(PairwiseJudge):
    def __init__(self, model_name_or_path, style: str, max_new_tokens: int = 1024, seed: int = 0, llm=None,
                 gpu_memory_utilization: float = 0.4, tensor_parallel_size: int = 1, framing: str = "user",
                 temperature: float = 0.0, **llm_kwargs):
        super().__init__(framing)
        self.style = style  # an unknown style fails before vLLM is imported
        vllm = import_vllm()
        self.llm = llm or make_llm(vllm, model_name_or_path, gpu_memory_utilization, tensor_parallel_size, seed,
                                   **llm_kwargs)
        self.sampling = vllm.SamplingParams(max_tokens=max_new_tokens, temperature=temperature)  # greedy by default
        self.last_outputs: list[str] = []

    def judge_once(self, prompts, first, second):
        conversations = [build_judge_messages(self.style, p, x, y, framing=self.framing)
                         for p, x, y in zip(prompts, first, second)]
        self.last_outputs = vllm_chat(self.llm, conversations, self.sampling)
        return [parse_verdict(text) for text in self.last_outputs]
