"""Benchmark the online loop: interactions per minute, time per phase, and the fast paths the loop relies on.

The loop is the real one: eval_online_sdpo.OnlineRun (setup, then loop with one feedback arm,
the rule-based user and the rule judge), with timing wrappers around its parts:
  policy_generation   OnlineSDPOUpdater.generate for the interaction's prompt (sampled, as in the loop)
  feedback            the simulated user's follow-up (make_user_simulator("rule", style))
  update              OnlineSDPOUpdater.train_batch (teacher under xo, loss, backward, AdamW step)
  loop_other          the rest of the loop (metrics.jsonl, completions.jsonl, progress bar)
  eval_generation     the evaluation's batched generation of --eval_n replies (at the end of the run)
  eval_other          judging against the cached baseline, eval_history.json, winrate.png
The first interaction is a warm-up (one-time costs: optimizer state allocation, head check) and is
reported apart; interactions per minute are computed from the others, with and without an
evaluation every --eval_every interactions.

Then, on the trained model, each fast path against the straightforward way, in the same run:
  eval_generation_time_batched   auxiliary.runtime.generation.generate_responses over the eval prompts with
                                 batch_size = eval_n (left padding) vs batch_size = 1; greedy, the same
                                 max_new_tokens; the token ids of both are compared prompt by prompt.
  teacher_forward_time_batched   the teacher's no-grad scoring of the xo contexts of all measured
                                 interactions in one forward (what train_batch does) vs one forward
                                 per interaction. The online loop updates on one interaction per step,
                                 so this matters for train_batch, not for eval_online_sdpo.py.
  update_time_fused_head         loss + backward of the measured interactions, one per update as in the
                                 loop, with the fused LM head (as shipped) vs the checkpointed head
                                 (fused_lm_head=False); no optimizer step, so both see the same weights.
  checkpoint_save_time / checkpoint_rss_growth
                                 OnlineSDPOUpdater.save_checkpoint (writes the live model) vs copying
                                 the model first and writing the copy (a snapshot).
  step0_eval_time_cached_baseline
                                 reading baseline_completions.json (the loop reuses it at step 0 and
                                 on --resume) vs generating the baseline replies again.
  (no ratio) re-tokenisation: how many replies decode-then-encode to other ids than were sampled,
             which is why train_step takes the sampled ids.

Last, the throughput sweep: the real loop again with --interactions_per_update B for each B of
--batch_sizes (default 1,4,8; a fresh run each, no evaluation), without and with
--overlap_generation, one warm-up batch, --sweep_batches timed ones, one last untimed; interactions
per minute per B, as ratios to the first B (`ratio interactions_per_minute_B4_vs_B1`: above 1 is
faster) and with the overlap to without it (`ratio interactions_per_minute_overlap_vs_in_turn_B1`).

Output: a phase table, the comparisons, then `ratio NAME VALUE` lines (ours / straightforward).
--out FILE writes every number as JSON.

    python bench/bench_online.py [--quick] [--model smollm2-135m-instruct] [--n_interactions 6]
                                 [--eval_n 16] [--max_new_tokens 48] [--threads 1] [--batch_sizes 1,4,8]
                                 [--sweep_batches 2] [--out results.json]
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from bench_common import RssPeak, environment_lines, format_table, time_interactions

from auxiliary.runtime.io_utils import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
LOOP_PHASES = ("policy_generation", "feedback", "update", "loop_other")
EVAL_PHASES = ("eval_generation", "eval_other")
QUICK = dict(model="tiny-random", n_interactions=2, eval_n=4, max_new_tokens=8, batch_sizes="1,2", sweep_batches=1)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="policy model (embedded names work offline)")
    parser.add_argument("--n_interactions", type=int, default=6, help="measured interactions (plus one warm-up)")
    parser.add_argument("--eval_n", type=int, default=16, help="evaluation prompts (one generation batch)")
    parser.add_argument("--max_new_tokens", type=int, default=48, help="reply length limit, training and evaluation")
    parser.add_argument("--eval_every", type=int, default=3,
                        help="for interactions/min with evaluation: one evaluation per this many interactions")
    parser.add_argument("--style", default="no_emojis", help="the rule user's style")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared 2-core machine two OpenMP threads stall "
                             "while another process holds a core; 0 = torch's choice)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test in seconds: {', '.join(f'{k}={v}' for k, v in QUICK.items())}")
    parser.add_argument("--batch_sizes", default="1,4,8",
                        help="--interactions_per_update values of the throughput sweep (the first is the reference)")
    parser.add_argument("--sweep_batches", type=int, default=2,
                        help="measured updates per batch size (plus one warm-up)")
    parser.add_argument("--out", default=None, help="write all numbers to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    if args.n_interactions < 2 or args.eval_n < 1 or args.max_new_tokens < 1 or args.eval_every < 1:
        parser.error("need --n_interactions >= 2, --eval_n >= 1, --max_new_tokens >= 1, --eval_every >= 1")
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(f"--batch_sizes: comma-separated integers, got {args.batch_sizes!r}")
    if min(args.batch_sizes) < 1 or args.sweep_batches < 1:
        parser.error("need --batch_sizes >= 1 and --sweep_batches >= 1")
    return args


# --------------------------------------------------------------------------- timing

class PhaseClock:
    """Wall and CPU seconds per call, grouped by phase; `phase` names where a shared call is counted."""

    def __init__(self):
        self.calls: dict[str, list[tuple[float, float]]] = {}
        self.phase: str | None = None

    def wrap(self, fn, phase: str | None = None):
        def timed_call(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.calls.setdefault(phase or self.phase, []).append(
                    (time.perf_counter() - wall, time.process_time() - cpu))
        return timed_call

    @contextmanager
    def current(self, phase: str):
        previous, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = previous

    def walls(self, phase: str) -> list[float]:
        return [wall for wall, _ in self.calls.get(phase, [])]


def measure(fn):
    """(result, wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def load_average() -> str:
    try:
        return " ".join(f"{value:.1f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


# --------------------------------------------------------------------------- the loop

def build_run(args, out_dir: Path, batch_size: int = 1, train_n: int | None = None, eval_n: int | None = None,
              overlap: bool = False):
    from eval_online_sdpo import OnlineRun
    from online_sdpo_updater_config import OnlineRunConfig, OnlineSDPOConfig

    eval_n = args.eval_n if eval_n is None else eval_n
    sdpo = OnlineSDPOConfig(model=args.model, device=args.device, seed=args.seed, max_new_tokens=args.max_new_tokens,
                            generation_batch_size=max(args.eval_n, batch_size))
    run = OnlineRunConfig(train_jsonl=str(REPO / "data/samples/train.jsonl"),
                          val_jsonl=str(REPO / "data/samples/validation.jsonl"),
                          train_n=train_n or args.n_interactions + 1, eval_n=eval_n, style=args.style,
                          eval_every=0, eval_max_new_tokens=args.max_new_tokens, output_dir=str(out_dir),
                          interactions_per_update=batch_size, overlap_generation=overlap)
    return OnlineRun(sdpo, run)


def sweep_batch_sizes(args, work_dir: Path) -> dict:
    """Interactions per minute of the real loop with --interactions_per_update B, for each B of --batch_sizes,
    without and with --overlap_generation: one warm-up batch, --sweep_batches timed ones and one last batch,
    untimed (generation of B replies, B follow-ups, one update, completions.jsonl; with the overlap the next
    batch's answers beside the update, so each timed batch holds one answering and one update either way);
    no evaluation (eval_n 0), so only the loop's own work is timed."""
    results = {}
    needed = 2 + args.sweep_batches
    for batch_size in args.batch_sizes:
        for overlap in (False, True):
            name = f"B{batch_size}" + ("_overlap" if overlap else "")
            run = build_run(args, work_dir / f"sweep_{name}", batch_size, train_n=batch_size * needed, eval_n=0,
                            overlap=overlap)
            run.setup()
            if run.num_steps < batch_size * needed:
                raise SystemExit(f"only {run.num_steps} training prompts for B = {batch_size}; lower --sweep_batches")
            walls = time_interactions(run)
            run.loop()
            measured = walls[1:-1]
            results[name] = {"batch_size": batch_size, "overlap": overlap, "update_walls_s": walls,
                             "interactions": batch_size * len(measured),
                             "interactions_per_minute": 60 * batch_size * len(measured) / sum(measured)}
            run.folder.close()
            del run
    return results


def run_loop(args, out_dir: Path, clock: PhaseClock):
    """Set up and run the real loop with timers on its parts; returns (run, recorded interactions)."""
    from online_sdpo_updater import OnlineSDPOUpdater

    run = build_run(args, out_dir)
    interactions = []  # (messages, reply ids, follow-up) as passed to train_step
    original_generate = OnlineSDPOUpdater.generate
    OnlineSDPOUpdater.generate = clock.wrap(original_generate)  # the updater is built inside setup()
    try:
        with clock.current("baseline_generation"):  # setup's only generate() call: the baseline replies
            _, setup_wall, _ = measure(run.setup)
        if len(run.train_prompts) < args.n_interactions + 1:
            raise SystemExit(f"only {len(run.train_prompts)} training prompts; lower --n_interactions")
        updater = run.arms.updaters["feedback"]
        user = run.users["feedback"][args.style]
        user.generate_feedback = clock.wrap(user.generate_feedback, "feedback")
        train_batch = updater.train_batch

        def recorded_train_batch(conversations, response_ids, followups):
            interactions.extend((m, list(ids), f) for m, ids, f in zip(conversations, response_ids, followups))
            return train_batch(conversations, response_ids, followups)

        updater.train_batch = clock.wrap(recorded_train_batch, "update")
        interact, evaluate = run.interact_batch, run.evaluator.evaluate

        def timed_interact(*batch):
            with clock.current("policy_generation"):
                return clock.wrap(interact, "interaction")(*batch)

        def timed_evaluate(step):
            with clock.current("eval_generation"):
                return clock.wrap(evaluate, "evaluation")(step)

        run.interact_batch, run.evaluator.evaluate = timed_interact, timed_evaluate
        _, loop_wall, _ = measure(run.loop)
    finally:
        OnlineSDPOUpdater.generate = original_generate
    return run, interactions, setup_wall, loop_wall


def loop_phases(clock: PhaseClock, loop_wall: float) -> dict:
    """Seconds per phase: warm-up interaction, steady-state mean, and the final evaluation."""
    per_step = {phase: clock.walls(phase) for phase in ("policy_generation", "feedback", "update")}
    totals = clock.walls("interaction")
    per_step["loop_other"] = [total - sum(per_step[p][i] for p in ("policy_generation", "feedback", "update"))
                              for i, total in enumerate(totals)]
    # Between interactions (metrics.jsonl rewrite, progress bar) is loop time too: spread it evenly.
    between = loop_wall - sum(totals) - sum(clock.walls("evaluation"))
    per_step["loop_other"] = [value + between / len(totals) for value in per_step["loop_other"]]
    eval_walls = clock.walls("evaluation")
    eval_generation = clock.walls("eval_generation")  # step 0 reuses the cached baseline: no generation
    return {
        "warmup": {phase: per_step[phase][0] for phase in LOOP_PHASES},
        "steady_mean": {phase: statistics.fmean(per_step[phase][1:]) for phase in LOOP_PHASES},
        "steady_per_step": {phase: per_step[phase][1:] for phase in LOOP_PHASES},
        "final_eval": {"eval_generation": eval_generation[-1], "eval_other": eval_walls[-1] - eval_generation[-1]},
        "step0_eval_with_cached_baseline": eval_walls[0],
    }


# --------------------------------------------------------------------------- comparisons

def compare_eval_generation(run, args) -> dict:
    """Greedy replies to the eval prompts, all in one left-padded batch vs one prompt at a time."""
    from auxiliary.runtime.generation import generate_responses

    updater = run.arms.updaters["feedback"]
    conversations = run.evaluator.messages()

    def generate(batch_size):
        return generate_responses(updater.model, updater.tokenizer, conversations, max_new_tokens=args.max_new_tokens,
                                  temperature=0.0, batch_size=batch_size,
                                  max_context_length=updater.config.max_context_length)

    batched, wall_b, cpu_b = measure(lambda: generate(len(conversations)))
    single, wall_s, cpu_s = measure(lambda: generate(1))
    mismatches = [index for index, (a, b) in enumerate(zip(batched, single)) if a.ids != b.ids]
    first_difference = {}
    for index in mismatches:
        a, b = batched[index].ids, single[index].ids
        first_difference[index] = next((t for t, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    from sdpo_objective import render_context_ids

    prompt_lengths = [len(render_context_ids(updater.tokenizer, c)) for c in conversations]
    reply_lengths = [len(r.ids) for r in single]
    # What the batch computes that one-at-a-time does not: pad positions in the prompt and steps
    # of rows that already ended (HF generate stops only when every row has).
    width, steps = max(prompt_lengths), max(len(r.ids) for r in batched)
    prefill_slots, decode_slots = width * len(conversations), steps * len(conversations)
    return {
        "batch_size": len(conversations), "wall_batched_s": wall_b, "wall_single_s": wall_s,
        "cpu_batched_s": cpu_b, "cpu_single_s": cpu_s,
        "tokens_generated": sum(reply_lengths), "replies_finished_by_eos": sum(r.finished for r in single),
        "prompt_tokens": sum(prompt_lengths), "prompt_pad_fraction": 1 - sum(prompt_lengths) / prefill_slots,
        "decode_slots_after_eos_fraction": 1 - sum(len(r.ids) for r in batched) / decode_slots,
        "ids_mismatches": len(mismatches), "ids_compared": len(conversations),
        "first_difference_at_token": first_difference,
    }


def compare_teacher_forward(run, interactions, repeats: int = 3) -> dict:
    """No-grad teacher scoring of every xo context in one forward vs one forward per interaction."""
    from sdpo_objective import score_tokens

    updater = run.arms.updaters["feedback"]
    messages, replies, followups = zip(*interactions)
    chunk = updater.config.logits_chunk_size
    model = updater.model
    model.eval()

    def batched():
        _, batch_xo, _ = updater.build_batches(messages, replies, followups)
        return score_tokens(model, batch_xo, chunk)[0]

    def one_by_one():
        pieces = []
        for m, r, f in interactions:
            _, batch_xo, _ = updater.build_batches([m], [r], [f])
            pieces.append(score_tokens(model, batch_xo, chunk)[0])
        return torch.cat(pieces)

    walls = {"batched": [], "single": []}
    with torch.no_grad():
        for repeat in range(repeats):  # interleaved, order alternating, so load hits both alike
            order = ("batched", "single") if repeat % 2 == 0 else ("single", "batched")
            for name in order:
                values, wall, _ = measure(batched if name == "batched" else one_by_one)
                walls[name].append(wall)
                if name == "batched":
                    logp_batched = values
                else:
                    logp_single = values
    model.train()
    return {"interactions": len(interactions), "response_tokens": int(logp_single.numel()),
            "wall_batched_s": statistics.median(walls["batched"]), "wall_single_s": statistics.median(walls["single"]),
            "max_abs_logprob_difference": float((logp_batched - logp_single).abs().max())}


def compare_update_head(run, interactions, repeats: int = 2) -> dict:
    """Loss + backward per interaction with the fused LM head vs the checkpointed one (same weights)."""
    import dataclasses

    from sdpo_objective import sdpo_loss

    updater = run.arms.updaters["feedback"]
    batches = [updater.build_batches([m], [r], [f]) for m, r, f in interactions]
    options = {"fused": dataclasses.replace(updater.options, fused_lm_head=True),
               "checkpointed": dataclasses.replace(updater.options, fused_lm_head=False)}
    updater.model.train()

    def updates(name):
        losses = []
        for batch_x, batch_xo, batch_neutral in batches:
            loss, _ = sdpo_loss(updater.model, batch_x, batch_xo, options[name], updater.ref_model,
                                batch_neutral=batch_neutral)
            loss.backward()
            updater.model.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        return losses

    walls, losses = {"fused": [], "checkpointed": []}, {}
    for repeat in range(repeats):  # interleaved, order alternating
        for name in (("fused", "checkpointed") if repeat % 2 == 0 else ("checkpointed", "fused")):
            losses[name], wall, _ = measure(lambda n=name: updates(n))
            walls[name].append(wall / len(batches))
    return {"interactions": len(batches), "loss_mode": updater.options.loss_mode,
            "wall_fused_s": statistics.median(walls["fused"]),
            "wall_checkpointed_s": statistics.median(walls["checkpointed"]),
            "max_abs_loss_difference": max(abs(a - b) for a, b in zip(losses["fused"], losses["checkpointed"]))}


def save_from_snapshot(updater, path: Path) -> Path:
    """The straightforward checkpoint: copy the model, then write the copy (same method, same files, same fsyncs)."""
    live = updater.model
    updater.model = copy.deepcopy(live)
    try:
        return updater.save_checkpoint(path)
    finally:
        updater.model = live


def compare_checkpoint(run, work_dir: Path) -> dict:
    """save_checkpoint on the live model vs on a copy; order ours, copy, copy, ours (page cache and disk even out)."""
    updater = run.arms.updaters["feedback"]
    saves = {"ours": updater.save_checkpoint, "snapshot": lambda p: save_from_snapshot(updater, p)}
    runs = {name: [] for name in saves}
    for name in ("ours", "snapshot", "snapshot", "ours"):
        path = work_dir / f"checkpoint_{name}"
        with RssPeak() as rss:
            _, wall, _ = measure(lambda: saves[name](path))
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        runs[name].append((wall, rss.peak, size))
        shutil.rmtree(path)
    result = {}
    for name, measured in runs.items():
        walls, growths, sizes = zip(*measured)
        result[name] = {"wall_s": statistics.fmean(walls), "walls_s": list(walls),
                        "rss_growth_bytes": None if None in growths else max(growths), "bytes_written": sizes[0]}
    return result


def compare_baseline_cache(run, clock: PhaseClock) -> dict:
    """The loop's cached baseline (read and signature-checked) vs generating the baseline replies again."""
    generate_wall = clock.walls("baseline_generation")[-1]
    _, cached_wall, _ = measure(lambda: run.evaluator.load_or_make_baseline(resumed=False))
    return {"wall_generate_s": generate_wall, "wall_cached_s": cached_wall}


def retokenisation_mismatches(run, interactions) -> dict:
    tokenizer = run.arms.updaters["feedback"].tokenizer
    stops = set(tokenizer.all_special_ids)
    differ = 0
    for _, ids, _ in interactions:
        content = [t for t in ids if t not in stops]
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        differ += tokenizer.encode(text, add_special_tokens=False) != content
    return {"replies": len(interactions), "differ_after_decode_encode": differ}


# --------------------------------------------------------------------------- report

def report(args, phases, evalgen, teacher, head, checkpoint, baseline, retok, setup_wall, elapsed, load_start):
    n_steady = len(phases["steady_per_step"]["update"])
    per_interaction = sum(phases["steady_mean"].values())
    eval_batched = phases["final_eval"]["eval_generation"] + phases["final_eval"]["eval_other"]
    eval_single = evalgen["wall_single_s"] * phases["final_eval"]["eval_generation"] / evalgen["wall_batched_s"] \
        + phases["final_eval"]["eval_other"]  # the loop's eval scaled by the measured single/batched factor
    rates = {
        "interactions_per_minute": 60 / per_interaction,
        "interactions_per_minute_with_eval": 60 / (per_interaction + eval_batched / args.eval_every),
        "interactions_per_minute_with_eval_one_prompt_at_a_time": 60 / (per_interaction
                                                                        + eval_single / args.eval_every),
    }
    rows = []
    for phase in LOOP_PHASES:
        mean = phases["steady_mean"][phase]
        rows.append([phase, f"{phases['warmup'][phase]:.2f}", f"{mean:.2f}", f"{100 * mean / per_interaction:.0f}%"])
    rows.append(["interaction", f"{sum(phases['warmup'].values()):.2f}", f"{per_interaction:.2f}", "100%"])
    for phase in EVAL_PHASES:
        rows.append([f"{phase} (x{args.eval_n} prompts)", "", f"{phases['final_eval'][phase]:.2f}", ""])
    lines = [format_table(["phase", "warm-up s", f"mean s (n={n_steady})", "share"], rows), ""]
    lines += [f"{name.replace('_', ' ')}: {value:.2f}"
              + (f" (evaluation every {args.eval_every})" if "eval" in name else "")
              for name, value in rates.items()]
    lines.append(f"setup (load model, data, baseline of {args.eval_n} replies): {setup_wall:.1f} s")
    lines.append("")
    lines.append(f"eval generation, greedy, {evalgen['ids_compared']} prompts x {args.max_new_tokens} new tokens: "
                 f"batched (batch {evalgen['batch_size']}) {evalgen['wall_batched_s']:.2f} s wall / "
                 f"{evalgen['cpu_batched_s']:.2f} s cpu; one at a time {evalgen['wall_single_s']:.2f} s wall / "
                 f"{evalgen['cpu_single_s']:.2f} s cpu; {evalgen['tokens_generated']} tokens, "
                 f"{evalgen['replies_finished_by_eos']} replies ended by EOS")
    lines.append(f"  batch waste: {100 * evalgen['prompt_pad_fraction']:.0f}% of prefill positions are padding, "
                 f"{100 * evalgen['decode_slots_after_eos_fraction']:.0f}% of decode slots follow a row's EOS")
    lines.append(f"  token ids batched vs one at a time: {evalgen['ids_mismatches']} of {evalgen['ids_compared']} "
                 f"replies differ" + (f" (first differing token per reply: {evalgen['first_difference_at_token']})"
                                      if evalgen["ids_mismatches"] else ""))
    lines.append(
        f"teacher scoring of {teacher['interactions']} xo contexts ({teacher['response_tokens']} reply tokens): "
                 f"one forward {teacher['wall_batched_s']:.3f} s, one per interaction {teacher['wall_single_s']:.3f} "
                 "s; "
                 f"max |log p difference| {teacher['max_abs_logprob_difference']:.1e}")
    lines.append(f"update ({head['loss_mode']}, loss + backward, mean of {head['interactions']} interactions): "
                 f"fused LM head {head['wall_fused_s']:.3f} s, checkpointed head {head['wall_checkpointed_s']:.3f} s; "
                 f"max |loss difference| {head['max_abs_loss_difference']:.1e}")
    ours, snap = checkpoint["ours"], checkpoint["snapshot"]
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:,.0f} MiB"  # noqa: E731
    lines.append(f"checkpoint ({mib(ours['bytes_written'])} written): save_checkpoint {ours['wall_s']:.2f} s, "
                 f"RSS +{mib(ours['rss_growth_bytes'])}; copy then write {snap['wall_s']:.2f} s, "
                 f"RSS +{mib(snap['rss_growth_bytes'])}")
    lines.append(f"step-0 evaluation baseline: cached {baseline['wall_cached_s'] * 1000:.1f} ms vs generated "
                 f"{baseline['wall_generate_s']:.2f} s")
    lines.append(f"re-tokenisation: {retok['differ_after_decode_encode']} of {retok['replies']} replies give other ids "
                 "after decode + encode")
    lines.append(f"\nelapsed {elapsed:.0f} s; load average at start {load_start}, at end {load_average()}")

    ratios = {"eval_generation_time_batched": evalgen["wall_batched_s"] / evalgen["wall_single_s"],
              "eval_generation_cpu_time_batched": evalgen["cpu_batched_s"] / evalgen["cpu_single_s"],
              "teacher_forward_time_batched": teacher["wall_batched_s"] / teacher["wall_single_s"],
              "update_time_fused_head": head["wall_fused_s"] / head["wall_checkpointed_s"],
              "checkpoint_save_time": ours["wall_s"] / snap["wall_s"],
              "step0_eval_time_cached_baseline": baseline["wall_cached_s"] / baseline["wall_generate_s"]}
    if ours["rss_growth_bytes"] is not None and snap["rss_growth_bytes"]:
        ratios["checkpoint_rss_growth"] = ours["rss_growth_bytes"] / snap["rss_growth_bytes"]
    return lines, rates, ratios


def detach_logs_under(folder: Path) -> None:
    """The runs' run.log handlers stay on the root logger after their main() returns (in process, as here): those
    writing into `folder`, which is about to go, are removed and closed, so that a later record in this process does not
    try to reopen a file in a deleted folder (FileNotFoundError from logging, in whatever code logs next)."""
    import logging

    root = logging.getLogger()
    for handler in [h for h in root.handlers if Path(getattr(h, "baseFilename", "/")).is_relative_to(folder)]:
        root.removeHandler(handler)
        handler.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads and torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started, load_start = time.time(), load_average()
    for line in environment_lines(args.device):
        print(line)
    print(f"model {args.model}; {args.n_interactions} interactions + 1 warm-up; eval_n {args.eval_n}; "
          f"max_new_tokens {args.max_new_tokens}; rule user ({args.style}); load average at start {load_start}",
          flush=True)
    clock = PhaseClock()
    work_dir = Path(tempfile.mkdtemp(prefix="bench_online_"))
    try:
        run, interactions, setup_wall, loop_wall = run_loop(args, work_dir / "run", clock)
        phases = loop_phases(clock, loop_wall)
        print("comparisons: eval generation batched vs one at a time ...", file=sys.stderr, flush=True)
        evalgen = compare_eval_generation(run, args)
        teacher = compare_teacher_forward(run, interactions[1:])
        head = compare_update_head(run, interactions[1:])
        checkpoint = compare_checkpoint(run, work_dir)
        baseline = compare_baseline_cache(run, clock)
        retok = retokenisation_mismatches(run, interactions)
        del run
        print(f"throughput sweep: --interactions_per_update {args.batch_sizes} ...", file=sys.stderr, flush=True)
        sweep = sweep_batch_sizes(args, work_dir)
    finally:
        detach_logs_under(work_dir)
        shutil.rmtree(work_dir, ignore_errors=True)
    elapsed = time.time() - started
    lines, rates, ratios = report(args, phases, evalgen, teacher, head, checkpoint, baseline, retok, setup_wall,
                                  elapsed, load_start)
    reference = args.batch_sizes[0]
    lines.append(f"throughput by --interactions_per_update ({args.sweep_batches} timed updates each, after one "
                 "warm-up; no evaluation):")
    per_minute = {name: result["interactions_per_minute"] for name, result in sweep.items()}
    for batch_size in args.batch_sizes:
        plain, overlapped = per_minute[f"B{batch_size}"], per_minute[f"B{batch_size}_overlap"]
        lines.append(f"  B = {batch_size}: {plain:.1f} interactions/min; with --overlap_generation {overlapped:.1f}")
        if batch_size != reference:
            ratios[f"interactions_per_minute_B{batch_size}_vs_B{reference}"] = plain / per_minute[f"B{reference}"]
        ratios[f"interactions_per_minute_overlap_vs_in_turn_B{batch_size}"] = overlapped / plain
    print("\n".join(lines))
    if args.out:
        atomic_write_json(args.out, {
            "environment": environment_lines(args.device), "args": vars(args), "threads": torch.get_num_threads(),
            "load_average_start": load_start, "load_average_end": load_average(), "elapsed_s": elapsed,
            "phases_s": phases, "rates": rates, "eval_generation": evalgen, "teacher_forward": teacher,
            "update_head": head,
            "checkpoint": checkpoint, "baseline_cache": baseline, "retokenisation": retok,
            "batch_sweep": sweep, "ratios": ratios,
        })
    for name, value in ratios.items():
        print(f"ratio {name} {value:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
