"""Online SDPO: the policy answers a prompt, a simulated user writes a follow-up, the policy learns
from it at once; periodically a style judge compares the policy with a fixed baseline.

    python eval_online_sdpo.py --model smollm2-135m-instruct --style no_lists \
        --train_jsonl data/samples/train.jsonl --val_jsonl data/samples/validation.jsonl --placebo

Flags: every field of OnlineSDPOConfig (online_sdpo_updater_config.py) and of OnlineRunConfig
below; `--config run.yaml` sets any of them (command-line flags win).

Loop, for step s = 1..train_n, one training prompt per step:
    generate a reply (sampling seed derived from (seed, s)) -> the simulated user writes the
    follow-up -> OnlineSDPOUpdater.train_batch. With --placebo a second policy from the same
    initial weights sees the same prompts and sampling seeds, but its user always answers with a
    neutral approval (--placebo_texts): what it learns is what the objective does on its own.
--interactions_per_update B: B steps per update (one batched generation seeded by the batch's first
step, B follow-ups, one train_batch); metrics.jsonl keeps one row per step, the rows of a batch sharing
the update's metrics and `update` index. Under torchrun / accelerate launch each process takes every
world-th step of a batch and trains through DDP (the gradient of the union batch); the main process
alone writes, evaluates and checkpoints (docs/online.md, "Batches and several processes").
--overlap_generation: while an update runs, a thread answers the next batch with a frozen copy of the
weights from before it (FrozenPolicy): each batch after the first is one update stale.
Evaluation at step 0, every eval_every steps, at each phase boundary and at the end: each arm
answers the eval prompts (one batched generation, the same sampling seed at every evaluation and
for the baseline) and a judge per style (the users' styles plus --eval_styles) compares each reply
with the baseline's.

Who the user is (auxiliary/feedback/schedule.py): --style (one style for the whole run),
--style_schedule concise:250,detailed:250 (a flip, or preferences one after another: the phases
set the run's length) or --users concise,no_lists (a user drawn per step, seeded); with
--per_user_adapters each user trains its own LoRA adapter on one shared base model.
--phase_baseline snapshot also judges each phase's style against the arm's own replies at the
start of that phase (cached eval replies, not a model copy).

Outputs (OUTPUT_DIR): config.json, metrics.jsonl (one line per step: the active style and phase,
per arm the metrics and gen_time_s / sim_time_s / train_time_s), eval_history.json (with
eval_gen_time_s and judge_time_s),
completions.jsonl, baseline_completions.json (cache), winrate.png, summary.json, run.log and,
with --save_checkpoints, checkpoints/<arm>/step_N plus checkpoints/latest.json.

Exact resume (--resume): every random draw is derived from (seed, step), so restarting from the
last checkpoint and dropping the records written after it replays the same run.

Parts, each feature in a home of its own: the flags and their rules online_sdpo_updater_config.py
(online_rules); auxiliary/online/: world (the processes), arms (the policies: placebo, per-user
adapters, side by side), answers (a batch's replies and follow-ups, answering ahead), records (the
metrics rows), evaluator (baseline, evaluations, summary); the folder and its resume rules
auxiliary/runtime/run_folder.py, users and judges auxiliary/feedback/factory.py, W&B
auxiliary/runtime/wandb_run.py; checkpoints are OnlineSDPOUpdater's.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from auxiliary.evals.online_report import debug_example_text
from auxiliary.online.answers import Answering
from auxiliary.online.arms import ARMS, Arms, ArmsError
from auxiliary.online.evaluator import BaselineError, Evaluator, Phases
from auxiliary.online.records import step_rows
from auxiliary.online.world import World
from auxiliary.runtime.io_utils import DataError
from auxiliary.runtime.model_loading import check_all_loadable
from auxiliary.runtime.run_folder import RunFolder, RunFolderError, default_output_dir
from auxiliary.runtime.wandb_run import WandbRun, WandbSetupError
from online_sdpo_updater_config import OnlineRunConfig, OnlineSDPOConfig, check_online_rules, models_loaded

logger = logging.getLogger("eval_online_sdpo")


class SetupError(RuntimeError):
    """Bad input found before the run starts; the message is the whole story."""


class OnlineRun:
    def __init__(self, sdpo: OnlineSDPOConfig, run: OnlineRunConfig, world: World | None = None):
        self.sdpo, self.run = sdpo, run
        self.world = world or World()  # torchrun / accelerate launch: one process per device
        self.plan = run.user_plan(seed=sdpo.seed)  # who the user is at each step: StyleSchedule or MultiUserDraw
        self.phases = Phases(self.plan)
        self.user_styles, self.styles = self.plan.styles, run.styles()
        self.arms = Arms(ARMS if run.placebo else ARMS[:1], run.arms_in_parallel, self.user_styles,
                         run.per_user_adapters)
        self.batch_size = run.interactions_per_update  # interactions per update (B)
        self.users: dict = {}  # arm -> {style: simulated user}
        self.judges: dict = {}  # style -> judge (the main process's alone)
        self.metrics: list[dict] = []
        self.start_step = 1
        self.folder = self.evaluator = None  # the main process's alone
        self.wandb = WandbRun()

    # ------------------------------------------------------------ setup (all bad input fails here)
    def setup(self) -> None:
        """The steps of a run's start in their necessary order: what can fail on the flags alone first, the
        folder before any model loads, the data before the policies (the lr schedule spans the run)."""
        check_online_rules(self.sdpo, self.run, self.world.size)
        WandbRun.require(self.run.wandb)  # before the baseline is saved: a refused --overwrite changes no file
        self._check_prompt_files()  # before the output folder: nothing left behind
        if not self.run.resume:  # the same: a model path or hub id that cannot load is one line, no folder
            check_all_loadable(models_loaded(self.sdpo, self.run))
        self.sdpo = self.world.start(self.sdpo)  # join the process group: this process's device
        self.out = self._open_folder()  # main process: create, lock, refuse a changed experiment on --resume
        if self.run.resume:  # after the refusal of a changed experiment, which names the change
            check_all_loadable(models_loaded(self.sdpo, self.run))
        self.world.barrier()  # the others start once the folder is open (or the main process has failed)
        tokenizer, model_path = self._load_tokenizer()
        self._load_data(tokenizer)
        self._make_users_and_judges()
        self._load_policies()
        self.answering = Answering(self.arms, self.users, self.train_prompts, self.plan, self.sdpo.seed,
                                   overlap=self.run.overlap_generation)
        self._resume()  # the policies' checkpoints, before DDP wraps them
        self.world.distribute(self.arms.updaters.values())
        if self.world.main:
            self.evaluator.load_or_make_baseline(resumed=self.start_step > 1)
            self.folder.clear_earlier_results()  # --overwrite: only now, every check that can fail has passed
            self._write_config(model_path)
            self.wandb = self.evaluator.wandb = WandbRun.start(self.run.wandb, self.out, self.run.wandb_project)

    def _check_prompt_files(self) -> None:
        from auxiliary.evals.evaluation_helpers import require_prompt_file

        require_prompt_file(self.run.train_jsonl, "train_jsonl")
        if self.run.eval_n:
            require_prompt_file(self.run.val_jsonl, "val_jsonl")

    def _open_folder(self) -> Path:
        run = self.run
        out = (Path(run.output_dir).expanduser() if run.output_dir else
               default_output_dir(run.run_name, self.sdpo.model, "+".join(self.user_styles)))
        if not self.world.main:
            return out
        self.folder = RunFolder.open(out, resume=run.resume, overwrite=run.overwrite)
        self.folder.attach_log()
        if run.resume:  # before any model loads: a changed experiment (another model, say) is one line
            self.folder.check_resume_config(self._config_parts(), run.allow_config_change)
        return self.folder.path

    def _load_tokenizer(self):
        from auxiliary.runtime.model_loading import load_tokenizer, resolve_model_path

        model_path = resolve_model_path(self.sdpo.model)  # ModelLoadError on a missing path
        return load_tokenizer(model_path), model_path  # ModelLoadError: no chat template, or not loadable

    def _load_data(self, tokenizer) -> None:
        from auxiliary.evals.evaluation_helpers import load_run_prompts

        run = self.run
        # A schedule sets the run's length: the sum of its phases.
        train_n = self.phases.schedule.total if run.style_schedule.strip() else run.train_n
        self.train_prompts, self.eval_prompts, self.data_info = load_run_prompts(
            run.train_jsonl, train_n, run.val_jsonl, run.eval_n, self.sdpo.seed, tokenizer, run.max_prompt_tokens,
            logger)
        self.num_steps = len(self.train_prompts)
        if self.num_steps % self.world.size:
            raise SetupError(f"{self.num_steps} training prompts cannot be shared evenly by {self.world.size} "
                             "processes (each update needs the same number of interactions on every process)")

    def _make_users_and_judges(self) -> None:
        from auxiliary.feedback.factory import FeedbackFactory, judge_options, model_for_kind, user_options

        run = self.run
        api = {"max_retries": run.api_max_retries, "timeout_s": run.api_timeout_s}  # Claude clients only
        # One factory: the judges of every style (and a user on the same model) share one loaded model.
        factory = FeedbackFactory(self.sdpo.dtype, self.sdpo.device, run.api_concurrency, api, placement=run)
        # One user per style (a schedule's phases, the users of --users); they share one loaded model / client.
        self.users["feedback"] = {style: factory.user(run.user_simulator, style,
                                                      model_for_kind(run.user_simulator, run.user_model_name_or_path),
                                                      seed=self.sdpo.seed,
                                                      **user_options(run.user_simulator, run.user_temperature))
                                  for style in self.user_styles}
        if run.placebo:  # the same schedule or draw, always answered with a neutral approval
            neutral = factory.user("neutral", self.user_styles[0], texts=run.placebo_texts, seed=self.sdpo.seed)
            self.users["placebo"] = {style: neutral for style in self.user_styles}
        if not self.world.main:
            return  # only the main process evaluates
        relevance = None  # --relevance_model: auxiliary/feedback/relevance.RelevanceScorer
        if run.relevance_model:
            from auxiliary.feedback.relevance import RelevanceScorer

            relevance = RelevanceScorer.load(run.relevance_model, self.sdpo.device)
        self.judges = factory.judges(run.judge, self.styles, model_for_kind(run.judge, run.judge_model),
                                     **judge_options(run.judge, run.judge_framing, run.judge_temperature,
                                                     run.judge_max_new_tokens, run.tie_margin),
                                     **({"relevance": relevance} if run.judge == "rule" else {}))
        self.evaluator = Evaluator(self.sdpo, run, self.arms, self.judges, self.folder, self.eval_prompts,
                                   self.phases, self.user_styles, self.styles, relevance)

    def _load_policies(self) -> None:
        # The run checkpoints (every arm, then a marker, then pruning); the updaters never do it on their own.
        # A decaying lr schedule spans the whole run unless --scheduler_steps says otherwise.
        updates = self.sdpo.scheduler_steps or max(1, self.num_updates * self.sdpo.train_steps_per_example)
        self.arms.load(dataclasses.replace(self.sdpo, checkpoint_dir=None, checkpoint_every=0, max_checkpoints=0,
                                           scheduler_steps=updates))
        if self.arms.in_parallel:
            self.arms.check_side_by_side()

    def _resume(self) -> None:
        if not self.run.resume:
            return
        # every process loads the same checkpoint (a shared file system); step -1: none
        step, paths = self.world.broadcast(self.folder.resume_checkpoints(self.arms.names) if self.world.main else None)
        self.arms.load_checkpoints(paths)
        if self.world.main:
            if paths:
                logger.info("resuming after step %d from %s", step, self.folder.checkpoint_root)
            self.metrics, self.evaluator.history = self.folder.truncate_after(step)  # what comes after is replayed
        self.start_step = max(step, 0) + 1

    def _config_parts(self) -> dict:
        from auxiliary.runtime.secrets import public_config

        return {"sdpo": public_config(self.sdpo.to_dict()), "run": public_config(dataclasses.asdict(self.run))}

    def _write_config(self, model_path: str) -> None:
        self.folder.write_config({**self._config_parts(),
                                  "resolved": {"model_path": model_path, "output_dir": str(self.out),
                                               "arms": self.arms.names, "styles": self.styles,
                                               "user_styles": self.user_styles, "boundaries": self.phases.boundaries,
                                               "device": str(self.arms.updaters["feedback"].device),
                                               **self.data_info}},
                                 resume_step=self.start_step - 1 if self.run.resume else None)

    @property
    def num_updates(self) -> int:
        return -(-self.num_steps // self.batch_size)  # the last batch may be short

    def batches(self) -> list[list[int]]:
        """The steps of each update still to run: B consecutive steps from start_step (a resume starts after a
        checkpoint, taken at a batch end, so it replays the same batches); the last may be short."""
        first_steps = range(self.start_step, self.num_steps + 1, self.batch_size)
        return [list(range(start, min(start + self.batch_size, self.num_steps + 1))) for start in first_steps]

    # ------------------------------------------------------------ the loop
    def loop(self) -> None:
        from tqdm.auto import tqdm

        main = self.world.main
        if self.start_step == 1 and main:
            self.evaluator.evaluate(0)
        self.world.barrier()
        bar = tqdm(total=self.num_steps, initial=self.start_step - 1, desc="interactions", unit="step",
                   dynamic_ncols=True, disable=not main)
        try:  # closed on an interrupt too: the error line starts a line of its own
            batches = self.batches()
            for steps, next_steps in zip(batches, batches[1:] + [None]):
                records = self.interact_batch(steps, next_steps)
                if main:  # the main process alone writes, evaluates and checkpoints; the others wait
                    self._write_metrics(records)
                    first = records[-1][self.arms.names[0]]
                    bar.update(len(steps))
                    bar.set_postfix(loss=f"{first['loss']:.3g}", words=first["reply_words"], refresh=False)
                    # Eval steps, phase boundaries and checkpoint steps are multiples of B (checked at setup).
                    step = steps[-1]
                    if ((self.run.eval_every and step % self.run.eval_every == 0) or step == self.num_steps
                            or step in self.phases.boundaries):
                        self.evaluator.evaluate(step)
                    if self.run.save_checkpoints and (step % (self.sdpo.checkpoint_every or self.batch_size) == 0
                                                      or step == self.num_steps):
                        self.arms.save_checkpoint(self.folder, step, self.sdpo.max_checkpoints)
                self.world.barrier()
        finally:
            bar.close()
        self._log_api_usage()

    def interact_batch(self, steps: list[int], next_steps: list[int] | None = None) -> list[dict]:
        """The interactions of `steps` (one batched generation per arm, the users' follow-ups, one update on
        them); one metrics record per step, the update's metrics shared by its rows (`update` names it).
        Several processes: each takes every size-th step of the batch; DDP's gradient is that of the union.
        --overlap_generation: `next_steps` is answered while this batch's update runs."""
        answers = self.answering.answers(self.world.share(steps))
        now = time.time()
        learned = self.answering.beside(lambda: self.arms.per_arm(lambda arm: self._learn(arm, answers)), next_steps)
        share = step_rows(answers, learned, self.users, self.phases.number, now,
                          self._print_example if self.run.debug_first_example else None)
        rows = sorted((row for part in self.world.gather(share) for row in zip(*part)), key=lambda r: r[0]["step"])
        if self.world.main:
            for _, completions in rows:  # step by step, the arms in order
                for row in completions:
                    self.folder.append_completion(row)
        return [record for record, _ in rows]

    def _learn(self, arm: str, answers) -> tuple[dict, float]:
        started = time.perf_counter()
        answered = answers.arms[arm]
        update = self.arms.policy(arm, answers.styles[0]).train_batch(
            answers.conversations, [reply.ids for reply in answered.replies], answered.followups)
        return update, time.perf_counter() - started

    def _write_metrics(self, records: list[dict]) -> None:
        self.metrics.extend(records)
        self.folder.write_metrics(self.metrics)
        for record in records:
            self.wandb.log({f"{arm}/{k}": v for arm in self.arms for k, v in record[arm].items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)}, record["step"])

    def _print_example(self, conversation, reply, followup, signal) -> None:
        """--debug_first_example: the first interaction in full."""
        print(debug_example_text(self.arms.updaters["feedback"].tokenizer, conversation, reply, followup, signal,
                                 self.sdpo.hindsight_template, self.sdpo.hindsight_placement), file=sys.stderr,
              flush=True)

    def _log_api_usage(self) -> None:
        users = list({id(u): u for u in self.users["feedback"].values()}.values())
        for name, part in [("user", u) for u in users] + [(f"judge {s}", j) for s, j in self.judges.items()]:
            stats = part.api_usage()  # one line per Claude client: requests, retries by reason, time waiting
            if stats is not None:
                logger.info("Claude API (%s): %d requests, %d retries %s, %.1f s waiting", name, stats["requests"],
                            stats["retries"], stats["retries_by_reason"], stats["wait_s"])

    def summary(self) -> dict:
        return self.evaluator.summary()


def _expected_errors() -> tuple[tuple, tuple]:
    """(bad input found by setup: exit 2, failures of a started run: exit 1); anything else is a bug."""
    from auxiliary.feedback.claude_client import ClaudeAuthError, ClaudeRequestError
    from auxiliary.feedback.personas import UnknownStyleError
    from auxiliary.feedback.user_simulator import EmptyFeedbackError, UnsupportedStyleError
    from auxiliary.runtime.cli import ConfigError
    from auxiliary.runtime.model_loading import ModelLoadError

    return ((SetupError, ArmsError, BaselineError, RunFolderError, WandbSetupError, DataError, ConfigError,
             ModelLoadError, UnknownStyleError, UnsupportedStyleError, ValueError, ClaudeAuthError),
             (ClaudeAuthError, ClaudeRequestError, EmptyFeedbackError))


def fail(message: str, code: int = 2, run: "OnlineRun | None" = None, in_setup: bool = False) -> int:
    """The one error line (and into run.log). A failed setup removes the output folder when this run created it
    and it holds only the run marker and run.log (RunFolder.remove_if_unstarted): nothing half-written stays."""
    from auxiliary.runtime.cli import exit_with_error

    folder = getattr(run, "folder", None)
    if folder is not None:
        folder.log_error(message)  # the final error goes to run.log too
        folder.close()
        if in_setup:
            folder.remove_if_unstarted()
    return exit_with_error(message, code, prog="eval_online_sdpo.py")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from auxiliary.runtime.cli import parse_dataclasses, stop_vllm_engines

    setup_errors, run_errors = _expected_errors()
    run = None
    try:
        sdpo, run_config = parse_dataclasses((OnlineSDPOConfig, OnlineRunConfig), argv, prog="eval_online_sdpo.py")
        run = OnlineRun(sdpo, run_config)
        run.setup()
    except setup_errors as err:
        stop_vllm_engines()
        return fail(str(err), 2, run, in_setup=True)
    except KeyboardInterrupt:  # Ctrl-C while models load: one line, not a traceback through transformers
        stop_vllm_engines()
        return fail("interrupted during setup", 130, run, in_setup=True)
    except BaseException:
        stop_vllm_engines()  # a bug during setup: no engine outlives it
        if run is not None and run.folder is not None:
            run.folder.remove_if_unstarted()
        raise
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main_thread else None  # SLURM preemption
    try:
        run.loop()
        if run.world.main:
            run.summary()
    except run_errors as err:
        return fail(f"{type(err).__name__}: {err} (completed steps are in {run.out}; {_resume_hint(run)})", 1, run)
    except OSError as err:  # a full disk while writing results or a checkpoint: the earlier checkpoint is intact
        from auxiliary.runtime.io_utils import describe_os_error

        return fail(f"{describe_os_error(err)}; completed steps are in {run.out} ({_resume_hint(run)})", 1, run)
    except KeyboardInterrupt as interrupt:
        return fail(f"{interrupt.args[0] if interrupt.args else 'interrupted'}; completed steps are in {run.out} "
                    f"({_resume_hint(run)})", 143 if interrupt.args else 130, run)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        stop_vllm_engines()  # the policy's and the user's/judge's: their processes would outlive the run
        if run.folder is not None:
            run.folder.close()
        run.world.close()
    return 0


def _resume_hint(run) -> str:
    if run.run.overlap_generation:  # refused by online_rules: a checkpoint lacks the weights that answered ahead
        return "a run with --overlap_generation cannot be resumed exactly; start it again"
    return "the run can be resumed: rerun with --resume"


def _terminated(signum, frame):
    raise KeyboardInterrupt("terminated (SIGTERM)")


if __name__ == "__main__":
    sys.exit(main())
