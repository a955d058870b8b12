"""OnlineSDPOConfig: every field is a CLI flag (`--field value`) and a YAML key (`--config f.yaml`).

The shared settings come from the option groups (sdpo_objective.ObjectiveOptions and
auxiliary/runtime/option_groups.py); this class adds the online trainer's own.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from auxiliary.runtime.option_groups import (ContextOptions, GenerationOptions, LoraOptions, ModelOptions,
                                             OptimizerOptions, check_ranges)
from sdpo_objective import ObjectiveOptions, validate_template


@dataclass
class OnlineSDPOConfig(LoraOptions, GenerationOptions, OptimizerOptions, ContextOptions, ObjectiveOptions, ModelOptions):
    # dataclass fields follow the bases from the last one: model, objective, context, optimiser, generation, LoRA
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1 ..."})
    train_steps_per_example: int = field(default=1, metadata={"help": "gradient steps per interaction (signal recomputed each step)"})
    # checkpoints
    checkpoint_dir: Optional[str] = field(default=None, metadata={"help": "where step_N checkpoints go"})
    checkpoint_every: int = field(default=0, metadata={"help": "save every N updates (0 = only when asked)"})
    max_checkpoints: int = field(default=2, metadata={"help": "newest checkpoints kept"})
    # misc
    seed: int = field(default=1234, metadata={"help": "random seed"})
    use_vllm: bool = field(default=False, metadata={"help": "generate with vLLM (GPU, optional extra); LoRA adapter-only weight sync"})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "share of GPU memory vLLM may take"})

    def __post_init__(self):
        super().__post_init__()  # the objective group validates its options
        check_ranges(self)  # every numeric flag in its range, before anything is loaded or written
        validate_template(self.hindsight_template)
        if self.train_steps_per_example < 1:
            raise ValueError("train_steps_per_example must be >= 1")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")

    def objective_options(self) -> ObjectiveOptions:
        return ObjectiveOptions.from_config(self)

    def to_dict(self) -> dict:
        return asdict(self)
