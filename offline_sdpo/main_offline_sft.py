"""SFT baseline for offline SDPO: fine-tune on the logged replies of the same interactions JSONL.

    python offline_sdpo/main_offline_sft.py --train_jsonl data.jsonl --output_dir out/
    accelerate launch --config_file offline_sdpo/configs/multigpu.yaml --num_processes 4 \
        offline_sdpo/main_offline_sft.py --train_jsonl data.jsonl --output_dir out/

The user's follow-up is ignored: each record (x, y, o) becomes the prompt-completion pair (x, y) and
TRL's SFTTrainer minimises -log p(y|x) over the completion tokens only. Everything else is the SDPO
trainer's: the loader and its checks (the same records are kept), the tokens (x rendered with the chat
template and cut from the left, y tokenized once with EOS appended, by SDPOCollator.encode), the flags
and their defaults, the run folder and its lock, checkpoints, metrics.jsonl and the saved model
(with --use_lora the adapter in output_dir/adapter and the merged model in output_dir).
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from offline_sdpo.main_offline_sdpo import (METRICS_FILENAME, OfflineTrainingArguments, build_training_arguments,
                                            clear_earlier_results, resolve_optim, resolve_precision, save_final_model,
                                            start_run, train_holding_output_dir)

CONFIG_FILENAME = "offline_sft_config.json"  # the SDPO trainer's offline_sdpo_config.json, for this trainer
logger = logging.getLogger("offline_sft")


@dataclass
class OfflineSFTArguments(OfflineTrainingArguments):
    """The SDPO trainer's flags without the objective (and the follow-up's template): same defaults, same spellings."""


def sft_example(collator, record: dict) -> dict:
    """One pre-tokenized prompt-completion example in TRL's format: the loss falls where completion_mask is 1."""
    encoded = collator.encode(record)
    prompt_ids, completion_ids = encoded["x_ids"], encoded["completion_ids"]
    return {"input_ids": prompt_ids + completion_ids,
            "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids)}


def build_sft_dataset(records: list[dict], tokenizer, cfg: OfflineSFTArguments):
    from datasets import Dataset

    from offline_sdpo.offline_sdpo_trainer import SDPOCollator

    collator = SDPOCollator(tokenizer, cfg.max_context_length, cfg.max_completion_length)
    return Dataset.from_list([sft_example(collator, record) for record in records])


def build_sft_config(cfg: OfflineSFTArguments, precision: str, optim: str):
    from trl import SFTConfig

    return build_training_arguments(
        cfg, precision, optim, SFTConfig,
        remove_unused_columns=True, label_names=None,  # TRL's collator builds input_ids / labels from our columns
        completion_only_loss=True,  # prompt tokens get label -100 (a pre-tokenized dataset would not imply it)
        max_length=None,            # already cut: prompt from the left, completion from the right
    )


def main(argv: Optional[list[str]] = None) -> dict:
    """Parse the flags and train. Bad input raises ConfigError / DataError / ModelLoadError (exit 2 from the CLI)."""
    from auxiliary.runtime.cli import ConfigError, parse_dataclasses

    try:
        (cfg,) = parse_dataclasses([OfflineSFTArguments], argv, prog="main_offline_sft.py")
    except ValueError as err:  # a bad value of a field
        raise ConfigError(str(err)) from None
    if not cfg.train_jsonl:
        raise ConfigError("--train_jsonl is required (an interactions JSONL: prompt, completion, user_response)")
    if not cfg.output_dir:
        raise ConfigError("no output folder: pass --output_dir or set OUTPUT_DIR")
    return train_holding_output_dir(cfg, train)


def train(cfg: OfflineSFTArguments) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import transformers
    import trl
    from trl import SFTTrainer

    from auxiliary.runtime.io_utils import atomic_write_json
    from auxiliary.runtime.secrets import public_config
    from offline_sdpo.offline_sdpo_trainer import MetricsJsonlCallback
    from offline_sdpo.progress import show_progress

    precision = resolve_precision(cfg.dtype)
    optim = resolve_optim(cfg.optim)
    args = build_sft_config(cfg, precision, optim)  # also sets up the process group (torchrun/accelerate)
    start = start_run(cfg, args, "offline_sft", " (follow-ups ignored)")
    is_main, resume, records, summary = start.is_main, start.resume, start.records, start.summary
    model_path, tokenizer, model, attn = start.model_path, start.tokenizer, start.model, start.attn
    dataset = build_sft_dataset(records, tokenizer, cfg)

    resolved = {
        **public_config(asdict(cfg)),
        "resolved": {"method": "sft", "model_path": model_path, "precision": precision, "optim": optim,
                     "attn_implementation": attn, "world_size": args.world_size,
                     "effective_batch_size": cfg.batch_size * cfg.grad_accum * args.world_size,
                     "resume_from": resume, "data": summary.to_dict(),
                     "completion_tokens": sum(sum(mask) for mask in dataset["completion_mask"]),
                     "versions": {"transformers": transformers.__version__, "trl": trl.__version__}},
    }
    clear_earlier_results(cfg)  # --overwrite: only now, every check that can fail has passed
    if is_main:
        atomic_write_json(Path(cfg.output_dir) / CONFIG_FILENAME, resolved)

    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[MetricsJsonlCallback(Path(cfg.output_dir) / METRICS_FILENAME)],
    )
    show_progress(trainer, cfg.output_dir, Path(cfg.output_dir) / METRICS_FILENAME,
                  f"offline SFT baseline, {Path(cfg.model).name}")
    result = trainer.train(resume_from_checkpoint=resume)
    save_final_model(trainer, cfg, model_path, tokenizer)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    if is_main:
        print(f"[offline_sft] {result.global_step} steps, final model in {cfg.output_dir}", flush=True)
    return {"global_step": result.global_step, "metrics": result.metrics, "config": resolved}


if __name__ == "__main__":
    from auxiliary.runtime.cli import ConfigError, exit_with_error
    from auxiliary.runtime.io_utils import DataError
    from auxiliary.runtime.model_loading import ModelLoadError

    from offline_sdpo.main_offline_sdpo import BadInput, leave_process_group

    try:
        main()
        leave_process_group()
    except (DataError, ConfigError, ModelLoadError, BadInput) as err:  # bad input: one line, no traceback
        sys.exit(exit_with_error(err.message if isinstance(err, BadInput) else err))
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback through transformers
        print("interrupted", file=sys.stderr)
        sys.exit(130)
