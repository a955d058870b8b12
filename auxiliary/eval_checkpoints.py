"""Judge saved checkpoints against a baseline model on several user styles.

    python auxiliary/eval_checkpoints.py --baseline_model Qwen/Qwen3-8B \
        --checkpoints /runs/a/checkpoints/step_000015 /runs/offline/lora_adapter \
        --eval_styles less_filler_praise_sycophancy no_emojis --judge claude --eval_n 100

The baseline's completions are generated once; every checkpoint then generates on the same
prompts with the same seed, and a pairwise judge (A = checkpoint, B = baseline) decides per
style. A checkpoint is any of:
    - a full model folder (config.json + weights), e.g. an offline trainer output;
    - a LoRA adapter folder (adapter_config.json): loaded on top of --base_model, or else the
      base model recorded in the adapter config, and merged for generation;
    - an online-run checkpoint `step_N/` (weights in step_N/model, full or adapter);
    - a folder of step_N/ checkpoints (an online run's checkpoint_dir): every one, oldest first.

Outputs (results.json, completions.jsonl, winrate.png) are described in auxiliary/evals/style_eval.py.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from auxiliary.evals import style_eval
from auxiliary.runtime.io_utils import DataError

logger = logging.getLogger("eval_checkpoints")


@dataclass
class EvalCheckpointsArgs(style_eval.StyleEvalArgs):
    checkpoints: list[str] = field(default_factory=list, metadata={
        "help": "checkpoint folders (required; several words or one quoted list)"})
    baseline_model: Optional[str] = field(default=None, metadata={
        "help": "baseline model: hub id, folder or embedded name (required)"})
    base_model: Optional[str] = field(default=None, metadata={
        "help": "base model of LoRA adapters (default: the one in adapter_config.json)"})
    data_dir: str = field(default="data/helpsteer_prompts", metadata={"help": "folder with validation.jsonl"})


@dataclass
class CheckpointSpec:
    label: str       # shown in tables and plots
    path: str        # what the user named
    model_dir: str   # the folder holding config.json or adapter_config.json
    kind: str        # full | lora


def _model_folder_kind(folder: Path) -> str | None:
    if (folder / "adapter_config.json").exists():
        return "lora"
    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")) | any(folder.glob("*.bin")):
        return "full"
    return None


def resolve_checkpoints(paths: list[str]) -> list[CheckpointSpec]:
    """Expand and classify the checkpoint arguments; unknown folders fail with what was expected."""
    from auxiliary.evals.eval_common import split_list
    from online_sdpo_updater import list_checkpoints

    specs: list[CheckpointSpec] = []
    for given in split_list(paths):
        folder = Path(given).expanduser()
        if not folder.is_dir():
            raise DataError(f"checkpoint {given}: no such folder")
        if (folder / "model").is_dir() and _model_folder_kind(folder / "model"):  # online step_N/
            specs.append(
                CheckpointSpec(folder.name, given, str(folder / "model"), _model_folder_kind(folder / "model")))
        elif _model_folder_kind(folder):
            specs.append(CheckpointSpec(folder.name, given, str(folder), _model_folder_kind(folder)))
        elif list_checkpoints(folder):
            for step_dir in list_checkpoints(folder):
                specs.extend(resolve_checkpoints([str(step_dir)]))
        else:
            raise DataError(f"checkpoint {given}: not a model folder (config.json + weights), a LoRA adapter "
                            "(adapter_config.json), an online step_N/ checkpoint (model/ inside) or a folder of those")
    if not specs:
        raise ValueError("--checkpoints is empty: name at least one checkpoint folder")
    counts: dict[str, int] = {}
    for spec in specs:  # two runs both have step_000015: prefix the parent folder
        counts[spec.label] = counts.get(spec.label, 0) + 1
    for spec in specs:
        if counts[spec.label] > 1:
            spec.label = f"{Path(spec.path).parent.name}/{spec.label}"
    return specs


def adapter_base(spec: CheckpointSpec, args: EvalCheckpointsArgs) -> str:
    from auxiliary.runtime.model_loading import ModelLoadError

    adapter_config = json.loads((Path(spec.model_dir) / "adapter_config.json").read_text())
    base = args.base_model or adapter_config.get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{spec.model_dir}: the adapter names no base model; pass --base_model")
    return base


def check_adapter_fits_base(spec: CheckpointSpec, args: EvalCheckpointsArgs) -> None:
    """Before any generation: every LoRA matrix must sit on a module of the base model with matching
    sizes (an adapter trained on another base model would otherwise fail late, with a traceback)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from auxiliary.runtime.model_loading import ModelLoadError, resolve_model_path

    base = adapter_base(spec, args)
    weights = Path(spec.model_dir) / "adapter_model.safetensors"
    if not weights.exists():
        raise ModelLoadError(f"{spec.model_dir}: no adapter_model.safetensors in the adapter folder")
    try:
        config = AutoConfig.from_pretrained(resolve_model_path(base))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{spec.model_dir}: base model of the adapter: {err} (pass --base_model)") from None
    with torch.device("meta"):  # shapes only: no weights are read or allocated
        skeleton = AutoModelForCausalLM.from_config(config)
    modules = dict(skeleton.named_modules())
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            name = key.split(".lora_")[0].removeprefix("base_model.model.")
            module = modules.get(name)
            shape = handle.get_slice(key).get_shape()
            expected = (getattr(module, "in_features", None) if ".lora_A." in key
                        else getattr(module, "out_features", None))
            size = shape[1] if ".lora_A." in key else shape[0]
            if module is None or expected != size:
                found = "no such module" if module is None else f"size {expected}, the adapter has {size}"
                raise ModelLoadError(f"{spec.model_dir}: adapter does not fit base model {base} ({name}: {found}); "
                                     "it was trained on another base model (pass the right --base_model)")


def load_checkpoint(spec: CheckpointSpec, args: EvalCheckpointsArgs):
    """(model, tokenizer) ready for generation; adapters are merged into their base model."""
    from auxiliary.runtime.model_loading import ModelLoadError, load_model_and_tokenizer, load_tokenizer

    if spec.kind == "full":
        model, tokenizer, _ = load_model_and_tokenizer(spec.model_dir, args.dtype, args.attn_implementation,
                                                       args.device)
        return model, tokenizer
    base = adapter_base(spec, args)
    try:
        model, tokenizer, _ = load_model_and_tokenizer(base, args.dtype, args.attn_implementation, args.device)
    except ModelLoadError as err:
        raise ModelLoadError(f"{spec.model_dir}: base model of the adapter: {err} (pass --base_model)") from None
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, spec.model_dir).merge_and_unload()
    model.eval()
    if (Path(spec.model_dir) / "tokenizer_config.json").exists():
        tokenizer = load_tokenizer(spec.model_dir)
    return model, tokenizer


def max_lora_rank(specs: list[CheckpointSpec]) -> int | None:
    """The largest LoRA rank among the checkpoints (the vLLM engine must be built for it), None without any."""
    ranks = [int(json.loads((Path(s.model_dir) / "adapter_config.json").read_text()).get("r", 0))
             for s in specs if s.kind == "lora"]
    return max(ranks) if ranks else None


def vllm_target(spec: CheckpointSpec, args: EvalCheckpointsArgs, models: "style_eval.VLLMModels"):
    """(VLLMTarget, tokenizer) of a checkpoint: a LoRA adapter on its base model's engine, a full model
    on an engine of its own."""
    from auxiliary.runtime.model_loading import load_tokenizer, resolve_model_path

    if spec.kind == "full":
        tokenizer = load_tokenizer(spec.model_dir)
        return models.target(spec.model_dir, tokenizer), tokenizer
    base = resolve_model_path(adapter_base(spec, args))
    own_tokenizer = (Path(spec.model_dir) / "tokenizer_config.json").exists()
    tokenizer = load_tokenizer(spec.model_dir if own_tokenizer else base)
    return models.target(base, tokenizer, lora_dir=spec.model_dir), tokenizer


def run(args: EvalCheckpointsArgs) -> Path:
    from auxiliary.evals.evaluation_helpers import prompt_as_messages
    from auxiliary.runtime.model_loading import load_model_and_tokenizer, load_tokenizer, resolve_model_path

    args.check()
    if not args.baseline_model:
        raise ValueError("--baseline_model is required")
    style_eval.validate_styles(args.eval_styles, args.judge)
    style_eval.check_judge_model(args)
    specs = resolve_checkpoints(args.checkpoints)
    for spec in specs:
        if spec.kind == "lora":
            check_adapter_fits_base(spec, args)
    output_dir = style_eval.prepare_output_dir(args, "eval_checkpoints")

    vllm_models = style_eval.VLLMModels(args, max_lora_rank(specs)) if args.use_vllm else None
    if vllm_models:
        baseline_path = resolve_model_path(args.baseline_model)
        tokenizer = load_tokenizer(baseline_path)
        model = vllm_models.target(baseline_path, tokenizer)
    else:
        model, tokenizer, baseline_path = load_model_and_tokenizer(args.baseline_model, args.dtype,
                                                                   args.attn_implementation, args.device)
    prompts, prompt_file = style_eval.load_eval_prompts(args, args.data_dir, tokenizer)
    conversations = [prompt_as_messages(p) for p in prompts]
    logger.info("%d prompts from %s; %d checkpoint(s); styles %s", len(prompts), prompt_file, len(specs),
                ", ".join(args.eval_styles))
    baseline = style_eval.generate(model, tokenizer, conversations, args, "baseline")
    style_eval.release(model)
    completions = style_eval.completion_records("baseline", prompts, baseline)
    generated = {}
    for spec in specs:
        model, tokenizer = vllm_target(spec, args, vllm_models) if vllm_models else load_checkpoint(spec, args)
        generated[spec.label] = style_eval.generate(model, tokenizer, conversations, args, spec.label)
        style_eval.release(model)
        completions += style_eval.completion_records(spec.label, prompts, generated[spec.label])
    if vllm_models:
        vllm_models.close()

    meta = {"tool": "eval_checkpoints", "baseline_model": args.baseline_model, "baseline_path": baseline_path,
            "checkpoints": [vars(spec) for spec in specs], "eval_styles": args.eval_styles, "judge": args.judge,
            "judge_model": style_eval.judge_model_name(args), "prompts": str(prompt_file), "eval_n": len(prompts),
            "args": asdict(args)}
    baseline_info = {"model": args.baseline_model, "mean_length_tokens": baseline.mean_tokens,
                     "mean_length_words": baseline.mean_words, "generation_seconds": round(baseline.seconds, 3)}
    judges = style_eval.build_judges(args)
    rows: list[dict] = []
    for spec in specs:
        for style in args.eval_styles:
            rows.append(style_eval.judge_row(judges[style], prompts, generated[spec.label], baseline,
                                             len(args.eval_styles), args.n_bootstrap, args.seed,
                                             checkpoint=spec.label, path=spec.path, kind=spec.kind, style=style))
        style_eval.write_outputs(output_dir, meta, baseline_info, rows, completions,
                                 f"Checkpoints vs {Path(args.baseline_model).name} ({args.judge} judge, "
                                 f"n={len(prompts)})")
    print()
    print(style_eval.format_table(rows))
    print(f"\nbaseline {args.baseline_model}: {baseline.mean_words:.1f} words on average, generated in "
          f"{baseline.seconds:.1f}s\nwrote {output_dir / 'results.json'}, completions.jsonl and winrate.png")
    return output_dir / "results.json"


def main(argv: list[str] | None = None) -> int:
    from auxiliary.runtime.cli import run_cli

    return run_cli(EvalCheckpointsArgs, run, argv, prog="eval_checkpoints.py")


if __name__ == "__main__":
    sys.exit(main())
