"""Shared machinery of eval_checkpoints.py and eval_incontext_oracle.py.

Both tools generate completions on held-out prompts, let a pairwise style judge compare
them with a baseline's completions (A = the evaluated model, B = the baseline), and write
the same files:

    results.json       {"meta": {...}, "baseline": {...}, "results": [row, ...]}, one row per
                       (evaluated model, style): checkpoint, path, kind, style, n, wins, losses,
                       ties, coverage, win_rate, se, se_bootstrap (auxiliary/evaluation_helpers
                       .win_rate_stats), mean_length_tokens / mean_length_words of the evaluated
                       completions and of the baseline's, generation_seconds (that model's
                       generation, shared by its styles), judge_seconds, seconds (judge_seconds
                       + generation_seconds / number of styles: summing `seconds` gives the
                       total), decisions (the judge's A/B/C per prompt).
    completions.jsonl  one line per (source, prompt): source, style (oracle only), prompt_index,
                       prompt, completion, n_tokens.
    winrate.png        win rate per evaluated model (x) and style (bars), +-1 SE, 50% line.

Generation happens first (one model in memory at a time), then judging, so a local or
vLLM judge never shares the accelerator with a policy.
"""
from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from auxiliary.feedback.factory import JUDGE_KINDS
from auxiliary.runtime.io_utils import DataError
from auxiliary.runtime.option_groups import JudgeOptions, JudgePlacementOptions, VLLMEngineOptions

REPO_ROOT = Path(__file__).resolve().parents[2]

logger = logging.getLogger(__name__)

DEFAULT_EVAL_STYLES = ["less_filler_praise_sycophancy", "no_emojis", "answer_directly_reduce_formatting"]


@dataclass
class StyleEvalArgs(VLLMEngineOptions, JudgeOptions, JudgePlacementOptions):
    """Flags shared by both evaluation tools (each tool adds its own)."""
    eval_styles: list[str] = field(default_factory=lambda: list(DEFAULT_EVAL_STYLES),
                                   metadata={
                                       "help": "styles to judge (several words, or one quoted space/comma separated "
                                               "list)"})
    judge: str = field(default="rule", metadata={
        "help": "rule (free, deterministic; CPU default), local (HF model), claude, vllm"})
    judge_model: Optional[str] = field(default="Qwen/Qwen3-32B", metadata={
        "aliases": ["--user_model"], "help": "judge model for local/vllm judges (--user_model is the same flag)"})
    claude_model: Optional[str] = field(default=None, metadata={
        "help": "Claude model id for --judge claude (default: claude-haiku-4-5-20251001)"})
    judge_mode: str = field(default="generate", metadata={
        "help": "local judge: generate (verdict line) or logprob (A/B/C log-probs)"})
    judge_batch_size: int = field(default=8, metadata={"help": "local judge batch size"})
    api_concurrency: int = field(default=8, metadata={"help": "Claude requests in flight"})
    vllm_gpu_memory_utilization: float = field(default=0.85, metadata={"help": "vLLM judge: share of GPU memory"})
    eval_n: int = field(default=100, metadata={"help": "held-out prompts to evaluate on"})
    val_jsonl: Optional[str] = field(default=None, metadata={
        "help": "prompt file (default: DATA_DIR/validation.jsonl)"})
    max_prompt_tokens: int = field(default=1024, metadata={
        "help": "drop prompts longer than this (chat-templated tokens)"})
    max_new_tokens: int = field(default=512, metadata={"help": "completion length limit"})
    temperature: float = field(default=0.7, metadata={
        "help": "sampling temperature of the evaluated models (0 = greedy)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    batch_size: int = field(default=16, metadata={"help": "prompts per generate() call"})
    seed: int = field(default=1234, metadata={"help": "prompt selection and sampling seed (the same for every model)"})
    n_bootstrap: int = field(default=10000, metadata={"help": "bootstrap resamples for se_bootstrap"})
    output_dir: Optional[str] = field(default=None, metadata={"help": "default: $BASE_WORK/sdpo_outputs/<tool>_<time>"})
    overwrite: bool = field(default=False, metadata={"help": "replace the results already in --output_dir"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32"})
    attn_implementation: str = field(default="auto", metadata={"help": "auto, sdpa, eager, flash_attention_2"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1 ..."})
    generation_vllm_gpu_memory_utilization: float = field(default=0.4, metadata={
        "help": "--use_vllm: share of GPU memory of the generation engine (the judge's is "
                "--vllm_gpu_memory_utilization)"})

    def check(self) -> None:
        from auxiliary.runtime.option_groups import check_ranges

        check_ranges(self)
        from auxiliary.evals.eval_common import split_list

        self.eval_styles = split_list(self.eval_styles)
        if not self.eval_styles:
            raise ValueError("--eval_styles is empty")
        self.check_judge_options()
        if self.judge not in JUDGE_KINDS:
            raise ValueError(f"unknown --judge {self.judge!r}; choose one of {', '.join(JUDGE_KINDS)}")
        if self.eval_n < 1:
            raise ValueError("--eval_n must be >= 1")


# --------------------------------------------------------------------------- styles and judges

def validate_styles(styles: Sequence[str], judge_kind: str) -> None:
    """Fail before any model is loaded: unknown styles, or styles the rule judge cannot check."""
    from auxiliary.feedback.personas import get_persona
    from auxiliary.feedback.style_judge import RULE_JUDGE_STYLES

    for style in styles:
        get_persona(style)  # UnknownStyleError lists the known styles
    if judge_kind == "rule":
        unsupported = [s for s in styles if s not in RULE_JUDGE_STYLES]
        if unsupported:
            from auxiliary.feedback.user_simulator import UnsupportedStyleError

            raise UnsupportedStyleError(
                f"the rule judge cannot check style(s) {', '.join(unsupported)}; rule-checkable styles: "
                f"{', '.join(RULE_JUDGE_STYLES)}. Use --judge local, claude or vllm for the others.")


def build_judges(args: StyleEvalArgs) -> dict:
    """One judge per style; model-based judges share one loaded model, engine or client."""
    from auxiliary.feedback.factory import FeedbackFactory, judge_options

    factory = FeedbackFactory(args.dtype, args.device, args.api_concurrency,
                              vllm_options={"gpu_memory_utilization": args.vllm_gpu_memory_utilization}, placement=args)
    extra = {"mode": args.judge_mode, "batch_size": args.judge_batch_size} if args.judge == "local" else {}
    options = judge_options(args.judge, args.judge_framing, args.judge_temperature, args.judge_max_new_tokens,
                            args.tie_margin, **extra)
    model = {"rule": None, "claude": args.claude_model}.get(args.judge, args.judge_model)
    return factory.judges(args.judge, args.eval_styles, model, **options)


def check_judge_model(args: StyleEvalArgs) -> None:
    """A local or vLLM judge's model loadable (ModelLoadError otherwise), checked before anything is generated: the
    judge loads after the replies, minutes of generation on a CPU that a missing judge model would waste."""
    if args.judge in ("local", "vllm"):
        from auxiliary.runtime.model_loading import check_loadable

        check_loadable(args.judge_model)


def judge_model_name(args: StyleEvalArgs) -> str | None:
    return {"rule": None, "claude": args.claude_model or "claude-haiku-4-5-20251001"}.get(args.judge, args.judge_model)


# --------------------------------------------------------------------------- prompts and generation

def prompts_path(args: StyleEvalArgs, data_dir: str) -> Path:
    path = Path(args.val_jsonl) if args.val_jsonl else Path(data_dir) / "validation.jsonl"
    if not path.exists() and not path.is_absolute() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path  # the defaults (data/...) work from any folder, with or without a wrapper
    if not path.exists():
        raise DataError(f"{path}: prompt file not found (prepare data with auxiliary/preprocess_helpsteer.py or "
                        "preprocess_tldr_dataset.py, or try --data_dir data/samples)")
    return path


def load_eval_prompts(args: StyleEvalArgs, data_dir: str, tokenizer) -> tuple[list, Path]:
    from auxiliary.evals.evaluation_helpers import load_prompts

    path = prompts_path(args, data_dir)
    prompts, dropped = load_prompts(path, n=args.eval_n, seed=args.seed, tokenizer=tokenizer,
                                    max_prompt_tokens=args.max_prompt_tokens)
    if not prompts:
        raise DataError(f"{path}: no prompt left after dropping {dropped} over {args.max_prompt_tokens} tokens")
    return prompts, path


@dataclass
class Completions:
    texts: list[str]
    n_tokens: list[int]
    seconds: float

    @property
    def mean_tokens(self) -> float:
        return sum(self.n_tokens) / max(1, len(self.n_tokens))

    @property
    def mean_words(self) -> float:
        from auxiliary.feedback.style_checks import count_words

        return sum(count_words(t) for t in self.texts) / max(1, len(self.texts))


@dataclass
class VLLMTarget:
    """A model to generate with on vLLM: an engine and, for a LoRA checkpoint, its adapter request."""
    engine: object
    lora_request: object = None


class VLLMModels:
    """--use_vllm: one generation engine at a time, per base model; LoRA checkpoints on that base are
    served as adapters (nothing merged, no reload), a full checkpoint gets an engine of its own."""

    def __init__(self, args: StyleEvalArgs, max_lora_rank: int | None = None):
        self.args, self.max_lora_rank = args, max_lora_rank
        self._engine, self._engine_model, self._adapters = None, None, 0

    def target(self, model_path: str, tokenizer, lora_dir: str | None = None) -> VLLMTarget:
        from auxiliary.runtime.vllm_adapter import VLLMGenerator, lora_request

        if self._engine_model != str(model_path):
            self.close()  # one engine at a time: the next one needs the memory
            self._engine = VLLMGenerator(str(model_path), tokenizer, seed=self.args.seed, dtype=self.args.dtype,
                                         gpu_memory_utilization=self.args.generation_vllm_gpu_memory_utilization,
                                         tensor_parallel_size=self.args.vllm_tp, gpu_start=self.args.vllm_gpu_start,
                                         max_lora_rank=self.max_lora_rank)
            self._engine_model = str(model_path)
        if lora_dir is None:
            return VLLMTarget(self._engine)
        self._adapters += 1
        return VLLMTarget(self._engine, lora_request(f"checkpoint_{self._adapters}", self._adapters, lora_dir))

    def close(self) -> None:
        """Stop the engine (before a vLLM judge starts: both would not fit on one GPU)."""
        if self._engine is not None:
            self._engine.close()
        self._engine, self._engine_model = None, None


def generate(model, tokenizer, conversations: list[list[dict]], args: StyleEvalArgs, desc: str) -> Completions:
    """Seeded with args.seed for every model: the same random stream for baseline and evaluated models.
    `model` is a loaded HF model, or a VLLMTarget with --use_vllm."""
    from auxiliary.runtime.generation import generate_responses

    started = time.time()
    if isinstance(model, VLLMTarget):
        replies = model.engine.generate(conversations, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                                        lora_request=model.lora_request)
        return Completions([r.text for r in replies], [len(r.ids) for r in replies], time.time() - started)
    replies = generate_responses(model, tokenizer, conversations, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size,
                                 seed=args.seed, progress=True, desc=desc)
    return Completions([r.text for r in replies], [len(r.ids) for r in replies], time.time() - started)


def release(model) -> None:
    import torch

    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- judging and results

def judge_row(judge, prompts: list, evaluated: Completions, baseline: Completions, n_styles: int,
              n_bootstrap: int, seed: int, **labels) -> dict:
    from auxiliary.evals.evaluation_helpers import win_rate_stats

    started = time.time()
    decisions = judge.compare(prompts, evaluated.texts, baseline.texts)
    judge_seconds = time.time() - started
    return {**labels, **win_rate_stats(decisions, n_bootstrap=n_bootstrap, seed=seed),
            "mean_length_tokens": evaluated.mean_tokens, "mean_length_words": evaluated.mean_words,
            "baseline_mean_length_tokens": baseline.mean_tokens, "baseline_mean_length_words": baseline.mean_words,
            "generation_seconds": round(evaluated.seconds, 3), "judge_seconds": round(judge_seconds, 3),
            "seconds": round(judge_seconds + evaluated.seconds / max(1, n_styles), 3), "decisions": decisions}


def completion_records(source: str, prompts: list, completions: Completions, style: str | None = None) -> list[dict]:
    from auxiliary.evals.evaluation_helpers import prompt_as_text

    records = []
    for index, (prompt, text, n_tokens) in enumerate(zip(prompts, completions.texts, completions.n_tokens)):
        record = {"source": source, "prompt_index": index, "prompt": prompt_as_text(prompt), "completion": text,
                  "n_tokens": n_tokens}
        if style:
            record["style"] = style
        records.append(record)
    return records


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: Sequence[dict]) -> str:
    header = (f"{'model':<24}{'style':<36}{'win%':>7}{'SE':>6}{'bootSE':>8}{'W/L/T':>12}{'cov':>6}"
              f"{'words':>7}{'base':>7}{'sec':>8}")
    lines = [header, "-" * len(header)]
    for row in rows:
        wlt = f"{row['wins']}/{row['losses']}/{row['ties']}"
        lines.append(f"{row['checkpoint'][:23]:<24}{row['style'][:35]:<36}{_fmt(row['win_rate'], '.1f'):>7}"
                     f"{_fmt(row['se'], '.1f'):>6}{_fmt(row['se_bootstrap'], '.1f'):>8}{wlt:>12}"
                     f"{row['coverage']:>6.2f}{row['mean_length_words']:>7.1f}{row['baseline_mean_length_words']:>7.1f}"
                     f"{row['seconds']:>8.1f}")
    return "\n".join(lines)


def bar_figure_size(n_models: int, n_styles: int) -> tuple[float, float]:
    """Inches (at 100 dpi): wide enough for about half an inch per bar."""
    return max(6.0, 1.5 + 0.55 * n_models * max(1, n_styles)), 4.5


def plot_win_rate_bars(rows: Sequence[dict], path: str | Path, title: str) -> str:
    """Grouped bars: x = evaluated model (in row order), one bar per style, +-1 SE whiskers, 50% line.
    A style with no decisive pair has no bar (an 'n/a' mark instead)."""
    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure

    from auxiliary.evals.eval_common import save_figure

    models = list(dict.fromkeys(row["checkpoint"] for row in rows))
    styles = list(dict.fromkeys(row["style"] for row in rows))
    lookup = {(row["checkpoint"], row["style"]): row for row in rows}
    width = 0.8 / max(1, len(styles))
    fig = Figure(figsize=bar_figure_size(len(models), len(styles)), layout="constrained")
    ax = fig.subplots()
    ax.axhline(50.0, color="grey", linestyle=":", linewidth=1, label="50% (no difference)")
    positions = np.arange(len(models))
    for index, style in enumerate(styles):
        xs = positions - 0.4 + width * (index + 0.5)
        rates = [lookup.get((m, style), {}).get("win_rate") for m in models]
        errors = [lookup.get((m, style), {}).get("se") or 0.0 for m in models]
        colour = matplotlib.colormaps["tab10"](index % 10)
        heights = [np.nan if r is None else r for r in rates]
        ax.bar(xs, heights, width=width * 0.95, yerr=errors, capsize=3, color=colour, label=style)
        for x, rate in zip(xs, rates):
            if rate is None:
                ax.text(x, 2, "n/a", ha="center", fontsize=7, rotation=90)
    ax.set_xlim(-0.6, len(models) - 0.4)  # explicit: bars that are all n/a give autoscaling nothing to fit
    ax.set_xticks(positions)
    ax.set_xticklabels(models, rotation=20 if len(models) > 3 else 0, ha="right" if len(models) > 3 else "center",
                       fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("win rate vs baseline (%), ties excluded")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path, dpi=100)


def prepare_output_dir(args: StyleEvalArgs, tool: str) -> Path:
    """The output folder, checked writable but not created: write_outputs creates it with the results, so a run
    that fails first (a model that does not load) leaves no empty folder. One that already holds results is
    refused unless --overwrite."""
    from auxiliary.evals.eval_common import default_output_dir
    from auxiliary.runtime.io_utils import require_writable_folder

    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(tool)
    earlier = [name for name in ("results.json", "completions.jsonl") if (output_dir / name).exists()]
    if earlier and not args.overwrite:
        raise DataError(f"{output_dir} already holds results ({', '.join(earlier)}) of an earlier run; "
                        "pass --overwrite to replace them or choose another --output_dir")
    return require_writable_folder(output_dir)


def write_outputs(output_dir: Path, meta: dict, baseline: dict, rows: list[dict], completions: list[dict],
                  plot_title: str) -> None:
    from auxiliary.runtime.io_utils import atomic_write_json, atomic_write_jsonl

    atomic_write_json(output_dir / "results.json", {"meta": meta, "baseline": baseline, "results": rows})
    atomic_write_jsonl(output_dir / "completions.jsonl", completions)
    if rows:
        plot_win_rate_bars(rows, output_dir / "winrate.png", plot_title)
