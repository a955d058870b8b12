"""Offline SDPO on logged conversations, as a `transformers.Trainer` subclass.

Each training record is one logged interaction (x, y, o):

    {"prompt": [messages up to the last user turn],   # role/content, or from/value with human/gpt
     "completion": "the assistant reply y",            # string or a message dict
     "user_response": "the user's next message o"}     # string or a message dict

The collator renders x and the hindsight context xo with the chat template and tokenizes y
once (EOS appended, so the model also learns when to stop); the loss, the signal and the
KL to a reference model come from `sdpo_objective.sdpo_loss`, the one implementation shared
with the online updater.

Why `transformers.Trainer` and not one of TRL's trainers: TRL's SFT/DPO/GRPO trainers each
own a data pipeline and a loss that do not fit (x, y, o) triples scored twice, so we would
override almost everything. The plain Trainer already gives what matters here: gradient
accumulation, the cosine schedule with warm-up, mixed precision, DDP / FSDP / DeepSpeed
through accelerate, logging callbacks (wandb), checkpoints and `resume_from_checkpoint`.
We only replace `compute_loss` (the SDPO loss) and `log` (SDPO metrics, reduced across
gradient-accumulation micro-batches and ranks).
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import Trainer, TrainerCallback

from auxiliary.runtime.checkpoints import TEACHER_FILE  # in each checkpoint-N folder of an --teacher ema run too
from auxiliary.runtime.io_utils import DataError, append_jsonl, atomic_write_text, iter_jsonl
from sdpo_objective import (DEFAULT_HINDSIGHT_TEMPLATE, ObjectiveOptions, Teacher, build_scoring_batch, check_lm_head,
                            hindsight_contexts, normalize_messages, sdpo_loss)

REQUIRED_FIELDS = ("prompt", "completion", "user_response")


# --------------------------------------------------------------------------- records

class SkipRecord(ValueError):
    """A record that is well-formed but carries nothing to learn from (counted, not fatal)."""


IMPLIED_ROLES = {"completion": "assistant", "user_response": "user"}


def message_text(value: Any, field_name: str) -> str:
    """A completion / follow-up given as a plain string or as one message dict.

    A message without a role is accepted: the field implies it (completion -> assistant,
    user_response -> user); a role that contradicts the field is an error.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        implied = IMPLIED_ROLES[field_name]
        if value.get("role", value.get("from")) is None:
            value = {**value, "role": implied}
        try:
            message = normalize_messages([value])[0]
        except ValueError as err:
            raise ValueError(f"field '{field_name}': {str(err).removeprefix('message 0 ')}") from None
        if message["role"] != implied:
            raise ValueError(f"field '{field_name}' is a message of role {message['role']!r}, expected {implied!r}")
        return message["content"]
    raise ValueError(f"field '{field_name}' must be a string or a message object, got {type(value).__name__}")


def normalize_record(record: dict) -> dict:
    """{prompt, completion, user_response} in any accepted shape -> role/content messages and two strings.

    Raises ValueError for malformed records and SkipRecord for empty completions / follow-ups.
    """
    missing = [name for name in REQUIRED_FIELDS if name not in record or record[name] is None]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    prompt = record["prompt"]
    if isinstance(prompt, str):  # a bare single-turn prompt
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise ValueError("field 'prompt' must be a non-empty list of messages")
    try:
        messages = normalize_messages(prompt)
    except ValueError as err:
        raise ValueError(f"field 'prompt': {err}") from None
    if not any(m["role"] == "user" for m in messages):
        raise ValueError("field 'prompt' has no user message to attach the follow-up to")
    if messages[-1]["role"] == "assistant":  # the completion answers the prompt's last turn: a user's
        raise ValueError("field 'prompt' ends with an assistant turn (the completion must answer a user message)")
    completion = message_text(record["completion"], "completion")
    followup = message_text(record["user_response"], "user_response")
    if not completion.strip():
        raise SkipRecord("empty completion")
    if not followup.strip():
        raise SkipRecord("empty user_response")
    return {"prompt": messages, "completion": completion, "user_response": followup}


@dataclass
class LoadSummary:
    path: str
    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def describe(self) -> str:
        text = f"{self.path}: {self.read} records read, {self.kept} kept"
        if self.skipped:
            text += ", skipped: " + ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
        return text

    def to_dict(self) -> dict:
        return {"path": self.path, "read": self.read, "kept": self.kept, "skipped": dict(self.skipped)}


def load_interactions(path: str | Path) -> tuple[list[dict], LoadSummary]:
    """Read and validate an interactions JSONL. Malformed lines / records fail with file:line and field."""
    summary = LoadSummary(str(path))
    if not Path(path).exists():  # where the data comes from, as the online run's and the wrappers' messages say
        raise DataError(f"--train_jsonl {path}: file not found. scripts/prepare_data.sh writes data/wildfeedback/ and "
                        "data/wildchat/ (from the hub); data/samples/interactions.jsonl holds 24 bundled interactions "
                        "that need no download")
    records = []
    for line_number, raw in iter_jsonl(path):
        summary.read += 1
        try:
            records.append(normalize_record(raw))
        except SkipRecord as reason:
            summary.skipped[str(reason)] += 1
        except ValueError as err:
            raise DataError(f"{path}:{line_number}: {err}") from None
    summary.kept = len(records)
    if not records:
        raise DataError(f"{path}: no usable interaction records ({summary.describe()})")
    return records, summary


class InteractionDataset(torch.utils.data.Dataset):
    """Normalised records; tokenisation happens in the collator (cheap next to two forward passes)."""

    def __init__(self, records: Sequence[dict]):
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.records[index]


# --------------------------------------------------------------------------- collator

class SDPOCollator:
    """Records -> token ids of x, xo and y (python lists; `compute_loss` pads them with build_scoring_batch).

    - x and xo are rendered with the chat template (generation prompt on, Qwen3 thinking off) and
      left-truncated to `max_prompt_length`, so the assistant header right before y survives.
    - y is tokenized once; EOS is appended so the stop decision gets signal too. A completion longer
      than `max_completion_length` is cut there and gets NO EOS: the logged reply did not end there.
    """

    def __init__(self, tokenizer, max_prompt_length: int = 2048, max_completion_length: int = 2048,
                 hindsight_template: str = DEFAULT_HINDSIGHT_TEMPLATE, append_eos: bool = True,
                 hindsight_placement: str = "last_user_message", contrast_followup: str = ""):
        if tokenizer.eos_token_id is None and append_eos:
            raise ValueError("the tokenizer has no EOS token to append to completions")
        if max_prompt_length < 1 or max_completion_length < 1:
            raise ValueError("max_prompt_length and max_completion_length must be >= 1")
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        self.max_completion_length = max_completion_length
        self.hindsight_template = hindsight_template
        self.hindsight_placement = hindsight_placement
        self.contrast_followup = contrast_followup  # --contrast_followup: x o_neutral too ("neutral_ids")
        self.append_eos = append_eos

    def encode(self, record: dict) -> dict:
        record = normalize_record(record)
        messages = record["prompt"]
        x_ids, xo_ids, neutral_ids = hindsight_contexts(self.tokenizer, messages, record["user_response"],
                                                        self.hindsight_template, self.hindsight_placement,
                                                        self.contrast_followup)
        completion_ids = self.tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        if self.append_eos and (not completion_ids or completion_ids[-1] != eos):
            completion_ids = completion_ids + [eos]
        if len(completion_ids) > self.max_completion_length:
            completion_ids = completion_ids[: self.max_completion_length]
        has_eos = bool(self.append_eos and completion_ids[-1] == eos)
        encoded = {
            "x_ids": x_ids[-self.max_prompt_length:],
            "xo_ids": xo_ids[-self.max_prompt_length:],
            "completion_ids": completion_ids,
            "has_eos": has_eos,
            "prompt_truncated": len(xo_ids) > self.max_prompt_length,
        }
        if neutral_ids is not None:
            encoded["neutral_ids"] = neutral_ids[-self.max_prompt_length:]
        return encoded

    def __call__(self, records: Sequence[dict]) -> dict:
        encoded = [self.encode(r) for r in records]
        return {key: [e[key] for e in encoded] for key in encoded[0]}


# --------------------------------------------------------------------------- metrics

# Sums kept per rank between two logging steps, then all-reduced (SUM) across ranks, so every
# logged value is a proper average over all micro-batches of all ranks in the logging window.
_SLOTS = ("tokens", "sum_a", "sum_a2", "sum_abs_a", "sum_logp_x", "sum_logp_xo", "sequences", "sum_seq_mean",
          "eos_count", "sum_eos", "truncated", "sum_ref_kl", "sum_distill_kl", "sum_end_signal")


def accumulate_stats(sums: dict[str, float], stats: dict, has_eos: Sequence[bool],
                     prompt_truncated: Sequence[bool] = ()) -> None:
    """Add one micro-batch's sdpo_loss stats to the running sums (raw signal A_t, before any shaping)."""
    tokens = stats["tokens"]
    for signal, eos in zip(stats["signal_per_sequence"], has_eos):
        signal = signal.double()
        sums["sum_a"] += float(signal.sum())
        sums["sum_a2"] += float((signal * signal).sum())
        sums["sum_abs_a"] += float(signal.abs().sum())
        sums["sum_seq_mean"] += float(signal.mean())
        sums["sequences"] += 1
        if eos:  # the appended EOS is the last scored token of this completion
            sums["eos_count"] += 1
            sums["sum_eos"] += float(signal[-1])
    sums["tokens"] += tokens
    sums["sum_logp_x"] += stats["logp_x"] * tokens
    sums["sum_logp_xo"] += stats["logp_xo"] * tokens
    sums["truncated"] += sum(bool(t) for t in prompt_truncated)
    sums["sum_ref_kl"] += stats.get("ref_kl", 0.0) * tokens
    sums["sum_distill_kl"] += stats.get("distill_kl", 0.0) * tokens
    sums["sum_end_signal"] += stats.get("end_signal_mean", 0.0) * tokens  # --end_signal_weight


def new_sums() -> dict[str, float]:
    return dict.fromkeys(_SLOTS, 0.0)


def metrics_from_sums(sums: dict[str, float], with_ref_kl: bool = False,
                      with_distill_kl: bool = False, with_end_signal: bool = False) -> dict[str, float]:
    """Pooled over every token (or reply) of the window; std is the pooled sample std of A_t."""
    tokens, seqs = sums["tokens"], sums["sequences"]
    if tokens <= 0:
        return {}
    mean = sums["sum_a"] / tokens
    variance = max(sums["sum_a2"] / tokens - mean * mean, 0.0) * (tokens / (tokens - 1) if tokens > 1 else 0.0)
    metrics = {
        "signal_mean": mean,
        "signal_std": math.sqrt(variance),
        "signal_abs_mean": sums["sum_abs_a"] / tokens,
        "signal_seq_mean": sums["sum_seq_mean"] / seqs,  # length-normalised: mean over replies of mean_t A_t
        "logp_x": sums["sum_logp_x"] / tokens,
        "logp_xo": sums["sum_logp_xo"] / tokens,
        "completion_tokens": tokens / seqs,
        "prompt_truncated_frac": sums["truncated"] / seqs,
    }
    if sums["eos_count"] > 0:
        metrics["eos_signal"] = sums["sum_eos"] / sums["eos_count"]
    if with_ref_kl:
        metrics["ref_kl"] = sums["sum_ref_kl"] / tokens
    if with_distill_kl:
        metrics["distill_kl"] = sums["sum_distill_kl"] / tokens
    if with_end_signal:  # micro-batches weighted by their tokens
        metrics["end_signal_mean"] = sums["sum_end_signal"] / tokens
    return metrics


class MetricsJsonlCallback(TrainerCallback):
    """`metrics.jsonl`: one line per logged training step (rank 0). On resume, lines past the checkpoint go."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= state.global_step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            append_jsonl(self.path, {"step": state.global_step, **logs})


# --------------------------------------------------------------------------- trainer

class OfflineSDPOTrainer(Trainer):
    """transformers.Trainer whose loss is the SDPO loss of `sdpo_objective`.

    Extra arguments: `objective` (ObjectiveOptions), `max_prompt_length`, `ref_model` (frozen, for beta > 0;
    also the frozen teacher of `objective.teacher == "frozen"` when `ref_is_initial_policy`).
    The collator must be an SDPOCollator (or produce the same keys); `remove_unused_columns` must be False.
    """

    # sdpo_loss returns a per-micro-batch mean: the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, objective: ObjectiveOptions, max_prompt_length: int = 2048, ref_model=None,
                 ref_is_initial_policy: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.remove_unused_columns:
            raise ValueError("OfflineSDPOTrainer needs TrainingArguments(remove_unused_columns=False)")
        if objective.beta > 0 and ref_model is None:
            raise ValueError("beta > 0 needs a reference model")
        self.objective = objective
        self.max_prompt_length = max_prompt_length
        self.ref_model = None
        if ref_model is not None and objective.beta > 0:
            self.ref_model = ref_model.to(self.accelerator.device).eval().requires_grad_(False)
        self._sums = new_sums()
        self.interactions_seen = 0  # by this rank, in this run (a per-rank progress check)
        check_lm_head(self.model)
        self.teacher = self._build_teacher(objective, ref_is_initial_policy)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pad_id = self.processing_class.pad_token_id
        device = self.accelerator.device
        batch_x = build_scoring_batch(inputs["x_ids"], inputs["completion_ids"], pad_id, self.max_prompt_length, device)
        batch_xo = build_scoring_batch(inputs["xo_ids"], inputs["completion_ids"], pad_id, self.max_prompt_length,
                                       device)
        batch_neutral = None
        if self.objective.contrast_followup:
            if "neutral_ids" not in inputs:
                raise ValueError("--contrast_followup: the collator must give neutral_ids "
                                 "(SDPOCollator(contrast_followup=...))")
            batch_neutral = build_scoring_batch(inputs["neutral_ids"], inputs["completion_ids"], pad_id,
                                                self.max_prompt_length, device)
        loss, stats = sdpo_loss(model, batch_x, batch_xo, self.objective, ref_model=self.ref_model,
                                teacher=self.teacher, batch_neutral=batch_neutral)
        if model.training:
            accumulate_stats(self._sums, stats, inputs["has_eos"], inputs.get("prompt_truncated", ()))
            self.interactions_seen += len(inputs["completion_ids"])
        return (loss, {"stats": stats}) if return_outputs else loss

    def _reduce_sums(self) -> dict[str, float]:
        """Sum the per-rank accumulators over all ranks (a collective: every rank calls it at the same log step)."""
        local = torch.tensor([self._sums[k] for k in _SLOTS], dtype=torch.float64, device=self.accelerator.device)
        total = self.accelerator.reduce(local, reduction="sum") if self.accelerator.num_processes > 1 else local
        self._sums = new_sums()
        return dict(zip(_SLOTS, total.cpu().tolist()))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log step: the same on every rank, so the reduction cannot deadlock
            logs.update(metrics_from_sums(self._reduce_sums(), with_ref_kl=self.ref_model is not None,
                                           with_distill_kl=self.objective.loss_mode == "full_distillation",
                                           with_end_signal=self.objective.end_signal_weight > 0))
        super().log(logs, start_time)

    # ------------------------------------------------------------------ teacher (--teacher)
    def _build_teacher(self, objective: ObjectiveOptions, ref_is_initial_policy: bool) -> Teacher:
        copies_weights = objective.teacher == "ema" or (objective.teacher == "frozen"
                                                        and not hasattr(self.model, "peft_config"))
        if copies_weights and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            raise ValueError(
                f"--teacher {objective.teacher} keeps its own weights, which DeepSpeed / FSDP would shard: "
                             "use --teacher live, or --teacher frozen with --use_lora")
        reuse = self.ref_model if (objective.teacher == "frozen" and ref_is_initial_policy) else None
        teacher = Teacher(self.model, objective.teacher, objective.teacher_ema_rate, frozen_copy=reuse)
        if teacher.mode == "ema":
            self.add_callback(_TeacherEmaCallback(teacher))
        return teacher

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.teacher.mode == "ema" and self.args.should_save:
            from safetensors.torch import save_file
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            save_file(self.teacher.state_dict(), str(folder / TEACHER_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.teacher.mode == "ema":
            from safetensors.torch import load_file

            file = Path(resume_from_checkpoint) / TEACHER_FILE
            if not file.is_file():
                raise DataError(f"{file}: missing (the checkpoint was not written by an --teacher ema run)")
            self.teacher.load_state_dict(load_file(str(file), device=str(self.accelerator.device)), source=str(file))


class _TeacherEmaCallback(TrainerCallback):
    """One EMA step of the teacher after every optimizer step (on every rank: the ranks stay equal)."""

    def __init__(self, teacher: Teacher):
        self.teacher = teacher

    def on_step_end(self, args, state, control, **kwargs):
        self.teacher.update()
