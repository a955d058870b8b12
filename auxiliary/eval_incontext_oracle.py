"""In-context oracle: the model told the user's preferences in its system prompt vs the same model without.

    python auxiliary/eval_incontext_oracle.py --model Qwen/Qwen3-8B --judge claude --eval_n 100

For each style the persona text (auxiliary/personas.get_persona) goes into the system prompt
(--oracle_system_template; merged into a prompt's own system message when it has one). The
completions are judged against the model's plain completions (generated once, same prompts,
same seed) with the same pairwise judge as eval_checkpoints.py. No learning is involved: it
is the reference an interaction-trained model would ideally approach, one number per style.

Outputs (results.json, completions.jsonl, winrate.png) are described in auxiliary/evals/style_eval.py;
rows have checkpoint = "in-context oracle" and kind = "oracle".
"""
from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from auxiliary.evals import style_eval

logger = logging.getLogger("eval_incontext_oracle")

ORACLE_LABEL = "in-context oracle"
DEFAULT_ORACLE_SYSTEM_TEMPLATE = (
    "You are a helpful assistant. The user you are talking to has these preferences about how replies "
    "should be written (the description addresses the user as 'you'):\n{persona}\n"
    "Write your reply so that it matches these preferences.")


@dataclass
class OracleArgs(style_eval.StyleEvalArgs):
    model: str = field(default="Qwen/Qwen3-8B", metadata={"help": "model to evaluate: hub id, folder or embedded name"})
    data_dir: str = field(default="data/tldr_prompts_unique", metadata={"help": "folder with validation.jsonl"})
    oracle_system_template: str = field(default=DEFAULT_ORACLE_SYSTEM_TEMPLATE,
                                        metadata={"help": "system prompt of the oracle; must contain {persona}"})


def with_persona(messages: list[dict], system_text: str) -> list[dict]:
    """The conversation with the persona instruction as (or appended to) its system message."""
    messages = [dict(m) for m in messages]
    if messages and messages[0]["role"] == "system":
        messages[0]["content"] = f"{messages[0]['content'].rstrip()}\n\n{system_text}"
        return messages
    return [{"role": "system", "content": system_text}] + messages


def run(args: OracleArgs) -> Path:
    from auxiliary.evals.evaluation_helpers import prompt_as_messages
    from auxiliary.runtime.model_loading import load_model_and_tokenizer
    from auxiliary.feedback.personas import get_persona

    args.check()
    if "{persona}" not in args.oracle_system_template:
        raise ValueError("--oracle_system_template must contain the placeholder {persona}")
    style_eval.validate_styles(args.eval_styles, args.judge)
    style_eval.check_judge_model(args)
    output_dir = style_eval.prepare_output_dir(args, "incontext_oracle")

    if args.use_vllm:  # one engine; the persona only changes the prompts
        from auxiliary.runtime.model_loading import load_tokenizer, resolve_model_path

        model_path = resolve_model_path(args.model)
        tokenizer = load_tokenizer(model_path)
        vllm_models = style_eval.VLLMModels(args)
        model = vllm_models.target(model_path, tokenizer)
    else:
        model, tokenizer, model_path = load_model_and_tokenizer(args.model, args.dtype, args.attn_implementation,
                                                                args.device)
    prompts, prompt_file = style_eval.load_eval_prompts(args, args.data_dir, tokenizer)
    conversations = [prompt_as_messages(p) for p in prompts]
    baseline = style_eval.generate(model, tokenizer, conversations, args, "without persona")
    completions = style_eval.completion_records("baseline", prompts, baseline)
    oracle = {}
    for style in args.eval_styles:
        system_text = args.oracle_system_template.format(persona=get_persona(style))
        oracle[style] = style_eval.generate(model, tokenizer, [with_persona(c, system_text) for c in conversations],
                                            args, f"oracle {style}")
        completions += style_eval.completion_records(ORACLE_LABEL, prompts, oracle[style], style=style)
    style_eval.release(model)
    if args.use_vllm:
        vllm_models.close()

    meta = {"tool": "eval_incontext_oracle", "model": args.model, "model_path": model_path,
            "eval_styles": args.eval_styles, "judge": args.judge, "judge_model": style_eval.judge_model_name(args),
            "prompts": str(prompt_file), "eval_n": len(prompts), "args": asdict(args)}
    baseline_info = {"model": args.model, "system_prompt": None, "mean_length_tokens": baseline.mean_tokens,
                     "mean_length_words": baseline.mean_words, "generation_seconds": round(baseline.seconds, 3)}
    judges = style_eval.build_judges(args)
    rows = []
    for style in args.eval_styles:
        # each style has its own oracle generation, so `seconds` carries all of it (n_styles=1)
        rows.append(style_eval.judge_row(judges[style], prompts, oracle[style], baseline, 1, args.n_bootstrap,
                                         args.seed, checkpoint=ORACLE_LABEL, path=args.model, kind="oracle",
                                         style=style))
        style_eval.write_outputs(output_dir, meta, baseline_info, rows, completions,
                                 f"In-context oracle vs the same model without persona ({args.judge} judge, "
                                 f"n={len(prompts)})")
    print()
    print(style_eval.format_table(rows))
    print(f"\nwrote {output_dir / 'results.json'}, completions.jsonl and winrate.png")
    return output_dir / "results.json"


def main(argv: list[str] | None = None) -> int:
    from auxiliary.runtime.cli import run_cli

    return run_cli(OracleArgs, run, argv, prog="eval_incontext_oracle.py")


if __name__ == "__main__":
    sys.exit(main())
