"""Standard benchmarks through the field's own harnesses (no evaluator of ours).

    lm-evaluation-harness (`lm_eval.simple_evaluate`, chat template applied):
        ifeval          prompt_level_strict_acc
        mmlu_pro        exact_match (custom-extract filter)
        truthfulqa_mc1  acc
        hellaswag       acc_norm
        commonsense_qa  acc
    AlpacaEval 2 (`alpaca_eval.evaluate`): alpaca_eval  length_controlled_winrate (lc_standard_error)

Every model (baseline, then each checkpoint) is loaded once into one lm_eval LM object (HFLM
around the already-loaded model, or lm_eval's vLLM model); that object runs the lm_eval tasks and
also writes the AlpacaEval completions (greedy, chat template), which alpaca_eval then judges.

Outputs under --output_dir:
    benchmarks.json               {"config": {...}, "models": [{"model", "path", "kind", "scores":
                                  {task: {"metric", "value", "stderr", "n"}}}]}; values as the
                                  harness returned them (lm_eval: fractions, alpaca_eval: percent)
    lm_eval/<model>.json          lm_eval's results, configs and per-sample records
    alpaca_eval/<model>/          alpaca_eval's leaderboard.csv and annotations.json, plus
                                  model_outputs.json (the completions that were judged)
    lm_eval_tasks/                task YAMLs written for local data (--ifeval_jsonl)
"""
from __future__ import annotations

import json
import logging
import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from auxiliary.runtime.io_utils import DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Benchmark:
    harness: str          # lm_eval | alpaca_eval
    task: str             # the harness's task name
    metric: str           # main metric, as the harness names it
    filter: str = "none"  # lm_eval filter the metric is reported under
    stderr: str = ""      # alpaca_eval's name of the metric's standard error


BENCHMARKS: dict[str, Benchmark] = {
    "ifeval": Benchmark("lm_eval", "ifeval", "prompt_level_strict_acc"),
    "mmlu_pro": Benchmark("lm_eval", "mmlu_pro", "exact_match", filter="custom-extract"),
    "truthfulqa_mc1": Benchmark("lm_eval", "truthfulqa_mc1", "acc"),
    "hellaswag": Benchmark("lm_eval", "hellaswag", "acc_norm"),
    "commonsense_qa": Benchmark("lm_eval", "commonsense_qa", "acc"),
    "alpaca_eval": Benchmark("alpaca_eval", "alpaca_eval", "length_controlled_winrate", stderr="lc_standard_error"),
}
LOCAL_IFEVAL_TASK = "ifeval_local"
DEFAULT_ALPACA_ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"  # the paper's GPT-4-Turbo weighted annotator
ALPACA_MAX_NEW_TOKENS = 2048  # AlpacaEval has no generation limit of its own


@dataclass
class BenchmarkArgs:
    checkpoints: list[str] = field(default_factory=list, metadata={
        "help": "checkpoint folders: model, LoRA adapter, online step_N/ or a folder of those"})
    baseline_model: Optional[str] = field(default=None, metadata={
        "help": "baseline model: hub id or folder (required)"})
    base_model: Optional[str] = field(default=None, metadata={
        "help": "base model of LoRA adapters (default: the one in adapter_config.json)"})
    tasks: list[str] = field(default_factory=lambda: list(BENCHMARKS), metadata={
        "help": f"comma/space separated: {', '.join(BENCHMARKS)}"})
    limit: Optional[int] = field(default=None, metadata={
        "help": "first N items of every task (for smoke runs; not comparable with published numbers)"})
    output_dir: Optional[str] = field(default=None, metadata={
        "help": "default: $BASE_WORK/sdpo_outputs/eval_benchmarks_<time>"})
    overwrite: bool = field(default=False, metadata={"help": "replace the results already in --output_dir"})
    backend: str = field(default="hf", metadata={"help": "hf (transformers) or vllm"})
    max_new_tokens: Optional[int] = field(default=None, metadata={
        "help": f"generation limit (default: each benchmark's own; AlpacaEval {ALPACA_MAX_NEW_TOKENS})"})
    batch_size: int = field(default=8, metadata={"help": "lm_eval batch size (hf backend)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1 ..."})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32"})
    attn_implementation: str = field(default="auto", metadata={"help": "auto, sdpa, eager, flash_attention_2"})
    enable_thinking: bool = field(default=False, metadata={
        "help": "pass enable_thinking=True to the chat template (Qwen3)"})
    vllm_gpu_memory_utilization: float = field(default=0.85, metadata={"help": "vllm backend: share of GPU memory"})
    seed: int = field(default=1234, metadata={"help": "lm_eval random seeds"})
    ifeval_jsonl: Optional[str] = field(default=None, metadata={
        "help": "local IFEval prompts in the hub's format (key, prompt, instruction_id_list, kwargs)"})
    alpaca_eval_json: Optional[str] = field(default=None, metadata={
        "help": "local AlpacaEval set: JSON list (or JSONL) of instruction, output (the reference's), generator, "
                "dataset"})
    alpaca_annotator: str = field(default=DEFAULT_ALPACA_ANNOTATOR, metadata={
        "help": "alpaca_eval annotator config: a name in alpaca_eval/evaluators_configs (e.g. claude) or a "
                "configs.yaml path"})
    alpaca_annotator_base_url: Optional[str] = field(default=None, metadata={
        "help": "OpenAI-compatible endpoint for the annotator (key from OPENAI_API_KEY)"})
    alpaca_annotator_model: Optional[str] = field(default=None, metadata={
        "help": "model name sent to that endpoint (default: the config's)"})
    nltk_data: Optional[str] = field(default=None, metadata={
        "help": "NLTK data folder for IFEval's checkers (sets NLTK_DATA)"})
    dry_run: bool = field(default=False, metadata={
        "aliases": ["--dry-run"], "help": "print the harness calls and write nothing"})

    def check(self) -> None:
        from auxiliary.evals.eval_common import split_list
        from auxiliary.runtime.option_groups import check_ranges

        self.checkpoints = split_list(self.checkpoints)
        self.tasks = split_list(self.tasks)
        unknown = [task for task in self.tasks if task not in BENCHMARKS]
        if unknown:
            raise ValueError(f"unknown --tasks {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
        if not self.tasks:
            raise ValueError("--tasks is empty")
        if not self.baseline_model:
            raise ValueError("--baseline_model is required")
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"--backend {self.backend!r}: choose hf or vllm")
        check_ranges(self)  # --limit and every other number, in option_groups.RANGES
        for name in ("ifeval_jsonl", "alpaca_eval_json", "nltk_data"):
            value = getattr(self, name)
            if value and not Path(value).exists():
                raise DataError(f"--{name} {value}: no such file or folder")


# --------------------------------------------------------------------------- lm_eval


def lm_eval_task_names(tasks: list[str], args: BenchmarkArgs) -> dict[str, str]:
    """Our task name -> the lm_eval task that runs it."""
    names = {task: BENCHMARKS[task].task for task in tasks if BENCHMARKS[task].harness == "lm_eval"}
    if "ifeval" in names and args.ifeval_jsonl:
        names["ifeval"] = LOCAL_IFEVAL_TASK
    return names


def local_ifeval_yaml(jsonl_path: str) -> str:
    """A task config deriving from lm_eval's own ifeval task, reading the prompts from a local file."""
    import lm_eval.tasks

    builtin = Path(lm_eval.tasks.__file__).parent / "ifeval" / "ifeval.yaml"
    data_file = str(Path(jsonl_path).resolve())
    return (f"include: {json.dumps(str(builtin))}\n"
            f"task: {LOCAL_IFEVAL_TASK}\n"
            "dataset_path: json\n"
            "dataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    train: {json.dumps(data_file)}\n")


def write_task_configs(args: BenchmarkArgs, output_dir: Path) -> Optional[Path]:
    """The --include_path folder for lm_eval, or None when every task is a built-in one."""
    if not (args.ifeval_jsonl and "ifeval" in args.tasks):
        return None
    folder = output_dir / "lm_eval_tasks"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{LOCAL_IFEVAL_TASK}.yaml").write_text(local_ifeval_yaml(args.ifeval_jsonl))
    return folder


def gen_kwargs(args: BenchmarkArgs) -> Optional[dict]:
    return {"max_gen_toks": args.max_new_tokens} if args.max_new_tokens else None


def chat_template_args(args: BenchmarkArgs) -> dict:
    return {"enable_thinking": args.enable_thinking}


def quiet_git_hash() -> Optional[str]:
    """This repository's commit for lm_eval's `git_hash` field. lm_eval's own runs `git describe` in the
    current folder with stderr left open, so outside a git checkout it prints "fatal: not a git repository"."""
    import subprocess

    try:
        done = subprocess.run(["git", "describe", "--always"], cwd=Path(__file__).resolve().parents[2],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def run_lm_eval(lm, task_names: list[str], include_path: Optional[Path], args: BenchmarkArgs) -> dict:
    import lm_eval
    import lm_eval.evaluator
    from lm_eval.tasks import TaskManager

    lm_eval.evaluator.get_git_commit_hash = quiet_git_hash
    task_manager = TaskManager(include_path=str(include_path) if include_path else None)
    try:  # the tasks' data load first, before any answer is generated
        return lm_eval.simple_evaluate(
            model=lm, tasks=task_names, limit=args.limit, apply_chat_template=True, fewshot_as_multiturn=True,
            gen_kwargs=gen_kwargs(args), task_manager=task_manager, log_samples=True, random_seed=args.seed,
            numpy_random_seed=args.seed, torch_random_seed=args.seed, fewshot_random_seed=args.seed)
    except ConnectionError as err:
        raise hub_data_failure(err) from None


def hub_data_failure(err: ConnectionError) -> DataError:
    """datasets' error for a benchmark set it could not fetch, as one line saying what works without network (the
    command-line wrapper would otherwise report an OSError as a file it cannot write)."""
    return DataError(f"a benchmark's data could not be loaded from the Hugging Face hub ({err}); without network, "
                     "--ifeval_jsonl and --alpaca_eval_json take local copies, and the other tasks need their data "
                     "in the datasets cache (docs/benchmarks.md)")


def lm_eval_scores(output: dict, task_names: dict[str, str]) -> dict[str, dict]:
    """Each task's main metric and the harness's own stderr, read from simple_evaluate's output."""
    scores = {}
    for task, lm_task in task_names.items():
        spec = BENCHMARKS[task]
        results = output["results"].get(lm_task)
        if results is None:
            raise DataError(f"lm_eval returned no results for {lm_task}")
        key = f"{spec.metric},{spec.filter}"
        stderr = results.get(f"{spec.metric}_stderr,{spec.filter}")
        n = output.get("n-samples", {}).get(lm_task, {}).get("effective")
        scores[task] = {"metric": spec.metric, "value": results[key], "stderr": _number_or_none(stderr), "n": n}
    return scores


def _number_or_none(value) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):  # lm_eval writes "N/A" where it has no stderr
        return None
    return None if math.isnan(value) else value


# --------------------------------------------------------------------------- models


def describe_model_args(spec, args: BenchmarkArgs) -> dict:
    """The lm_eval model arguments of one model (what a dry run prints)."""
    from auxiliary.eval_checkpoints import adapter_base

    if args.backend == "vllm":
        model_args: dict[str, Any] = {"dtype": args.dtype, "gpu_memory_utilization": args.vllm_gpu_memory_utilization,
                                      "seed": args.seed, "chat_template_args": chat_template_args(args)}
        if spec is None:
            model_args["pretrained"] = args.baseline_model
        elif spec.kind == "lora":  # vLLM applies the adapter itself
            model_args.update(pretrained=adapter_base(spec, args), enable_lora=True, lora_local_path=spec.model_dir)
        else:
            model_args["pretrained"] = spec.model_dir
        return {"model": "vllm", "model_args": model_args}
    pretrained = args.baseline_model if spec is None else f"{spec.model_dir} ({spec.kind}, loaded by load_checkpoint)"
    return {"model": "hf (HFLM around the loaded model)", "model_args": {
        "pretrained": pretrained, "batch_size": args.batch_size, "device": args.device, "dtype": args.dtype,
        "chat_template_args": chat_template_args(args)}}


def build_lm(spec, args: BenchmarkArgs):
    """An lm_eval LM for the baseline (spec None) or one checkpoint."""
    if args.backend == "vllm":
        from lm_eval.api.registry import get_model

        described = describe_model_args(spec, args)["model_args"]
        return get_model("vllm")(**described)
    from lm_eval.models.huggingface import HFLM

    from auxiliary.eval_checkpoints import load_checkpoint
    from auxiliary.runtime.model_loading import load_model_and_tokenizer, pick_device

    if spec is None:
        model, tokenizer, _ = load_model_and_tokenizer(args.baseline_model, args.dtype, args.attn_implementation,
                                                       args.device)
    else:
        model, tokenizer = load_checkpoint(spec, args)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, device=pick_device(args.device),
                chat_template_args=chat_template_args(args))


def release(lm) -> None:
    import gc

    import torch

    del lm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- alpaca_eval


def load_alpaca_reference(args: BenchmarkArgs):
    """The AlpacaEval set (instruction + the reference's output), first --limit items."""
    import pandas as pd

    if args.alpaca_eval_json:
        path = Path(args.alpaca_eval_json)
        text = path.read_text(encoding="utf-8")
        try:
            records = json.loads(text)
        except json.JSONDecodeError:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        frame = pd.DataFrame(records)
    else:
        from auxiliary.runtime.library_notices import import_alpaca_eval

        constants, utils = import_alpaca_eval("constants"), import_alpaca_eval("utils")
        try:
            frame = utils.load_or_convert_to_dataframe(constants.ALPACAEVAL_REFERENCE_OUTPUTS)
        except ConnectionError as err:
            raise hub_data_failure(err) from None
    missing = {"instruction", "output"} - set(frame.columns)
    if missing:
        raise DataError(
            f"AlpacaEval set {args.alpaca_eval_json or 'tatsu-lab/alpaca_eval'}: missing fields {sorted(missing)}")
    if args.limit:
        frame = frame.head(args.limit)
    return frame.reset_index(drop=True)


def generate_alpaca_outputs(lm, reference, label: str, args: BenchmarkArgs) -> list[dict]:
    """The model's answers to the AlpacaEval instructions: greedy, chat template, through the LM object."""
    from lm_eval.api.instance import Instance

    settings = {"until": [], "max_gen_toks": args.max_new_tokens or ALPACA_MAX_NEW_TOKENS, "do_sample": False,
                "temperature": 0.0}
    requests = [Instance(request_type="generate_until", doc={}, idx=index, arguments=(
        lm.apply_chat_template([{"role": "user", "content": instruction}], add_generation_prompt=True), dict(settings)))
        for index, instruction in enumerate(reference["instruction"])]
    answers = lm.generate_until(requests)
    return [{"instruction": instruction, "output": answer.strip(), "generator": label,
             "dataset": reference["dataset"][index] if "dataset" in reference else "local"}
            for index, (instruction, answer) in enumerate(zip(reference["instruction"], answers))]


def _annotator_config_file(args: BenchmarkArgs) -> tuple[Path, Path]:
    """(the --alpaca_annotator configs.yaml, alpaca_eval's folder of named configs)."""
    from auxiliary.runtime.library_notices import import_alpaca_eval

    constants = import_alpaca_eval("constants")
    configs_dir = Path(constants.EVALUATORS_CONFIG_DIR)
    named = Path(args.alpaca_annotator)
    config_file = named if named.is_file() else (named / "configs.yaml" if named.is_dir()
                                                 else configs_dir / args.alpaca_annotator / "configs.yaml")
    if not config_file.is_file():
        raise DataError(f"--alpaca_annotator {args.alpaca_annotator}: no alpaca_eval annotator config of that name")
    return config_file, configs_dir


# alpaca_eval's completion functions that call a hosted API -> the variables its client reads the key from
ANNOTATOR_KEYS = {"openai_completions": ("OPENAI_API_KEY", "OPENAI_API_KEYS", "OPENAI_CLIENT_CONFIG_PATH"),
                  "anthropic_completions": ("ANTHROPIC_API_KEY",), "cohere_completions": ("COHERE_API_KEY",),
                  "huggingface_api_completions": ("HUGGINGFACEHUB_API_TOKEN",)}


NLTK_DOWNLOAD = "python -m nltk.downloader -d DIR punkt punkt_tab"


def ifeval_nltk_problem(args: BenchmarkArgs, try_download: bool = True) -> Optional[str]:
    """Why IFEval's scorer would miss its NLTK data, or None. lm_eval's ifeval module looks for
    tokenizers/punkt_tab when it is imported and otherwise downloads it, printing a page of urlopen errors without
    network (and a checker fails later). Checked before any model loads: with HF_HUB_OFFLINE=1 (or a dry run, which
    writes nothing) the missing data is one line at once; otherwise the download lm_eval would make is tried here,
    quietly, and only its failure is the line."""
    if "ifeval" not in args.tasks:
        return None
    try:
        import nltk
    except ImportError:
        return None  # require_harnesses names what is missing
    try:
        nltk.data.find("tokenizers/punkt_tab")
        return None
    except LookupError:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    if try_download and not offline:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            if nltk.download("punkt_tab", quiet=True):
                return None
    where = f"--nltk_data {args.nltk_data}" if args.nltk_data else "NLTK_DATA or nltk's default folders"
    how = "HF_HUB_OFFLINE=1" if offline else "not downloaded" if try_download else "a real run tries to download it"
    return (f"IFEval's scorer needs NLTK's punkt_tab tokenizer (punkt too, for its sentence counts): not in {where} "
            f"({how}); on a machine with network run `{NLTK_DOWNLOAD}` and pass --nltk_data DIR, or leave ifeval "
            "out of --tasks")


def annotator_key_problem(args: BenchmarkArgs) -> Optional[str]:
    """Why the AlpacaEval annotator could not be called (its API key missing), or None: checked before any
    answer is generated, so a missing key costs seconds, not a whole generation pass."""
    if "alpaca_eval" not in args.tasks:
        return None
    import yaml

    config_file, _ = _annotator_config_file(args)
    (config,) = yaml.safe_load(config_file.read_text()).values()
    completions = config.get("fn_completions", "")
    names = ANNOTATOR_KEYS.get(completions)
    if not names or any(os.environ.get(name) for name in names):
        return None
    if args.alpaca_annotator_base_url:
        return (f"the AlpacaEval annotator at {args.alpaca_annotator_base_url} is called through the OpenAI client, "
                "which needs OPENAI_API_KEY: set it (any value, e.g. EMPTY, when the server checks none)")
    return (f"the AlpacaEval annotator {args.alpaca_annotator} calls a hosted API ({completions}) and needs "
            f"{names[0]}: set it, or pass --alpaca_annotator_base_url for an OpenAI-compatible server of your own, "
            "or leave alpaca_eval out of --tasks")


def annotator_config(args: BenchmarkArgs, output_dir: Optional[Path]):
    """What alpaca_eval.evaluate gets as annotators_config: the named config, or one derived from it
    that sends its requests to --alpaca_annotator_base_url (written under output_dir)."""
    if not args.alpaca_annotator_base_url:
        return args.alpaca_annotator
    import yaml

    config_file, configs_dir = _annotator_config_file(args)
    configs = yaml.safe_load(config_file.read_text())
    (name, config), = configs.items()
    if output_dir is None:
        return f"{name} via {args.alpaca_annotator_base_url}"
    folder = output_dir / "alpaca_eval" / "annotator"
    folder.mkdir(parents=True, exist_ok=True)
    template = Path(config["prompt_template"])
    for root in (config_file.parent, configs_dir):  # alpaca_eval resolves templates against its config folder
        if not template.is_absolute() and (root / template).exists():
            template = root / template
    config["prompt_template"] = str(template)
    completions = config.setdefault("completions_kwargs", {})
    if args.alpaca_annotator_model:
        completions["model_name"] = args.alpaca_annotator_model
    client_file = folder / "client_configs.yaml"  # the key stays in OPENAI_API_KEY, never in a file
    client_file.write_text(yaml.safe_dump({"default": [{"base_url": args.alpaca_annotator_base_url}]}))
    completions["client_config_path"] = str(client_file)
    config_path = folder / "configs.yaml"
    config_path.write_text(yaml.safe_dump({f"{name}_local_endpoint": config}, sort_keys=False))
    return str(config_path)


def run_alpaca_eval(model_outputs: list[dict], reference, label: str, annotators, folder: Path) -> dict:
    from auxiliary.runtime.library_notices import import_alpaca_eval

    alpaca_eval = import_alpaca_eval()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_outputs.json").write_text(json.dumps(model_outputs, indent=2, ensure_ascii=False))
    leaderboard, _ = alpaca_eval.evaluate(
        model_outputs=model_outputs, reference_outputs=reference, annotators_config=annotators, name=label,
        output_path=folder, precomputed_leaderboard=None, is_cache_leaderboard=False,
        is_return_instead_of_print=True, caching_path=str(folder / "annotations_cache.json"),
        metric_kwargs={"save_weights_dir": str(folder / "glm_weights")})
    row = leaderboard.loc[label]
    spec = BENCHMARKS["alpaca_eval"]
    return {"metric": spec.metric, "value": float(row[spec.metric]), "stderr": _number_or_none(row[spec.stderr]),
            "n": int(row["n_total"]), "win_rate": float(row["win_rate"]),
            "win_rate_stderr": _number_or_none(row["standard_error"])}


# --------------------------------------------------------------------------- outputs


def format_table(models: list[dict], tasks: list[str]) -> str:
    columns = [f"{task} ({BENCHMARKS[task].metric})" for task in tasks]
    lines = [[entry["model"]] + [_cell(entry["scores"].get(task)) for task in tasks] for entry in models]
    header = ["model"] + columns
    widths = [max(len(row[i]) for row in [header] + lines) for i in range(len(header))]
    render = lambda row: "  ".join(cell.ljust(width) for cell, width in zip(row, widths))  # noqa: E731
    return "\n".join([render(header), render(["-" * w for w in widths])] + [render(row) for row in lines])


def _cell(score: Optional[dict]) -> str:
    if score is None:
        return "-"
    value = f"{score['value']:.4f}" if score["value"] is not None else "nan"
    return value + (f" ± {score['stderr']:.4f}" if score.get("stderr") is not None else "")


def format_call(function: str, **kwargs) -> str:
    return f"{function}(" + ", ".join(f"{key}={value!r}" for key, value in kwargs.items()) + ")"


def shell_line(argv: list[str]) -> str:
    return " ".join(shlex.quote(arg) for arg in argv)


def set_nltk_data(folder: Optional[str]) -> None:
    """IFEval's checkers load NLTK tokenizers; NLTK reads NLTK_DATA when it is first imported."""
    if not folder:
        return
    resolved = str(Path(folder).resolve())
    os.environ["NLTK_DATA"] = resolved
    try:
        import nltk

        if resolved not in nltk.data.path:
            nltk.data.path.insert(0, resolved)
    except ImportError:
        pass
