"""OnlineSDPOUpdater: generate a reply, take a follow-up, update the policy, checkpoint, resume.

    updater = OnlineSDPOUpdater(OnlineSDPOConfig(model="smollm2-135m-instruct"))
    reply = updater.generate([messages])[0]
    metrics = updater.train_step(messages, reply.ids, "Please be more concise.")
    updater.save_checkpoint()

The teacher is the current model under the hindsight context, with no gradient,
refreshed at every step (no frozen copy); --teacher frozen|ema keep one (sdpo_objective.Teacher).
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from auxiliary.runtime.checkpoints import (OPTIMIZER_FILE, STATE_FILE, TEACHER_FILE, CheckpointError, checkpoint_name,
                                           load_rng_state, prune_checkpoints, safe_torch_load, save_rng_state,
                                           verify_checkpoint, write_manifest)
# The Python API's names for finding checkpoints (docs/python_api.md), kept importable from here:
from auxiliary.runtime.checkpoints import latest_checkpoint, list_checkpoints  # noqa: F401
from auxiliary.runtime.generation import GeneratedResponse, generate_responses
from auxiliary.runtime.io_utils import (atomic_write_json, fsync_tree, partial_path, private_dir, recover_folder,
                                        replace_folder)
from auxiliary.runtime.model_loading import load_model_and_tokenizer, pick_device
from auxiliary.runtime.secrets import public_config
from online_sdpo_updater_config import OnlineSDPOConfig
from sdpo_objective import (Teacher, build_scoring_batch, check_lm_head, hindsight_contexts, normalize_messages,
                            sdpo_loss, token_weights)

logger = logging.getLogger(__name__)

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class OnlineSDPOUpdater:
    def __init__(self, config: OnlineSDPOConfig, model=None, tokenizer=None):
        self.config = config
        seed_everything(config.seed)
        if model is None:
            model, tokenizer, self.model_path = load_model_and_tokenizer(
                config.model, config.dtype, config.attn_implementation, config.device)
        else:
            self.model_path = config.model
            model.to(pick_device(config.device))
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.ref_model = None
        if config.beta > 0:
            self.ref_model, _, _ = load_model_and_tokenizer(config.ref_model or config.model, config.dtype,
                                                            config.attn_implementation, config.device)
            self.ref_model.requires_grad_(False)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if config.use_lora:
            model = self._wrap_lora(model)
        self.model = model
        check_lm_head(self.model)
        self.teacher = self._build_teacher()
        self.model.train()
        self.options = config.objective_options()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay,
                                           eps=config.adam_epsilon)
        self.scheduler = make_lr_scheduler(self.optimizer, config)
        self.step = 0
        self.skipped_nonfinite = 0
        self._vllm = None
        self.train_model = self.model  # what the loss runs through: the model, or its DDP wrapper (distribute)
        self._loss_scale = 1.0

    # ------------------------------------------------------------------ setup
    def _wrap_lora(self, model):
        from peft import LoraConfig, PeftModel, get_peft_model

        if isinstance(model, PeftModel):  # handed an adapter already (the placebo's copy of the policy): train it
            return model

        targets = self.config.lora_target_modules
        target_modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
        lora = LoraConfig(r=self.config.lora_r, lora_alpha=self.config.lora_alpha,
                          lora_dropout=self.config.lora_dropout, target_modules=target_modules, task_type="CAUSAL_LM")
        return get_peft_model(model, lora)

    def trainable_parameters(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    # ------------------------------------------------------------------ generation
    def generate(self, conversations: Sequence[Sequence[dict]], max_new_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                 progress: bool = False, desc: str = "generate", workers: int = 1) -> list[GeneratedResponse]:
        """Replies as text and ids; `workers` > 1: that many batches at once in threads (generate_responses)."""
        conversations = [normalize_messages(c) for c in conversations]
        max_new_tokens = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        temperature = self.config.temperature if temperature is None else temperature
        top_p = self.config.top_p if top_p is None else top_p
        if self.config.use_vllm:
            return self.vllm_engine().generate(conversations, max_new_tokens, temperature, top_p, seed)
        return generate_responses(self.model, self.tokenizer, conversations, max_new_tokens, temperature, top_p,
                                  self.config.generation_batch_size, self.config.max_context_length, seed,
                                  progress, desc, workers)

    def generate_response(self, messages: Sequence[dict]) -> str:
        """The paper repository's call: one reply to one conversation, as text."""
        return self.generate([messages])[0].text

    def generate_responses_batch(self, conversations: Sequence[Sequence[dict]]) -> list[str]:
        """The paper repository's call: one batched generation, the replies as text."""
        return [reply.text for reply in self.generate(conversations)]

    def vllm_engine(self):
        """The policy's vLLM engine (started on first use), holding the adapter of the current step."""
        if self._vllm is None:
            from auxiliary.runtime.vllm_adapter import VLLMPolicyGenerator  # lazy: vLLM is an optional extra

            # the trained model's dtype: the engine's replies are then the policy's own (fp32 on CPU)
            self._vllm = VLLMPolicyGenerator(self.model_path, self.tokenizer, self.config, dtype=self.model.dtype)
        self._vllm.sync_weights(self.model, self.step)
        return self._vllm

    def close(self) -> None:
        """Stop the vLLM engine (if one was started) and remove its adapter folders."""
        if self._vllm is not None:
            self._vllm.close()
            self._vllm = None

    # ------------------------------------------------------------------ training
    def distribute(self, device_ids=None) -> None:
        """Train through torch DDP (a process group must be up): each process updates on its own interactions,
        DDP averages the gradients, and train_batch scales each process's loss so that average is the gradient
        of the loss on the union of the processes' interactions. Generation and checkpoints use the plain model."""
        from torch.nn.parallel import DistributedDataParallel

        self.train_model = DistributedDataParallel(self.model, device_ids=device_ids)

    def _union_loss_scale(self, batch_x) -> float:
        """world x (this process's share of the loss's denominator): full_distillation is a mean over reply
        tokens, simple_signal a mean over replies (exact for equal replies per process; the run checks that)."""
        import torch.distributed as dist

        if self.train_model is self.model:
            return 1.0
        if self.config.loss_mode == "simple_signal":
            mine = float(batch_x.response_ids.shape[0])
        else:  # the objective's token weights (ignore_first_k, copy guard)
            mine = float(token_weights(batch_x.response_ids, batch_x.response_mask, self.options).sum())
        total = torch.tensor([mine], dtype=torch.float64)
        dist.all_reduce(total)
        return dist.get_world_size() * mine / max(float(total), 1.0)

    def build_batches(self, conversations: Sequence[Sequence[dict]], response_ids: Sequence[Sequence[int]],
                      followups: Sequence[str]):
        """(x, xo, x o_neutral or None) scoring batches; the third with --contrast_followup."""
        config = self.config
        contexts = [hindsight_contexts(self.tokenizer, messages, followup, config.hindsight_template,
                                       config.hindsight_placement, config.contrast_followup)
                    for messages, followup in zip(conversations, followups)]
        pad, limit = self.tokenizer.pad_token_id, config.max_context_length
        batches = [build_scoring_batch([c[i] for c in contexts], response_ids, pad, limit, self.device) for i in (0, 1)]
        neutral = build_scoring_batch([c[2] for c in contexts], response_ids, pad, limit, self.device) \
            if config.contrast_followup else None
        return batches[0], batches[1], neutral

    def train_step(self, messages: Sequence[dict], response_ids: Sequence[int] | str, followup: str) -> dict:
        """One interaction (x, y, o) -> `train_steps_per_example` gradient steps; returns metrics.

        y is best given as the sampled ids (`generate(...)[i].ids`): the text decoded from them may
        tokenize differently, and then the update scores tokens the policy never sampled. The paper
        repository's call with y as text also works (tokenized once here, `response_ids_from_text`)."""
        if isinstance(response_ids, str):
            response_ids = self.response_ids_from_text(response_ids)
        return self.train_batch([messages], [response_ids], [followup])

    def response_ids_from_text(self, text: str) -> list[int]:
        """A reply given as text, as the ids the policy would have ended it with (EOS appended)."""
        if not text.strip():
            raise ValueError("the assistant response is empty")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids

    def train_batch(self, conversations, response_ids, followups) -> dict:
        started = time.perf_counter()
        if self._vllm is not None:
            self._vllm.sleep()  # --vllm_enable_sleep_mode: the engine's memory is the update's until the next generate
        batch_x, batch_xo, batch_neutral = self.build_batches(conversations, response_ids, followups)
        self._loss_scale = self._union_loss_scale(batch_x)
        first: dict | None = None
        losses = []
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this interaction's (first) update uses
        for _ in range(self.config.train_steps_per_example):
            stats = self._gradient_step(batch_x, batch_xo, batch_neutral)
            first = first or stats
            losses.append(stats["loss"])
        self.step += 1
        metrics = {k: v for k, v in first.items() if k != "signal_per_sequence"}
        metrics.update({"step": self.step, "loss": losses[-1], "loss_first": losses[0],
                        "skipped_nonfinite": self.skipped_nonfinite, "lr": lr,
                        "seconds": time.perf_counter() - started})
        metrics["signal_per_sequence"] = first["signal_per_sequence"]
        every = self.config.checkpoint_every
        if every and self.config.checkpoint_dir and self.step % every == 0:
            self.save_checkpoint()
        return metrics

    def _gradient_step(self, batch_x, batch_xo, batch_neutral=None) -> dict:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss, stats = sdpo_loss(self.train_model, batch_x, batch_xo, self.options, self.ref_model, self.teacher,
                                batch_neutral)
        if not torch.isfinite(loss):
            return self._skip(stats, float("nan"))
        (loss * self._loss_scale).backward()
        params = [p for p in self.model.parameters() if p.requires_grad]
        clip = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        if not math.isfinite(grad_norm):
            return self._skip(stats, grad_norm)
        self.optimizer.step()
        self.scheduler.step()  # per real update: a skipped step does not advance the schedule
        self.teacher.update()
        self.optimizer.zero_grad(set_to_none=True)
        stats.update(grad_norm=grad_norm, skipped=False)
        return stats

    def _skip(self, stats: dict, grad_norm: float) -> dict:
        """Non-finite loss or gradient: leave weights and optimizer state untouched, count it."""
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_nonfinite += 1
        logger.warning("step %d: non-finite loss/gradient, update skipped (%d so far)", self.step + 1,
                       self.skipped_nonfinite)
        stats.update(grad_norm=grad_norm, skipped=True)
        return stats

    # ------------------------------------------------------------------ teacher (--teacher)
    def _build_teacher(self) -> Teacher:
        """live: nothing kept; frozen / ema: sdpo_objective.Teacher. A frozen full-weight teacher is the
        beta reference model when that holds the initial weights too: one frozen copy for both."""
        reference = None
        if self.config.teacher == "frozen" and not self.config.use_lora and self.ref_model is not None:
            pairs = zip(self.ref_model.state_dict().values(), self.model.state_dict().values())
            if not self.config.ref_model and all(a.shape == b.shape and torch.equal(a, b) for a, b in pairs):
                reference = self.ref_model
        return Teacher(self.model, self.config.teacher, self.config.teacher_ema_rate, frozen_copy=reference)

    def _save_teacher(self, folder: Path) -> None:
        if self.teacher.mode == "ema":  # frozen needs nothing: the initial weights are rebuilt on resume
            from safetensors.torch import save_file

            save_file(self.teacher.state_dict(), str(folder / TEACHER_FILE))

    def _load_teacher(self, folder: Path) -> None:
        if self.teacher.mode != "ema":
            return
        file = folder / TEACHER_FILE
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (the checkpoint was not written by an --teacher ema run)")
        from safetensors.torch import load_file

        try:
            self.teacher.load_state_dict(load_file(str(file), device=str(self.device)), source=str(file))
        except ValueError as err:
            raise CheckpointError(str(err)) from None

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str | Path | None = None, extra_state: dict | None = None) -> Path:
        """Model (or LoRA adapter), tokenizer, optimizer, RNG states, step, config and a manifest of
        every file's size and sha256; written beside as .partial, then swapped in crash-safely.

        `path`: None -> checkpoint_dir/step_N; a bare name (a tag such as "final", as the paper
        repository's save_checkpoint(tag)) -> checkpoint_dir/<tag> when checkpoint_dir is set; any
        other path is used as given. Tags other than step_N are never pruned.

        Nothing is pickled: the optimizer state is tensors and plain values (loaded back with
        weights_only=True), the RNG states are a tensor file and JSON."""
        if path is None:
            if not self.config.checkpoint_dir:
                raise ValueError("no checkpoint path given and config.checkpoint_dir is not set")
            path = Path(self.config.checkpoint_dir) / checkpoint_name(self.step)
        elif self.config.checkpoint_dir and _is_tag(path):
            path = Path(self.config.checkpoint_dir) / str(path)
        path = Path(path)
        private_dir(path.parent)
        recover_folder(path)  # a crash of an earlier save: put its old folder back before replacing it
        partial = partial_path(path)
        try:
            private_dir(partial)
            self.model.save_pretrained(partial / "model")
            self.tokenizer.save_pretrained(partial / "model")
            torch.save(self.optimizer.state_dict(), partial / OPTIMIZER_FILE)
            self._save_teacher(partial)
            save_rng_state(partial)
            state = {"step": self.step, "skipped_nonfinite": self.skipped_nonfinite, "use_lora": self.config.use_lora,
                     "scheduler": self.scheduler.state_dict(), "extra": extra_state or {}}
            atomic_write_json(partial / STATE_FILE, state)
            atomic_write_json(partial / "config.json", public_config(self.config.to_dict()))
            write_manifest(partial)
            fsync_tree(partial)  # contents on disk before the name says the checkpoint is complete
        except Exception as err:  # the unfinished copy goes (it holds space); the previous checkpoint is untouched
            shutil.rmtree(partial, ignore_errors=True)
            raise as_write_error(err, path) from None
        replace_folder(partial, path)
        self._prune(path.parent)
        return path

    def _prune(self, folder: Path) -> None:
        prune_checkpoints(folder, self.config.max_checkpoints)

    def load_checkpoint(self, path: str | Path) -> dict:
        """Restore weights, optimizer, RNG and step so the run continues exactly where it stopped.

        The checkpoint is verified against its manifest first; nothing read is unpickled."""
        path = Path(path)
        recover_folder(path)
        if not (path / STATE_FILE).exists():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
        verify_checkpoint(path)
        state = json.loads((path / STATE_FILE).read_text())
        model_dir = path / "model"
        if self.config.use_lora:
            from peft import get_peft_model_state_dict, set_peft_model_state_dict
            from safetensors.torch import load_file

            weights_file = model_dir / "adapter_model.safetensors"
            weights = load_file(str(weights_file))
            check_adapter_fits(weights, get_peft_model_state_dict(self.model), weights_file)
            set_peft_model_state_dict(self.model, weights)
        else:
            from transformers import AutoModelForCausalLM

            saved = AutoModelForCausalLM.from_pretrained(model_dir, dtype=next(self.model.parameters()).dtype)
            self.model.load_state_dict(saved.state_dict())
            del saved
        self.optimizer.load_state_dict(safe_torch_load(path / OPTIMIZER_FILE, map_location=self.device))
        self._load_teacher(path)
        load_rng_state(path)
        if "scheduler" in state:  # checkpoints written before the schedule existed ran at a constant lr
            self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.skipped_nonfinite = int(state.get("skipped_nonfinite", 0))
        return state.get("extra", {})


def as_write_error(err: Exception, path: Path) -> Exception:
    """torch.save and safetensors report a failed write (a full disk, `ulimit -f`) as a RuntimeError /
    SafetensorError without an errno: turned into the OSError naming `path` that the entry points print
    as `cannot write PATH: ...`; any other error is returned unchanged."""
    if isinstance(err, OSError):
        return err if err.filename else OSError(err.errno, err.strerror or str(err), str(path))
    text = str(err)
    if not any(sign in text for sign in ("I/O error", "os error", "inline_container", "file write failed")):
        return err
    found = re.search(r"os error (\d+)", text)
    if found:
        number = int(found.group(1))
        return OSError(number, os.strerror(number), str(path))
    import resource

    if shutil.disk_usage(path.parent).free < 1 << 20:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        return OSError(errno.EFBIG, os.strerror(errno.EFBIG), str(path))
    return OSError(errno.EIO, f"the write failed ({text.strip()[:80]}; a full disk or a file size limit?)", str(path))


def check_adapter_fits(saved: dict, expected: dict, weights_file: Path) -> None:
    """A saved LoRA adapter whose tensors differ in name or shape from this model's adapter (another
    --lora_r, --lora_target_modules, base model) is refused before anything is loaded: peft would skip
    what does not match and the optimizer state would then fail on the first update."""
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    reshaped = sorted(k for k in set(saved) & set(expected) if tuple(saved[k].shape) != tuple(expected[k].shape))
    if not (missing or unexpected or reshaped):
        return
    if reshaped:
        first = reshaped[0]
        detail = f"{first} has shape {tuple(saved[first].shape)}, this model's {tuple(expected[first].shape)}"
    else:
        detail = (f"{len(missing)} of this model's adapter tensors are missing (e.g. {missing[0]})" if missing else
                  f"it holds {len(unexpected)} tensors this model's adapter lacks (e.g. {unexpected[0]})")
    raise CheckpointError(f"{weights_file}: the saved adapter does not fit this model's adapter ({detail}); "
                          "use the LoRA settings it was saved with (its adapter_config.json)")


def _is_tag(path) -> bool:
    """A checkpoint name without any folder part ("final", "step_000010"), not a path."""
    text = str(path)
    return bool(text) and Path(text).name == text and text not in (".", "..")


def make_lr_scheduler(optimizer, config: OnlineSDPOConfig):
    """transformers' schedule for config.lr_scheduler, stepped once per update (its state is plain
    numbers, saved in updater_state.json)."""
    from transformers import get_scheduler

    if config.lr_scheduler == "constant":
        name = "constant_with_warmup" if config.warmup_steps else "constant"
        return get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps or None)
    if not config.scheduler_steps:
        raise ValueError(f"--lr_scheduler {config.lr_scheduler} needs --scheduler_steps (the updates to decay over)")
    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps,
                         num_training_steps=config.scheduler_steps)
