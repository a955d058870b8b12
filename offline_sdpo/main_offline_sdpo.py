"""Offline SDPO: train a policy on logged (prompt, completion, user_response) interactions.

    python offline_sdpo/main_offline_sdpo.py --train_jsonl data.jsonl --output_dir out/
    accelerate launch --config_file offline_sdpo/configs/multigpu.yaml --num_processes 4 \
        offline_sdpo/main_offline_sdpo.py --train_jsonl data.jsonl --output_dir out/
    torchrun --nproc_per_node 2 offline_sdpo/main_offline_sdpo.py --train_jsonl data.jsonl ...

Every flag is also a YAML key (`--config file.yaml`; flags win). The final model is saved to
--output_dir so that AutoModelForCausalLM.from_pretrained(output_dir) loads it (with --use_lora
the adapter goes to output_dir/adapter and a merged full model to output_dir).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from auxiliary.runtime.option_groups import (DTYPES, ContextOptions, LoraOptions, ModelOptions, OptimizerOptions,
                                             check_ranges, override)
from sdpo_objective import ObjectiveOptions

CONFIG_FILENAME = "offline_sdpo_config.json"  # not config.json: that name belongs to the saved model
METRICS_FILENAME = "metrics.jsonl"
logger = logging.getLogger("offline_sdpo")


@dataclass
class OfflineTrainingArguments(LoraOptions, OptimizerOptions, ModelOptions):
    """What offline SDPO and the SFT baseline (main_offline_sft.py) share: model, LoRA, optimiser, data, schedule,
    run."""
    # the offline trainers' defaults where they differ from the shared groups' (one line each)
    model: str = override(ModelOptions, "model", "Qwen/Qwen3-4B")
    dtype: str = override(ModelOptions, "dtype", "auto", help=(
        "autocast precision over fp32 master weights: auto (bf16 on GPUs that support it, fp32 on CPU), bf16, fp16, "
        "fp32"))
    max_context_length: int = override(ContextOptions, "max_context_length", 2048)
    lr: float = override(OptimizerOptions, "lr", 2e-6)
    use_lora: bool = override(LoraOptions, "use_lora", False,
                              help="train a LoRA adapter (saved, then merged into a full model)")
    # data
    train_jsonl: Optional[str] = field(default=None, metadata={
        "help": "interactions JSONL: prompt, completion, user_response (required)"})
    output_dir: Optional[str] = field(default=None, metadata={
        "help": "where checkpoints and the final model go (default: $OUTPUT_DIR)"})
    max_completion_length: int = field(default=2048, metadata={
        "help": "completion tokens kept (a cut completion gets no EOS)"})
    # optimisation
    batch_size: int = field(default=4, metadata={"help": "interactions per device per micro-batch",
                                                  "aliases": ["--per_device_train_batch_size"]})
    grad_accum: int = field(default=8, metadata={
        "help": "gradient-accumulation steps", "aliases": ["--gradient_accumulation_steps"]})
    num_epochs: float = field(default=2.0, metadata={"help": "passes over the data", "aliases": ["--num_train_epochs"]})
    max_steps: int = field(default=-1, metadata={
        "help": "optimizer steps; overrides --num_epochs when > 0 (-1: --num_epochs decides)"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "share of the steps spent warming up"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name"})
    optim: str = field(default="auto", metadata={
        "help": "auto (8-bit AdamW where CUDA and bitsandbytes exist, else adamw_torch) or a transformers optim name"})
    # bookkeeping
    seed: int = field(default=1234, metadata={"help": "random seed (data order, init of LoRA)"})
    logging_steps: int = field(default=1, metadata={"help": "log every N optimizer steps"})
    save_steps: int = field(default=200, metadata={"help": "checkpoint every N optimizer steps"})
    save_total_limit: int = field(default=2, metadata={"help": "newest checkpoints kept (0: all)"})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={
        "help": "a checkpoint folder, or 'latest' (newest in --output_dir; fresh start if none)"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace the results of an earlier run in --output_dir (else such a folder is refused)"})
    wandb: bool = field(default=False, metadata={
        "help": "report to Weights & Biases (WANDB_PROJECT etc. from the environment)"})
    run_name: Optional[str] = field(default=None, metadata={"help": "run name for wandb"})
    dataloader_num_workers: int = field(default=0, metadata={"help": "collator worker processes"})

    def __post_init__(self):
        if self.output_dir is None:
            self.output_dir = os.environ.get("OUTPUT_DIR") or None
        check_ranges(self)  # every numeric flag in its range (option_groups.RANGES)
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown --dtype '{self.dtype}'; choose {', '.join(DTYPES)}")


@dataclass
class OfflineSDPOArguments(OfflineTrainingArguments, ContextOptions, ObjectiveOptions):
    loss_mode: str = override(ObjectiveOptions, "loss_mode", "simple_signal")
    ignore_first_k: int = override(ObjectiveOptions, "ignore_first_k", 2)

    def __post_init__(self):
        ObjectiveOptions.__post_init__(self)  # the objective group validates its options
        OfflineTrainingArguments.__post_init__(self)
        self.check_context()  # ContextOptions: placement and template

    def objective_options(self) -> ObjectiveOptions:
        return ObjectiveOptions.from_config(self)


# --------------------------------------------------------------------------- machine-dependent choices

def resolve_precision(precision: str) -> str:
    import torch

    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def resolve_optim(optim: str) -> str:
    import torch

    if optim != "auto":
        return optim
    # bitsandbytes' kernels know nothing of FSDP's sharded DTensors (seen failing on an H100) and are
    # untested under DeepSpeed's optimizer wrapping: 8-bit AdamW only for single-GPU and DDP runs.
    sharded = any(os.environ.get(flag, "false").lower() == "true"
                  for flag in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))
    if torch.cuda.is_available() and not sharded and importlib.util.find_spec("bitsandbytes") is not None:
        return "adamw_bnb_8bit"
    return "adamw_torch"


def resolve_checkpoint(value: Optional[str], output_dir: str) -> Optional[str]:
    from auxiliary.runtime.cli import ConfigError

    if not value:
        return None
    if value == "latest":
        from transformers.trainer_utils import get_last_checkpoint

        found = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if found is None:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting fresh", output_dir)
        return found
    if not (Path(value) / "trainer_state.json").exists():
        raise ConfigError(f"--resume_from_checkpoint {value}: not a checkpoint folder (no trainer_state.json)")
    return value


def build_training_arguments(cfg: OfflineTrainingArguments, precision: str, optim: str, args_class=None, **overrides):
    """TrainingArguments (or `args_class`, e.g. TRL's SFTConfig) from the flags; `overrides` replace or add fields."""
    import torch
    from transformers import TrainingArguments

    # The accelerate launcher exports its config's mixed_precision; --dtype is the one that counts
    # (a GPU config must not switch a CPU run to bf16 autocast).
    os.environ["ACCELERATE_MIXED_PRECISION"] = "no" if precision == "fp32" else precision
    return (args_class or TrainingArguments)(**{**dict(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float < 1 is a share of the total steps
        weight_decay=cfg.weight_decay,
        adam_epsilon=cfg.adam_epsilon,
        max_grad_norm=cfg.max_grad_norm,
        optim=optim,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        activation_checkpointing=cfg.gradient_checkpointing,  # transformers 5 name of gradient checkpointing
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        report_to=["wandb"] if cfg.wandb else "none",
        run_name=cfg.run_name,
        remove_unused_columns=False,  # the collator needs prompt / completion / user_response
        label_names=[],               # no labels: the loss is computed from the raw records
        dataloader_num_workers=cfg.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        # Without CUDA, say so: accelerate then runs one process per torchrun/accelerate rank over gloo
        # (otherwise every rank would train alone on the whole data set).
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
    ), **overrides})


# --------------------------------------------------------------------------- model

def load_policy(cfg: OfflineTrainingArguments, model_path: str, attn: str):
    """fp32 master weights everywhere; bf16 is autocast by the Trainer (a 2e-6 update vanishes in bf16 weights)."""
    import torch

    from auxiliary.runtime.model_loading import load_causal_lm

    model = load_causal_lm(model_path, cfg.model, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    if cfg.use_lora:
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora_target_modules
        target_modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                 target_modules=target_modules, task_type="CAUSAL_LM"))
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()  # frozen embeddings would cut the checkpointed graph
    return model


def load_reference(cfg: OfflineSDPOArguments, precision: str, attn: str):
    if cfg.beta <= 0:
        return None
    import torch

    from auxiliary.runtime.model_loading import load_causal_lm, resolve_model_path

    path = resolve_model_path(cfg.ref_model or cfg.model)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return load_causal_lm(path, cfg.ref_model or cfg.model, dtype=dtype, attn_implementation=attn)


def save_final_model(trainer, cfg: OfflineTrainingArguments, base_path: str, tokenizer) -> None:
    """output_dir holds a model AutoModelForCausalLM loads; with LoRA also the adapter in output_dir/adapter."""
    if not cfg.use_lora:
        trainer.save_model(cfg.output_dir)  # gathers ZeRO-3 / FSDP shards; rank 0 writes
        return
    adapter_dir = os.path.join(cfg.output_dir, "adapter")
    trainer.save_model(adapter_dir)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        # Merge on a fresh CPU copy of the base model: works whatever sharding training used.
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        merged.save_pretrained(cfg.output_dir)
        tokenizer.save_pretrained(cfg.output_dir)
    trainer.accelerator.wait_for_everyone()


# --------------------------------------------------------------------------- main

def leave_process_group() -> None:
    """Tear the process group down before the interpreter exits: left to exit, gloo's threads can abort a rank
    ("terminate called without an active exception") after the model was saved, and the launcher reports failure."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class BadInput(SystemExit):
    """Bad input found by the trainer itself: `error: <message>` on stderr and exit status 2 (the
    __main__ block prints it; called from Python, str() is the line)."""

    def __init__(self, message):
        super().__init__(2)
        self.message = message
        self.line = f"error: {message}"

    def __str__(self) -> str:
        return self.line


def main(argv: Optional[list[str]] = None) -> dict:
    from auxiliary.runtime.cli import parse_dataclasses

    try:
        (cfg,) = parse_dataclasses([OfflineSDPOArguments], argv, prog="main_offline_sdpo.py")
    except ValueError as err:  # bad values (ConfigError included): one line, no traceback
        raise BadInput(err) from None
    if not cfg.train_jsonl:
        raise BadInput("--train_jsonl is required (an interactions JSONL: prompt, completion, user_response)")
    if not cfg.output_dir:
        raise BadInput("no output folder: pass --output_dir or set OUTPUT_DIR")
    return train_holding_output_dir(cfg)


def train_holding_output_dir(cfg: OfflineTrainingArguments, train_fn=None) -> dict:
    """train() (or `train_fn`) with --output_dir locked against a second run writing it. Only the first process of a
    torchrun/accelerate launch takes the lock: all its processes write the one folder together."""
    from auxiliary.runtime.locks import FolderLock, FolderLockError
    from auxiliary.runtime.io_utils import folders_to_create
    from auxiliary.runtime.run_folder import remove_unstarted

    check_models(cfg)  # before the folder exists: a model that cannot load leaves nothing behind
    lock = FolderLock(cfg.output_dir) if int(os.environ.get("RANK", "0")) == 0 else None
    created = folders_to_create(Path(cfg.output_dir)) if lock is not None else []
    if lock is not None:
        try:
            lock.acquire()
        except FolderLockError as err:
            raise BadInput(err) from None
    try:
        check_output_dir(cfg)  # under the lock: a second run never deletes the first one's files
        return (train_fn or train)(cfg)
    except BaseException:
        if lock is not None:  # failed before it wrote anything (the model's weights, the records): no empty folder
            lock.release()
            remove_unstarted(created, ())
        raise
    finally:
        if lock is not None:
            lock.release()


def check_models(cfg: OfflineTrainingArguments) -> None:
    """The policy and a reference model (--ref_model, with --beta > 0) exist and their config.json reads; a hub id
    without network must be in the cache (model_loading.check_loadable). ModelLoadError: one line, exit 2."""
    from auxiliary.runtime.model_loading import check_all_loadable

    reference = getattr(cfg, "ref_model", None) if getattr(cfg, "beta", 0) > 0 else None  # loaded only with beta
    check_all_loadable((cfg.model, reference))


# What a run leaves in --output_dir (besides checkpoint-N/ folders): an earlier run's results.
RESULT_NAMES = (CONFIG_FILENAME, METRICS_FILENAME, "trainer_state.json", "train_results.json", "all_results.json",
                "config.json", "model.safetensors", "model.safetensors.index.json", "adapter", "training.png")


def check_output_dir(cfg: OfflineTrainingArguments) -> None:
    """Never overwrite an earlier run silently: a folder holding results needs --resume_from_checkpoint
    or --overwrite, and --overwrite only a folder a run of ours wrote (its run marker). Deletes nothing:
    clear_earlier_results does, once the records and the models have loaded."""
    from auxiliary.runtime.run_folder import is_run_of_ours, refusal_without_marker, write_run_marker

    out = Path(cfg.output_dir)
    if not out.is_dir():
        return
    earlier = earlier_results(out)
    ours = is_run_of_ours(out)
    if earlier and not ours and (cfg.overwrite or not cfg.resume_from_checkpoint):
        raise BadInput(refusal_without_marker(out, earlier, cfg.overwrite, "--resume_from_checkpoint"))
    if earlier and not (cfg.resume_from_checkpoint or cfg.overwrite):
        raise BadInput(f"{out} already holds an earlier run ({', '.join(earlier[:4])}"
                       f"{', ...' if len(earlier) > 4 else ''}); pass --resume_from_checkpoint latest to continue "
                       "it or --overwrite to replace it")
    if is_first_local_process():
        write_run_marker(out, "offline_sdpo")


def earlier_results(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name in RESULT_NAMES or p.name.startswith("checkpoint-"))


def is_first_local_process() -> bool:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))) == 0


def clear_earlier_results(cfg: OfflineTrainingArguments) -> None:
    """--overwrite: delete an earlier run's results (first local process only), called once every check that
    can fail (records, tokenizer, policy, reference) has passed; check_output_dir made sure the folder is ours."""
    import shutil

    out = Path(cfg.output_dir)
    if not cfg.overwrite or cfg.resume_from_checkpoint or not out.is_dir() or not is_first_local_process():
        return
    earlier = earlier_results(out)
    for name in earlier:
        target = out / name
        shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
    if earlier:
        logger.warning("--overwrite: removed %d earlier results from %s", len(earlier), out)


@dataclass
class RunStart:
    """What both offline trainers have once started: the policy, its tokenizer, the records."""
    is_main: bool
    resume: Optional[str]
    records: list
    summary: object
    model_path: str
    tokenizer: object
    model: object
    attn: str


def start_run(cfg: OfflineTrainingArguments, args, tag: str, data_note: str = "") -> RunStart:
    """Seed, quiet the other processes, find the checkpoint to resume (before anything loads), read the
    records, load the tokenizer and the policy. Shared by the SDPO trainer and the SFT baseline."""
    import transformers

    from auxiliary.runtime.model_loading import load_tokenizer, pick_attn_implementation, resolve_model_path
    from offline_sdpo.offline_sdpo_trainer import load_interactions

    transformers.set_seed(cfg.seed)
    is_main = args.process_index == 0
    if not is_main:
        transformers.utils.logging.set_verbosity_warning()
    resume = resolve_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir)  # fail before any loading
    records, summary = load_interactions(cfg.train_jsonl)
    if is_main:
        print(f"[{tag}] {summary.describe()}{data_note}", flush=True)
    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path)
    attn = pick_attn_implementation(cfg.attn_implementation, "cuda" if args.device.type == "cuda" else "cpu")
    return RunStart(is_main, resume, records, summary, model_path, tokenizer, load_policy(cfg, model_path, attn), attn)


def train(cfg: OfflineSDPOArguments) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import transformers

    from auxiliary.runtime.io_utils import atomic_write_json
    from offline_sdpo.offline_sdpo_trainer import (InteractionDataset, MetricsJsonlCallback, OfflineSDPOTrainer,
                                                   SDPOCollator)
    from offline_sdpo.progress import show_progress
    from auxiliary.runtime.secrets import public_config

    precision = resolve_precision(cfg.dtype)
    optim = resolve_optim(cfg.optim)
    args = build_training_arguments(cfg, precision, optim)  # also sets up the process group (torchrun/accelerate)
    start = start_run(cfg, args, "offline_sdpo")
    is_main, resume, records, summary = start.is_main, start.resume, start.records, start.summary
    model_path, tokenizer, model, attn = start.model_path, start.tokenizer, start.model, start.attn

    resolved = {
        **public_config(asdict(cfg)),
        "resolved": {"model_path": model_path, "precision": precision, "optim": optim, "attn_implementation": attn,
                     "world_size": args.world_size,
                     "effective_batch_size": cfg.batch_size * cfg.grad_accum * args.world_size,
                     "resume_from": resume, "data": summary.to_dict(),
                     "versions": {"transformers": transformers.__version__}},
    }
    ref_model = load_reference(cfg, precision, attn)
    clear_earlier_results(cfg)  # --overwrite: only now, every check that can fail has passed
    if is_main:
        atomic_write_json(Path(cfg.output_dir) / CONFIG_FILENAME, resolved)

    trainer = OfflineSDPOTrainer(
        model=model,
        args=args,
        train_dataset=InteractionDataset(records),
        data_collator=SDPOCollator(tokenizer, cfg.max_context_length, cfg.max_completion_length, cfg.hindsight_template,
                                   hindsight_placement=cfg.hindsight_placement,
                                   contrast_followup=cfg.contrast_followup),
        processing_class=tokenizer,
        callbacks=[MetricsJsonlCallback(Path(cfg.output_dir) / METRICS_FILENAME)],
        objective=cfg.objective_options(),
        max_prompt_length=cfg.max_context_length,
        ref_model=ref_model,
        ref_is_initial_policy=not cfg.ref_model,  # then a frozen full-weight teacher reuses it
    )
    show_progress(trainer, cfg.output_dir, Path(cfg.output_dir) / METRICS_FILENAME,
                  f"offline SDPO ({cfg.loss_mode}), {Path(cfg.model).name}")
    result = trainer.train(resume_from_checkpoint=resume)
    save_final_model(trainer, cfg, model_path, tokenizer)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    print(f"[offline_sdpo] rank {args.process_index}/{args.world_size}: trained on {trainer.interactions_seen} "
          f"interactions in this run", flush=True)
    if is_main:
        print(f"[offline_sdpo] {result.global_step} steps, final model in {cfg.output_dir}", flush=True)
    return {"global_step": result.global_step, "metrics": result.metrics, "config": resolved,
            "interactions_seen": trainer.interactions_seen}


if __name__ == "__main__":
    from auxiliary.runtime.cli import ConfigError, exit_with_error
    from auxiliary.runtime.io_utils import DataError
    from auxiliary.runtime.model_loading import ModelLoadError

    try:
        main()
        leave_process_group()
    except (DataError, ConfigError, ModelLoadError, BadInput) as err:  # bad input: one line, no traceback, exit 2
        sys.exit(exit_with_error(err.message if isinstance(err, BadInput) else err))
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback through transformers
        print("interrupted", file=sys.stderr)
        sys.exit(130)
