"""Option groups shared by the configs of the online trainer, the offline trainer and the chat.

Each group is a dataclass whose fields are CLI flags and YAML keys; the help text and the
default of each setting live here once. A config inherits the groups it needs (with
sdpo_objective.ObjectiveOptions, the objective group) and changes a default in one line with
`override(Group, "name", value)`, which keeps the group's help text.

A field may name other spellings in metadata["aliases"] (for example the upstream
`--learning_rate` for `lr`); auxiliary/runtime/cli.py accepts them as flags and YAML keys.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from sdpo_objective import (DEFAULT_HINDSIGHT_TEMPLATE, HINDSIGHT_PLACEMENTS, OBJECTIVE_RANGES, check_in_range,
                            validate_template)

DTYPES = ("auto", "bf16", "fp16", "fp32")


# The allowed range of every numeric setting, by field name, in one table (HfArgumentParser hands a
# field's metadata to argparse, so ranges cannot live there): (low, low inclusive, high, high inclusive).
RANGES: dict[str, tuple] = {
    # model, context, optimiser, generation, LoRA
    "max_context_length": (1, True, None, None), "lr": (0, False, None, None), "weight_decay": (0, True, None, None),
    "max_grad_norm": (0, True, None, None), "adam_epsilon": (0, False, None, None),
    "max_new_tokens": (1, True, None, None),
    "eval_max_new_tokens": (1, True, None, None), "temperature": (0, True, None, None), "top_p": (0, False, 1, True),
    "generation_batch_size": (1, True, None, None), "batch_size": (1, True, None, None),
    "lora_r": (1, True, None, None), "lora_alpha": (0, False, None, None), "lora_dropout": (0, True, 1, False),
    # objective: its rows live in sdpo_objective.OBJECTIVE_RANGES, which ObjectiveOptions and Teacher check too
    **OBJECTIVE_RANGES,
    # online trainer and run
    "train_steps_per_example": (1, True, None, None), "warmup_steps": (0, True, None, None),
    "scheduler_steps": (1, True, None, None), "checkpoint_every": (0, True, None, None),
    "max_checkpoints": (0, True, None, None), "vllm_gpu_memory_utilization": (0, False, 1, True),
    # train_n 0 would be a run that trains nothing and reports success
    "train_n": (1, True, None, None), "eval_n": (0, True, None, None), "eval_every": (0, True, None, None),
    "interactions_per_update": (1, True, None, None),
    "max_prompt_tokens": (1, True, None, None), "api_concurrency": (1, True, None, None),
    "api_max_retries": (0, True, None, None), "api_timeout_s": (0, False, None, None),
    "judge_temperature": (0, True, None, None), "judge_max_new_tokens": (1, True, None, None),
    "tie_margin": (0, True, None, None), "user_temperature": (0, True, None, None),
    # numpy, torch and transformers take seeds in [0, 2**32 - 1]; outside, their own errors name no flag
    "seed": (0, True, 2**32 - 1, True),
    # offline trainers; max_steps -1 is transformers' "no step limit" (any other value <= 0 trained an epoch)
    "max_steps": (1, True, None, None, (-1, "no limit: --num_epochs decides")), "num_epochs": (0, False, None, None),
    "grad_accum": (1, True, None, None), "max_completion_length": (1, True, None, None),
    "warmup_ratio": (0, True, 1, False), "logging_steps": (1, True, None, None), "save_steps": (1, True, None, None),
    "save_total_limit": (0, True, None, None), "dataloader_num_workers": (0, True, None, None),
    # chat
    "port": (1, True, 65535, True), "min_signal": (0, True, None, None), "undo_depth": (1, True, None, None),
    "max_message_chars": (1, True, None, None),
    # evaluation tools
    "judge_batch_size": (1, True, None, None), "n_bootstrap": (0, True, None, None), "n_cases": (0, True, None, None),
    "min_tokens": (0, True, None, None), "max_tries": (1, True, None, None),
    "generation_vllm_gpu_memory_utilization": (0, False, 1, True),
    # vLLM placement: tensor parallel sizes and first GPU indices
    "vllm_tp": (1, True, None, None), "vllm_gpu_start": (0, True, None, None),
    "user_vllm_tp": (1, True, None, None), "user_vllm_gpu_start": (0, True, None, None),
    "judge_vllm_tp": (1, True, None, None), "judge_vllm_gpu_start": (0, True, None, None),
    # eval_benchmarks.py: --limit unset runs every item
    "limit": (1, True, None, None),
    # data preparation (auxiliary/preprocess_*.py): lengths in characters, 0 = no limit; a history of 0 messages
    # and a cap of 0 would drop everything
    **{name: (1, True, None, None, (0, "no limit")) for name in (
        "max_conversation_chars", "max_turn_chars", "max_prompt_chars", "max_completion_chars",
        "max_user_response_chars", "max_response_chars", "max_post_chars")},
    "min_prompt_chars": (0, True, None, None), "min_post_chars": (0, True, None, None),
    "max_history_messages": (1, True, None, None), "max_conversations": (1, True, None, None),
    "max_interactions": (1, True, None, None),
}


def check_ranges(config, ranges: dict[str, tuple] = RANGES) -> None:
    """Every numeric field of `config` finite and in its range in `ranges` (sdpo_objective.check_in_range:
    the message names the flag, the allowed range and the value)."""
    for f in dataclasses.fields(config):
        check_in_range(f.name, getattr(config, f.name), ranges)


def canonical_template(template: str) -> str:
    """The paper repository's placeholder {follow_up} as ours, {followup}."""
    return template.replace("{follow_up}", "{followup}")


def accept_field_aliases(cls: type) -> type:
    """Let the config's constructor take the fields' alias spellings as keywords too (the paper
    repository's `OnlineSDPOConfig(model_name_or_path=..., learning_rate=...)`), as the command line
    and YAML files do; an alias and its field with different values is an error."""
    import functools

    aliases = {alias.lstrip("-"): f.name for f in dataclasses.fields(cls) for alias in f.metadata.get("aliases", ())}
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        for alias, name in aliases.items():
            if alias in kwargs:
                value = kwargs.pop(alias)
                if name in kwargs and kwargs[name] != value:
                    raise TypeError(f"{alias}={value!r} and {name}={kwargs[name]!r} set the same setting: give one")
                kwargs[name] = value
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


def override(group: type, name: str, default: Any, help: Optional[str] = None):
    """A field of `group` with another default (and optionally another help text), metadata kept."""
    (base,) = [f for f in dataclasses.fields(group) if f.name == name]
    metadata = dict(base.metadata)
    if help is not None:
        metadata["help"] = help
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelOptions:
    """Which model, and how it is loaded."""
    model: str = field(default="Qwen/Qwen3-8B", metadata={
        "help": "policy: hub id, local folder, smollm2-135m-instruct or tiny-random",
        "aliases": ["--model_name_or_path", "--base_model"]})
    dtype: str = field(default="auto", metadata={
        "help": "auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32",
        "aliases": ["--precision", "--torch_dtype"]})
    attn_implementation: str = field(default="auto", metadata={
        "help": "auto (flash_attention_2 where installed on CUDA, else sdpa), sdpa, eager, flash_attention_2"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute activations in backward (less memory)"})
    ref_model: Optional[str] = field(default=None, metadata={
        "help": "reference model for beta > 0 (default: the initial policy, --model)"})


@dataclass
class ContextOptions:
    """What the student and the teacher (hindsight) contexts look like."""
    max_context_length: int = field(default=4096, metadata={
        "help": "context tokens kept, cut from the LEFT (the assistant header survives)",
        "aliases": ["--max_prompt_length"]})
    hindsight_template: str = field(default=DEFAULT_HINDSIGHT_TEMPLATE, metadata={
        "help": "block appended to the last user message; must contain {followup} ({follow_up} is accepted too)",
        "aliases": ["--hindsight_block_template"]})
    hindsight_placement: str = field(default="last_user_message", metadata={
        "help": f"where the hindsight block goes: {', '.join(HINDSIGHT_PLACEMENTS)} (last_user_message: appended to "
                "the last user message; separate_turn: a user turn of its own after it; assistant_turn: an assistant "
                "turn after it, as the paper's offline Qwen3-4B run)"})

    def __post_init__(self):
        self.check_context()
        parent = getattr(super(), "__post_init__", None)  # the next group of a config (the objective's)
        if parent is not None:
            parent()

    def check_context(self) -> None:
        """The placement is known and the template has its placeholder ({follow_up} read as {followup});
        also called by configs whose __post_init__ chain skips this group's (the offline trainers')."""
        if self.hindsight_placement not in HINDSIGHT_PLACEMENTS:
            raise ValueError(f"unknown --hindsight_placement {self.hindsight_placement!r}; "
                             f"choose one of {', '.join(HINDSIGHT_PLACEMENTS)}")
        self.hindsight_template = validate_template(canonical_template(self.hindsight_template))


@dataclass
class OptimizerOptions:
    lr: float = field(default=5e-6, metadata={"help": "AdamW (peak) learning rate", "aliases": ["--learning_rate"]})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    adam_epsilon: float = field(default=1e-6, metadata={
        "help": "AdamW epsilon (1e-6 as the paper's updater; torch's default is 1e-8)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient-norm clip (0 = off)"})


@dataclass
class GenerationOptions:
    """Sampling of the policy's replies."""
    max_new_tokens: int = field(default=512, metadata={"help": "reply length limit while training"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (0 = greedy)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    generation_batch_size: int = field(default=16, metadata={"help": "prompts per generate() call"})


@dataclass
class LoraOptions:
    use_lora: bool = field(default=False, metadata={"help": "train a LoRA adapter instead of all weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (not tied to r)"})
    lora_dropout: float = field(default=0.0, metadata={
        "help": "LoRA dropout (0, the paper's: the teacher is scored in eval mode, the student in train mode, and "
                "dropout would make them differ)"})
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "comma-separated module names, or all-linear"})


JUDGE_FRAMINGS = ("user", "neutral")


@dataclass
class JudgeOptions:
    """How a model judge decides, in the online run and in both evaluation tools."""
    judge_framing: str = field(default="user", metadata={
        "help": "user (the paper's: the judge role-plays the persona and decides as that user) or neutral (a referee)"})
    judge_temperature: float = field(default=0.0, metadata={
        "help": "judge decoding temperature (0 = greedy, the paper's)"})
    judge_max_new_tokens: Optional[int] = field(default=None, metadata={
        "help": "judge reply length limit (default: 512 for Claude, 1024 for local and vLLM judges, as the paper's)"})
    tie_margin: float = field(default=0.05, metadata={
        "help": "log-prob judge: a verdict counts only when its label beats the runner-up by this many nats"})

    def check_judge_options(self) -> None:
        """Fail before any judge model loads (the ranges are in RANGES)."""
        if self.judge_framing not in JUDGE_FRAMINGS:
            raise ValueError(f"--judge_framing must be one of {', '.join(JUDGE_FRAMINGS)}, got {self.judge_framing!r}")


@dataclass
class VLLMEngineOptions:
    """The vLLM engine that generates the replies of the policy (online) or of the evaluated models (evaluation
    tools)."""
    use_vllm: bool = field(default=False, metadata={
        "help": "generate the model's replies with vLLM (GPU, optional extra; LoRA weights reach it as an adapter)"})
    vllm_tp: int = field(default=1, metadata={"help": "the generation engine's tensor parallel size"})
    vllm_gpu_start: Optional[int] = field(default=None, metadata={
        "help": "the generation engine's first GPU (default: vLLM's placement); keep it off a vLLM user's and judge's "
                "GPUs"})


@dataclass
class JudgePlacementOptions:
    """Where a vLLM judge runs (of the GPUs visible to the job; nothing hard-codes an index)."""
    judge_vllm_tp: Optional[int] = field(default=None, metadata={
        "help": "vLLM judge: tensor parallel size (default: the user's engine when both run the same model, else 1)"})
    judge_vllm_gpu_start: Optional[int] = field(default=None, metadata={
        "help": "vLLM judge: first GPU of its own engine (default: the user's engine on the same model, else vLLM's "
                "placement)"})


@dataclass
class FeedbackPlacementOptions(JudgePlacementOptions):
    """Where the vLLM user (and judge) run: the paper repository's --user_vllm_tp / --user_vllm_gpu_start."""
    user_vllm_tp: int = field(default=1, metadata={"help": "vLLM user: tensor parallel size"})
    user_vllm_gpu_start: Optional[int] = field(default=None, metadata={
        "help": "vLLM user: first GPU of its engine (GPUs start .. start + tp - 1; default: vLLM's placement)"})
