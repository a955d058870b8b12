"""OnlineSDPOUpdater: generate a reply, take a follow-up, update the policy, checkpoint, resume.

    updater = OnlineSDPOUpdater(OnlineSDPOConfig(model="smollm2-135m-instruct"))
    reply = updater.generate([messages])[0]
    metrics = updater.train_step(messages, reply.ids, "Please be more concise.")
    updater.save_checkpoint()

The teacher is the current model under the hindsight context, with no gradient,
refreshed at every step (no frozen copy).
"""
from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from auxiliary.runtime.generation import GeneratedResponse, generate_responses
from auxiliary.runtime.io_utils import atomic_write_json, fsync_dir, fsync_tree
from auxiliary.runtime.model_loading import load_model_and_tokenizer, pick_device
from auxiliary.runtime.secrets import public_config
from online_sdpo_updater_config import OnlineSDPOConfig
from sdpo_objective import (build_scoring_batch, check_lm_head, hindsight_messages, normalize_messages,
                            render_context_ids, sdpo_loss)

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"


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
        self.model.train()
        self.options = config.objective_options()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay,
                                           eps=config.adam_epsilon)
        self.step = 0
        self.skipped_nonfinite = 0
        self._vllm = None

    # ------------------------------------------------------------------ setup
    def _wrap_lora(self, model):
        from peft import LoraConfig, get_peft_model

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
                 progress: bool = False, desc: str = "generate") -> list[GeneratedResponse]:
        conversations = [normalize_messages(c) for c in conversations]
        max_new_tokens = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        temperature = self.config.temperature if temperature is None else temperature
        top_p = self.config.top_p if top_p is None else top_p
        if self.config.use_vllm:
            return self._vllm_engine().generate(conversations, max_new_tokens, temperature, top_p, seed)
        return generate_responses(self.model, self.tokenizer, conversations, max_new_tokens, temperature, top_p,
                                  self.config.generation_batch_size, self.config.max_context_length, seed,
                                  progress, desc)

    def _vllm_engine(self):
        if self._vllm is None:
            from auxiliary.runtime.vllm_adapter import VLLMPolicyGenerator  # lazy: vLLM is an optional extra

            self._vllm = VLLMPolicyGenerator(self.model_path, self.tokenizer, self.config)
        self._vllm.sync_weights(self.model, self.step)
        return self._vllm

    # ------------------------------------------------------------------ training
    def build_batches(self, conversations: Sequence[Sequence[dict]], response_ids: Sequence[Sequence[int]],
                      followups: Sequence[str]):
        contexts_x, contexts_xo = [], []
        for messages, followup in zip(conversations, followups):
            messages = normalize_messages(messages)
            contexts_x.append(render_context_ids(self.tokenizer, messages))
            contexts_xo.append(render_context_ids(
                self.tokenizer, hindsight_messages(messages, followup, self.config.hindsight_template)))
        pad = self.tokenizer.pad_token_id
        limit = self.config.max_context_length
        return (build_scoring_batch(contexts_x, response_ids, pad, limit, self.device),
                build_scoring_batch(contexts_xo, response_ids, pad, limit, self.device))

    def train_step(self, messages: Sequence[dict], response_ids: Sequence[int], followup: str) -> dict:
        """One interaction (x, y, o) -> `train_steps_per_example` gradient steps; returns metrics."""
        return self.train_batch([messages], [response_ids], [followup])

    def train_batch(self, conversations, response_ids, followups) -> dict:
        started = time.perf_counter()
        batch_x, batch_xo = self.build_batches(conversations, response_ids, followups)
        first: dict | None = None
        losses = []
        for _ in range(self.config.train_steps_per_example):
            stats = self._gradient_step(batch_x, batch_xo)
            first = first or stats
            losses.append(stats["loss"])
        self.step += 1
        metrics = {k: v for k, v in first.items() if k != "signal_per_sequence"}
        metrics.update({"step": self.step, "loss": losses[-1], "loss_first": losses[0],
                        "skipped_nonfinite": self.skipped_nonfinite, "lr": self.config.lr,
                        "seconds": time.perf_counter() - started})
        metrics["signal_per_sequence"] = first["signal_per_sequence"]
        if self.config.checkpoint_every and self.config.checkpoint_dir and self.step % self.config.checkpoint_every == 0:
            self.save_checkpoint()
        return metrics

    def _gradient_step(self, batch_x, batch_xo) -> dict:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss, stats = sdpo_loss(self.model, batch_x, batch_xo, self.options, self.ref_model)
        if not torch.isfinite(loss):
            return self._skip(stats, float("nan"))
        loss.backward()
        params = [p for p in self.model.parameters() if p.requires_grad]
        clip = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        if not math.isfinite(grad_norm):
            return self._skip(stats, grad_norm)
        self.optimizer.step()
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

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str | Path | None = None, extra_state: dict | None = None) -> Path:
        """Model (or LoRA adapter), tokenizer, optimizer, RNG states, step and config; written atomically."""
        if path is None:
            if not self.config.checkpoint_dir:
                raise ValueError("no checkpoint path given and config.checkpoint_dir is not set")
            path = Path(self.config.checkpoint_dir) / f"{CHECKPOINT_PREFIX}{self.step:06d}"
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        self.model.save_pretrained(partial / "model")
        self.tokenizer.save_pretrained(partial / "model")
        torch.save(self.optimizer.state_dict(), partial / "optimizer.pt")
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, partial / "rng.pt")
        state = {"step": self.step, "skipped_nonfinite": self.skipped_nonfinite, "use_lora": self.config.use_lora,
                 "extra": extra_state or {}}
        atomic_write_json(partial / "updater_state.json", state)
        atomic_write_json(partial / "config.json", public_config(self.config.to_dict()))
        fsync_tree(partial)  # contents on disk before the name says the checkpoint is complete
        if path.exists():
            shutil.rmtree(path)
        partial.rename(path)
        fsync_dir(path.parent)
        self._prune(path.parent)
        return path

    def _prune(self, folder: Path) -> None:
        self.prune_checkpoints(folder, self.config.max_checkpoints)

    @staticmethod
    def prune_checkpoints(folder: str | Path, keep: int) -> None:
        """Delete all but the `keep` newest complete checkpoints in `folder` (keep <= 0: delete none)."""
        if keep <= 0:
            return
        for old in list_checkpoints(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: str | Path) -> dict:
        """Restore weights, optimizer, RNG and step so the run continues exactly where it stopped."""
        path = Path(path)
        if not (path / "updater_state.json").exists():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no updater_state.json)")
        state = json.loads((path / "updater_state.json").read_text())
        model_dir = path / "model"
        if self.config.use_lora:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(self.model, load_file(str(model_dir / "adapter_model.safetensors")))
        else:
            from transformers import AutoModelForCausalLM

            saved = AutoModelForCausalLM.from_pretrained(model_dir, dtype=next(self.model.parameters()).dtype)
            self.model.load_state_dict(saved.state_dict())
            del saved
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device, weights_only=False))
        rng = torch.load(path / "rng.pt", weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step = int(state["step"])
        self.skipped_nonfinite = int(state.get("skipped_nonfinite", 0))
        return state.get("extra", {})


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in a folder, oldest first."""
    folder = Path(folder)
    if not folder.exists():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and not p.name.endswith(".partial") and (p / "updater_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None
