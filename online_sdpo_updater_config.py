"""OnlineSDPOConfig: every field is a CLI flag (`--field value`) and a YAML key (`--config f.yaml`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from sdpo_objective import DEFAULT_HINDSIGHT_TEMPLATE, LOSS_MODES, ObjectiveOptions, validate_template


@dataclass
class OnlineSDPOConfig:
    # model
    model: str = field(default="Qwen/Qwen3-8B", metadata={"help": "policy: hub id, local folder, smollm2-135m-instruct or tiny-random"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32"})
    attn_implementation: str = field(default="auto", metadata={"help": "auto (flash_attention_2 where installed on CUDA, else sdpa), sdpa, eager"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1 ..."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward (less memory)"})
    # objective
    loss_mode: str = field(default="full_distillation", metadata={"help": f"one of {', '.join(LOSS_MODES)}"})
    distillation_topk: int = field(default=20, metadata={"help": "student top-k support of full_distillation"})
    distillation_tail: bool = field(default=True, metadata={"help": "keep a tail bucket for the remaining mass (else renormalise over top-k)"})
    signal_clip: float = field(default=0.0, metadata={"help": "clamp the signal to +-c (0 = off)"})
    ignore_first_k: int = field(default=0, metadata={"help": "give no signal to the first k reply tokens"})
    center_signal: bool = field(default=False, metadata={"help": "subtract each reply's mean signal (simple_signal)"})
    negate_signal: bool = field(default=False, metadata={"help": "control experiments only: train on -A (simple_signal)"})
    beta: float = field(default=0.0, metadata={"help": "weight of a KL to a reference model (0 = off)"})
    ref_model: Optional[str] = field(default=None, metadata={"help": "reference model for beta > 0 (default: the initial policy)"})
    hindsight_template: str = field(default=DEFAULT_HINDSIGHT_TEMPLATE, metadata={"help": "block appended to the last user message; must contain {followup}"})
    logits_chunk_size: int = field(default=256, metadata={"help": "response positions per chunk of the LM head / log-softmax"})
    fused_lm_head: bool = field(default=True, metadata={"help": "form the LM head's gradient during the forward (faster; falls back to checkpointed chunks for LoRA/biased/sharded heads)"})
    # optimisation
    lr: float = field(default=5e-6, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient-norm clip (0 = off)"})
    train_steps_per_example: int = field(default=1, metadata={"help": "gradient steps per interaction (signal recomputed each step)"})
    # generation
    max_new_tokens: int = field(default=512, metadata={"help": "reply length limit while training"})
    max_context_length: int = field(default=4096, metadata={"help": "context tokens kept (cut from the left)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (0 = greedy)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    generation_batch_size: int = field(default=16, metadata={"help": "prompts per generate() call"})
    # LoRA
    use_lora: bool = field(default=False, metadata={"help": "train a LoRA adapter instead of all weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (not tied to r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "comma-separated module names, or all-linear"})
    # checkpoints
    checkpoint_dir: Optional[str] = field(default=None, metadata={"help": "where step_N checkpoints go"})
    checkpoint_every: int = field(default=0, metadata={"help": "save every N updates (0 = only when asked)"})
    max_checkpoints: int = field(default=2, metadata={"help": "newest checkpoints kept"})
    # misc
    seed: int = field(default=1234, metadata={"help": "random seed"})
    use_vllm: bool = field(default=False, metadata={"help": "generate with vLLM (GPU, optional extra); LoRA adapter-only weight sync"})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "share of GPU memory vLLM may take"})

    def __post_init__(self):
        validate_template(self.hindsight_template)
        self.objective_options()  # validates loss options
        if self.train_steps_per_example < 1:
            raise ValueError("train_steps_per_example must be >= 1")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")

    def objective_options(self) -> ObjectiveOptions:
        return ObjectiveOptions.from_config(self)

    def to_dict(self) -> dict:
        return asdict(self)
