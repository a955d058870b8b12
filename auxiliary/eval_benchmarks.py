"""Benchmarks of checkpoints and their baseline: IFEval, MMLU-Pro, TruthfulQA MC1, HellaSwag,
CommonsenseQA (lm-evaluation-harness) and AlpacaEval 2 length-controlled win rate (alpaca_eval).

    python auxiliary/eval_benchmarks.py --baseline_model Qwen/Qwen3-8B \
        --checkpoints /runs/a/checkpoints/step_000015 /runs/offline/lora_adapter \
        --tasks ifeval,alpaca_eval --output_dir /scratch/bench

Checkpoints are resolved and loaded as in auxiliary/eval_checkpoints.py (model folder, LoRA
adapter merged onto its base, online step_N/, folder of step_N/). Prints one table (main metric
± the benchmark's own stderr) and writes benchmarks.json; the files are described in
auxiliary/evals/benchmarks.py. docs/benchmarks.md has the paper's numbers to compare with.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import asdict
from pathlib import Path

from auxiliary.evals import benchmarks as bench
from auxiliary.evals.benchmarks import BenchmarkArgs
from auxiliary.runtime.io_utils import DataError

logger = logging.getLogger("eval_benchmarks")


def prepare_output_dir(args: BenchmarkArgs) -> Path:
    from auxiliary.evals.eval_common import default_output_dir

    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir("eval_benchmarks")
    earlier = [name for name in ("benchmarks.json", "lm_eval", "alpaca_eval") if (output_dir / name).exists()]
    if earlier and not args.overwrite:
        raise DataError(f"{output_dir} already holds results ({', '.join(earlier)}) of an earlier run; "
                        "pass --overwrite to replace them or choose another --output_dir")
    return output_dir


def print_plan(args: BenchmarkArgs, specs, output_dir: Path) -> None:
    """--dry-run: every harness call that a real run would make, in order."""
    lm_tasks = bench.lm_eval_task_names(args.tasks, args)
    print(f"# output_dir {output_dir} (nothing written: dry run)")
    if args.nltk_data:
        print(f"NLTK_DATA={Path(args.nltk_data).resolve()}")
    if args.ifeval_jsonl and "ifeval" in args.tasks:
        print(f"# {output_dir / 'lm_eval_tasks' / (bench.LOCAL_IFEVAL_TASK + '.yaml')}:")
        print(bench.local_ifeval_yaml(args.ifeval_jsonl).rstrip())
    include = output_dir / "lm_eval_tasks" if args.ifeval_jsonl and "ifeval" in args.tasks else None
    for label, spec in [("baseline", None)] + [(s.label, s) for s in specs]:
        described = bench.describe_model_args(spec, args)
        print(f"# {label}")
        if lm_tasks:
            print(
                bench.format_call("lm_eval.simple_evaluate", model=described["model"],
                                  model_args=described["model_args"],
                                    tasks=list(lm_tasks.values()), limit=args.limit, apply_chat_template=True,
                                    gen_kwargs=bench.gen_kwargs(args),
                                    task_manager=f"TaskManager(include_path={str(include) if include else None!r})"))
        if "alpaca_eval" in args.tasks:
            annotators = bench.annotator_config(args, None)
            print(
                bench.format_call("alpaca_eval.evaluate",
                                  model_outputs=f"<{label} answers to "
                                                f"{args.alpaca_eval_json or 'tatsu-lab/alpaca_eval'}>",
                                    reference_outputs=args.alpaca_eval_json or "tatsu-lab/alpaca_eval",
                                    annotators_config=annotators,
                                    name=label, output_path=str(output_dir / "alpaca_eval" / label),
                                    max_new_tokens=args.max_new_tokens or bench.ALPACA_MAX_NEW_TOKENS))


def evaluate_model(spec, label: str, args: BenchmarkArgs, output_dir: Path, include_path, reference,
                   annotators) -> dict:
    from lm_eval.utils import handle_non_serializable

    from auxiliary.runtime.io_utils import atomic_write_text
    import json

    lm = bench.build_lm(spec, args)
    scores = {}
    lm_tasks = bench.lm_eval_task_names(args.tasks, args)
    if lm_tasks:
        output = bench.run_lm_eval(lm, list(lm_tasks.values()), include_path, args)
        (output_dir / "lm_eval").mkdir(parents=True, exist_ok=True)
        kept = {key: output.get(key) for key in ("results", "configs", "versions", "n-samples", "samples")}
        atomic_write_text(output_dir / "lm_eval" / f"{label.replace('/', '__')}.json",
                          json.dumps(kept, indent=2, default=handle_non_serializable, ensure_ascii=False))
        scores.update(bench.lm_eval_scores(output, lm_tasks))
    if reference is not None:
        outputs = bench.generate_alpaca_outputs(lm, reference, label, args)
        scores["alpaca_eval"] = bench.run_alpaca_eval(outputs, reference, label, annotators,
                                                      output_dir / "alpaca_eval" / label.replace("/", "__"))
    bench.release(lm)
    return {"model": label, "path": args.baseline_model if spec is None else spec.path,
            "kind": "baseline" if spec is None else spec.kind,
            "scores": {task: scores[task] for task in args.tasks if task in scores}}


def run(args: BenchmarkArgs) -> Path | None:
    from auxiliary.eval_checkpoints import resolve_checkpoints

    args.check()
    require_harnesses(args.tasks)
    specs = resolve_checkpoints(args.checkpoints) if args.checkpoints else []
    output_dir = prepare_output_dir(args)
    bench.set_nltk_data(args.nltk_data)
    problems = [problem for problem in (bench.ifeval_nltk_problem(args, try_download=not args.dry_run),
                                        bench.annotator_key_problem(args)) if problem]
    if args.dry_run:
        print_plan(args, specs, output_dir)
        for problem in problems:
            print(f"# warning: {problem} (a real run stops here)")
        return None
    if problems:
        raise DataError(problems[0])
    check_models(args, specs)
    from auxiliary.runtime.io_utils import atomic_write_json

    output_dir.mkdir(parents=True, exist_ok=True)  # only now: a model that cannot load leaves no empty folder
    include_path = bench.write_task_configs(args, output_dir)
    reference = bench.load_alpaca_reference(args) if "alpaca_eval" in args.tasks else None
    annotators = bench.annotator_config(args, output_dir) if reference is not None else None
    config = {"tool": "eval_benchmarks", "args": asdict(args), "checkpoints": [vars(spec) for spec in specs],
              "lm_eval_tasks": bench.lm_eval_task_names(args.tasks, args),
              "include_path": str(include_path) if include_path else None,
              "alpaca_annotators_config": annotators, "harness_versions": harness_versions()}
    models = []
    for label, spec in [("baseline", None)] + [(s.label, s) for s in specs]:
        logger.info("evaluating %s on %s", label, ", ".join(args.tasks))
        models.append(evaluate_model(spec, label, args, output_dir, include_path, reference, annotators))
        atomic_write_json(output_dir / "benchmarks.json", {"config": config, "models": models})  # kept after each model
    print()
    print(bench.format_table(models, args.tasks))
    print(f"\nwrote {output_dir / 'benchmarks.json'}")
    return output_dir / "benchmarks.json"


def check_models(args: BenchmarkArgs, specs) -> None:
    """Every model exists and reads (model_loading.check_loadable; a hub id without network must be cached), a LoRA
    adapter fits its base; before the output folder is made and before minutes of the baseline's answers."""
    from auxiliary.eval_checkpoints import check_adapter_fits_base
    from auxiliary.runtime.model_loading import check_loadable

    check_loadable(args.baseline_model)
    for spec in specs:
        if spec.kind == "lora":
            check_adapter_fits_base(spec, args)
        else:
            check_loadable(spec.model_dir)


def require_harnesses(tasks: list[str]) -> None:
    import importlib.util

    needed = {bench.BENCHMARKS[task].harness for task in tasks} | {"lm_eval"}  # lm_eval runs every model
    missing = sorted(name for name in needed if importlib.util.find_spec(name) is None)
    if missing:
        pins = {"lm_eval": "lm-eval==0.4.13", "alpaca_eval": "alpaca-eval==0.6.6"}
        raise ValueError(f"{', '.join(missing)} not installed: pip install {' '.join(pins[m] for m in missing)}")


def harness_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("lm_eval", "alpaca_eval"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions


def main(argv: list[str] | None = None) -> int:
    from auxiliary.runtime.cli import run_cli

    return run_cli(BenchmarkArgs, run, argv, prog="eval_benchmarks.py")


if __name__ == "__main__":
    sys.exit(main())
