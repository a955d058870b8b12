"""The evaluation of an online run: the baseline's replies, the judged evaluations (against the baseline
and, with --phase_baseline snapshot, against each phase's start), the collapse monitors, the win-rate plot,
and the final summary with the arms' head-to-head.

Each arm answers the eval prompts (one batched generation, the same sampling seed at every evaluation and
for the baseline) and a judge per style (the users' styles plus --eval_styles) compares each reply with
the baseline's; with --per_user_adapters each user's adapter is judged on its user's style."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from auxiliary.evals.online_report import build_summary, fmt_rate, initial_baseline, mean_words, summary_text
from auxiliary.runtime.io_utils import atomic_write_json
from auxiliary.runtime.seeds import derive_seed
from auxiliary.runtime.wandb_run import WandbRun

logger = logging.getLogger("eval_online_sdpo")


class BaselineError(RuntimeError):
    """The baseline replies cannot be had as asked; the message is the whole story."""


class Phases:
    """The phases of a --style_schedule (one phase for --style and --users)."""

    def __init__(self, plan):
        from auxiliary.feedback.schedule import StyleSchedule

        self.schedule = plan if isinstance(plan, StyleSchedule) else None

    @property
    def boundaries(self) -> list[int]:
        """The last step of every phase but the final one (none without a schedule)."""
        return self.schedule.boundaries if self.schedule else []

    def number(self, step: int) -> int:
        """1-based phase of `step` (step 0 and every step of a one-style or multi-user run: phase 1)."""
        return self.schedule.phase_at(max(step, 1)) + 1 if self.schedule else 1

    def ends(self, last_step: int | None) -> list[dict] | None:
        """The forgetting table's rows: the start and the end of each phase reached (a schedule of 2+ phases)."""
        if not self.schedule or len(self.schedule.phases) < 2 or last_step is None:
            return None
        rows = [{"label": "start", "step": 0, "phase": None, "style": None}]
        for number, phase in enumerate(self.schedule.phases, start=1):
            end = min(phase.first_step + phase.interactions - 1, last_step)
            if end >= phase.first_step:
                rows.append({"label": f"end of phase {number} ({phase.style})", "step": end, "phase": number,
                             "style": phase.style})
        return rows


class Evaluator:
    def __init__(self, sdpo, run, arms, judges: dict, folder, eval_prompts: list, phases: Phases,
                 user_styles: list[str], styles: list[str], relevance=None):
        self.sdpo, self.run, self.arms, self.judges, self.folder = sdpo, run, arms, judges, folder
        self.eval_prompts, self.phases, self.user_styles, self.styles = eval_prompts, phases, user_styles, styles
        self.relevance = relevance  # --relevance_model: auxiliary/feedback/relevance.RelevanceScorer
        self.history: list[dict] = []
        self.eval_texts: dict[tuple, list[str]] = {}  # (step, arm, adapter) -> eval replies
        self.baseline: list[str] = []
        self.wandb = WandbRun()
        self.seed = derive_seed(sdpo.seed, "eval")  # one sampling seed: every evaluation and the baseline

    @property
    def out(self) -> Path:
        return self.folder.path

    def messages(self) -> list[list[dict]]:
        from auxiliary.evals.evaluation_helpers import prompt_as_messages

        return [prompt_as_messages(p) for p in self.eval_prompts]

    def groups(self) -> list[tuple[str | None, list[str]]]:
        """(adapter, styles judged on its replies): the shared policy on every style, or each user's adapter
        on its user's style."""
        return [(style, [style]) for style in self.user_styles] if self.arms.per_user else [(None, self.styles)]

    def generate(self, arm: str, desc: str, adapter: str | None = None, workers: int = 1):
        return self.arms.policy(arm, adapter or self.user_styles[0]).generate(
            self.messages(), max_new_tokens=self.run.eval_max_new_tokens, seed=self.seed, progress=True,
            desc=desc, workers=workers)

    # ------------------------------------------------------------ the baseline
    def load_or_make_baseline(self, resumed: bool) -> None:
        """The baseline's eval replies: cached in the folder, else made (--baseline_model, or the initial
        policy, which a resumed run can no longer make)."""
        run, sdpo = self.run, self.sdpo
        signature = {"baseline_model": run.baseline_model or sdpo.model,
                     "eval_prompts_sha256": hashlib.sha256(json.dumps(self.eval_prompts).encode()).hexdigest(),
                     "seed": self.seed, "max_new_tokens": run.eval_max_new_tokens,
                     "temperature": sdpo.temperature, "top_p": sdpo.top_p}
        self.baseline = self.folder.cached_baseline(signature)
        if self.baseline is not None:
            return
        if not self.eval_prompts:
            self.baseline = []
        elif run.baseline_model:
            from auxiliary.runtime.generation import generate_responses
            from auxiliary.runtime.model_loading import load_model_and_tokenizer

            model, tokenizer, _ = load_model_and_tokenizer(run.baseline_model, sdpo.dtype, sdpo.attn_implementation,
                                                           sdpo.device)
            replies = generate_responses(model, tokenizer, self.messages(), run.eval_max_new_tokens, sdpo.temperature,
                                         sdpo.top_p, sdpo.generation_batch_size, sdpo.max_context_length, self.seed,
                                         True, "baseline")
            del model
            self.baseline = [r.text for r in replies]
        else:
            if resumed:
                raise BaselineError(f"--resume: {self.out / 'baseline_completions.json'} is missing; "
                                    "the baseline (the initial policy) cannot be rebuilt")
            # --arms_in_parallel: the cores the two arms will share take the baseline's batches side by side
            workers = len(self.arms.names) if self.arms.in_parallel else 1
            self.baseline = [r.text for r in self.generate("feedback", "baseline", workers=workers)]
        self.folder.save_baseline(signature, self.baseline)

    # ------------------------------------------------------------ one evaluation
    def evaluate(self, step: int) -> None:
        if not self.eval_prompts:
            return
        from auxiliary.evals.collapse import eval_monitors

        phase = self.phases.number(step)

        def replies_and_monitors(arm):
            """{adapter: (texts, generation seconds, the arm's collapse monitors on them)} of one arm."""
            found = {}
            for adapter, _ in self.groups():
                started = time.perf_counter()
                if step == 0 and not self.run.baseline_model:
                    # Same initial weights (LoRA adapters start at zero) and sampling seed as the baseline: identical.
                    texts = list(self.baseline)
                else:
                    where = f"{arm}/{adapter}" if adapter else arm
                    texts = [r.text for r in self.generate(arm, f"eval {where} @{step}", adapter)]
                gen_time = round(time.perf_counter() - started, 4)
                updater = self.arms.policy(arm, adapter or self.user_styles[0])
                found[adapter] = (texts, gen_time, eval_monitors(updater.model, updater.tokenizer,
                                                                 self.messages(), texts, self.baseline,
                                                                 self.relevance))
            return found

        evaluated = self.arms.per_arm(replies_and_monitors)
        schedule = self.phases.schedule
        for arm in self.arms:
            for adapter, styles in self.groups():
                texts, gen_time, monitors = evaluated[arm][adapter]
                self.eval_texts[(step, arm, adapter)] = texts
                tags = {"phase": phase, **({"adapter": adapter} if adapter else {}),
                        "monitors": self._monitors(step, arm, adapter, monitors)}
                for style in styles:
                    self._judge_record(step, style, arm, texts, self.baseline, "initial", gen_time, tags)
                if self.run.phase_baseline == "snapshot" and step > 0:
                    # The phase's own style against the arm's replies when the phase began (eval step 0 or the
                    # boundary before): what the phase added on top of what the policy had.
                    start = schedule.phases[phase - 1].first_step - 1
                    self._judge_record(step, schedule.phases[phase - 1].style, arm, texts,
                                       self.texts_at(start, arm), "snapshot", gen_time,
                                       {**tags, "snapshot_step": start})
                for index, (prompt, text) in enumerate(zip(self.eval_prompts, texts)):
                    self.folder.append_completion({"step": step, "phase": "eval", "arm": arm,
                                                   **({"adapter": adapter} if adapter else {}), "index": index,
                                                   "prompt": prompt, "completion": text})
        self.folder.write_history(self.history)
        self._plot()
        logger.info("eval @%d: %s", step, "; ".join(
            f"{r['style']}/{r['arm']}{'/' + r['adapter'] if 'adapter' in r else ''}"
            f"{' vs snapshot' if r['baseline'] == 'snapshot' else ''} {fmt_rate(r)}"
            for r in self.history if r["step"] == step))

    def _monitors(self, step: int, arm: str, adapter: str | None, monitors: dict) -> dict:
        """One arm's collapse monitors of its eval replies (collapse.eval_monitors), relative to step 0's;
        a monitor past its threshold is a logged warning (and kept in the record)."""
        from auxiliary.evals.collapse import collapse_warnings, relative_to_start, text_monitors

        start = monitors if step == 0 else next(
            (r["monitors"] for r in self.history if r["step"] == 0 and r["arm"] == arm
             and r.get("adapter") == adapter and "monitors" in r), None)
        monitors.update(relative_to_start(monitors, start))
        warnings = collapse_warnings(monitors, start or {}, text_monitors(self.baseline, self.messages(),
                                                                          self.relevance)["degenerate_share"])
        for warning in warnings:
            logger.warning("eval @%d %s: collapse monitor: %s", step, f"{arm}/{adapter}" if adapter else arm, warning)
        return {**monitors, "warnings": warnings}

    def _judge_record(self, step: int, style: str, arm: str, texts: list[str], reference: list[str], baseline: str,
                      gen_time: float, tags: dict) -> None:
        """Judge `texts` against `reference` for `style`; one eval_history record."""
        from auxiliary.evals.evaluation_helpers import win_rate_stats

        started = time.perf_counter()
        comparison = self.judges[style].compare_detailed(self.eval_prompts, texts, reference)
        judge_time = round(time.perf_counter() - started, 4)
        seed_parts = ("bootstrap", step, style, arm) + (() if baseline == "initial" else (baseline,))
        stats = win_rate_stats(comparison.decisions, seed=derive_seed(self.sdpo.seed, *seed_parts))
        if comparison.unparseable:
            logger.warning("eval @%d %s/%s: %d of %d judge replies had no verdict (counted as ties)", step,
                           style, arm, comparison.unparseable, 2 * len(comparison.decisions))
        self.history.append({"step": step, "style": style, "arm": arm, **stats,
                             "unparseable_verdicts": comparison.unparseable,
                             "mean_words": round(mean_words(texts), 2), "baseline": baseline, **tags,
                             "eval_gen_time_s": gen_time, "judge_time_s": judge_time})
        prefix = f"eval/{style}/{arm}" + (f"/{tags['adapter']}" if "adapter" in tags else "") + \
            ("" if baseline == "initial" else f"/vs_{baseline}")
        self.wandb.log({f"{prefix}/{k}": v for k, v in {**stats, **tags["monitors"]}.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)}, step)

    def _plot(self) -> None:
        from auxiliary.evals.evaluation_helpers import plot_win_rates

        # Step 0 with every pair tied is the policy reproducing the baseline: drawn at 50%, not left out.
        plotted = [dict(r, win_rate=50.0, se=0.0) if r["step"] == 0 and r["win_rate"] is None and r["ties"] == r["n"]
                   else r for r in initial_baseline(self.history)]
        from auxiliary.evals.collapse import text_monitors

        reference = {"mean_words": mean_words(self.baseline), "n": len(self.baseline), "degenerate_replies":
                     text_monitors(self.baseline, self.messages(), self.relevance)["degenerate_replies"]}
        plot_win_rates(plotted, self.out / "winrate.png",
                       title=f"{Path(self.sdpo.model).name}: win rate vs baseline ({self.run.judge} judge), +-1 SE",
                       boundaries=self.phases.boundaries, reference=reference)

    def texts_at(self, step: int, arm: str, adapter: str | None = None) -> list[str]:
        """The arm's eval replies at `step` (from memory, or from completions.jsonl after a resume)."""
        if (step, arm, adapter) in self.eval_texts:
            return self.eval_texts[(step, arm, adapter)]
        rows = sorted((r for r in self.folder.read_completions()
                       if r["phase"] == "eval" and r["step"] == step and r["arm"] == arm
                       and r.get("adapter") == adapter), key=lambda r: r["index"])
        texts = [r["completion"] for r in rows] if len(rows) == len(self.eval_prompts) else []
        if texts:
            self.eval_texts[(step, arm, adapter)] = texts
        return texts

    # ------------------------------------------------------------ the end
    def summary(self) -> dict:
        """Judge the arms' final replies head to head, write summary.json, print the summary."""
        from auxiliary.evals.evaluation_helpers import win_rate_stats

        names = self.arms.names
        last_step = max((r["step"] for r in self.history), default=None)
        # style -> arm -> the final eval replies judged on that style (the shared policy's, or the user's adapter's)
        style_texts = {}
        if last_step is not None:
            for adapter, styles in self.groups():
                for style in styles:
                    style_texts[style] = {arm: self.texts_at(last_step, arm, adapter) for arm in names}
        texts = style_texts.get(self.styles[0], {})
        head_to_head = {}
        for style, by_arm in style_texts.items():
            if by_arm.get("feedback") and by_arm.get("placebo"):
                # The same prompts answered by both arms, judged directly: a paired, more sensitive comparison.
                decisions = self.judges[style].compare(self.eval_prompts, by_arm["feedback"], by_arm["placebo"])
                head_to_head[style] = win_rate_stats(decisions, seed=derive_seed(self.sdpo.seed, "h2h", style))
        summary = build_summary(self.history, self.styles, last_step, self.baseline, texts, head_to_head, self.out,
                                style_texts=style_texts, phase_ends=self.phases.ends(last_step),
                                eval_prompts=self.eval_prompts, relevance=self.relevance)
        atomic_write_json(self.out / "summary.json", summary)
        print(summary_text(summary, self.history, names, self.styles, self.baseline, texts, self.eval_prompts,
                           self.out), flush=True)
        self.wandb.finish(self.out / "winrate.png", {"final": summary["final"], "head_to_head": head_to_head})
        return summary
