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

Parts: the folder and its resume rules are auxiliary/runtime/run_folder.py, the summary
auxiliary/evals/online_report.py, users and judges auxiliary/feedback/factory.py, W&B
auxiliary/runtime/wandb_run.py; checkpoints are OnlineSDPOUpdater's.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import signal
import threading
import sys
import time
from pathlib import Path

from auxiliary.evals.online_report import (build_summary, debug_example_text, fmt_rate, initial_baseline, mean_words,
                                           summary_text, words)
from auxiliary.feedback.schedule import StyleSchedule
from auxiliary.runtime.io_utils import DataError, atomic_write_json
from auxiliary.runtime.run_folder import RunFolder, RunFolderError, default_output_dir
from auxiliary.runtime.wandb_run import WandbRun, WandbSetupError
from online_sdpo_updater_config import OnlineRunConfig, OnlineSDPOConfig

logger = logging.getLogger("eval_online_sdpo")

ARMS = ("feedback", "placebo")
# Wall-clock fields of metrics.jsonl and eval_history.json: the only values a resumed run does not reproduce.
# Model-config dropout rates (besides nn.Dropout modules) that --arms_in_parallel refuses when above 0.
DROPOUT_SETTINGS = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop",
                    "hidden_dropout_prob", "attention_probs_dropout_prob")
TIMING_KEYS = ("time", "seconds", "gen_time_s", "sim_time_s", "train_time_s", "eval_gen_time_s", "judge_time_s")


class SetupError(RuntimeError):
    """Bad input found before the run starts; the message is the whole story."""


def derive_seed(*parts) -> int:
    """A seed that depends only on its parts (stable across processes and restarts)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


class FrozenPolicy:
    """--overlap_generation: a copy of an arm's policy that answers the next batch in a thread while the
    update changes the policy. It holds only what generation reads (the settings, its own model and
    tokenizer) and generates with OnlineSDPOUpdater.generate itself (the same settings and seeds);
    `refresh` copies the trainable weights back in before each update (the others never change: a
    LoRA run copies only its adapters, though the copy holds the whole model)."""

    def __init__(self, updater):
        import copy

        self.source, self.config = updater, updater.config
        self.model = copy.deepcopy(updater.model).requires_grad_(False).eval()
        self.tokenizer = copy.deepcopy(updater.tokenizer)  # a fast tokenizer is not safe to share between threads
        self.updates = updater.step  # how many updates the copied weights have seen
        mine, theirs = dict(self.model.named_parameters()), dict(updater.model.named_parameters())
        if mine.keys() != theirs.keys():
            raise SetupError("--overlap_generation: the policy's copy has other parameters than the policy")
        self.pairs = [(mine[name], tensor) for name, tensor in theirs.items() if tensor.requires_grad]

    def generate(self, conversations, seed):
        from online_sdpo_updater import OnlineSDPOUpdater

        return OnlineSDPOUpdater.generate(self, conversations, seed=seed)  # reads config, model, tokenizer only

    def refresh(self) -> None:
        import torch

        with torch.no_grad():
            for mine, theirs in self.pairs:
                mine.copy_(theirs)
        self.updates = self.source.step


# --------------------------------------------------------------------------- the run

class OnlineRun:
    def __init__(self, sdpo: OnlineSDPOConfig, run: OnlineRunConfig):
        self.sdpo, self.run = sdpo, run
        self.arms = list(ARMS) if run.placebo else [ARMS[0]]
        self.plan = run.user_plan(seed=sdpo.seed)  # StyleSchedule or MultiUserDraw
        self.schedule = self.plan if isinstance(self.plan, StyleSchedule) else None
        self.user_styles = self.plan.styles
        self.styles = run.styles()
        self.per_user = run.per_user_adapters
        self.batch_size = run.interactions_per_update  # interactions per update (B)
        self.updaters: dict = {}  # arm -> the shared policy's updater (per-user adapters: the first user's)
        self.adapter_updaters: dict = {}  # per-user adapters: arm -> {style: updater on that style's adapter}
        self.users: dict = {}  # arm -> {style: simulated user}
        self.judges: dict = {}
        self.relevance = None  # --relevance_model: auxiliary/feedback/relevance.RelevanceScorer
        self.metrics: list[dict] = []
        self.history: list[dict] = []
        self.eval_texts: dict[tuple, list[str]] = {}  # (step, arm, adapter) -> eval replies of this process
        self.frozen: dict = {}  # --overlap_generation: arm -> FrozenPolicy, the weights that answer the next batch
        self.answered_ahead: dict = {}  # --overlap_generation: first step of a batch -> its answers, made ahead
        self.start_step = 1
        self.wandb = WandbRun()
        self.folder = None  # the run folder: the main process's alone
        # torchrun / accelerate launch: one process per device, each its own share of every batch
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.main_process = self.rank == 0

    # ------------------------------------------------------------ setup (all bad input fails here)
    def setup(self) -> None:
        from auxiliary.feedback.personas import get_persona

        for style in self.styles:
            get_persona(style)  # UnknownStyleError lists the known styles
        run = self.run
        run.check_against(self.sdpo)
        if self.sdpo.checkpoint_every % self.batch_size:
            raise SetupError(f"--checkpoint_every {self.sdpo.checkpoint_every} must be a multiple of "
                             f"--interactions_per_update {self.batch_size} (checkpoints are taken between updates)")
        if self.per_user:
            self._check_per_user_adapters()
        if run.overlap_generation:
            self._check_overlap()
        if self.world > 1:
            self._start_processes()
        from auxiliary.evals.evaluation_helpers import require_prompt_file

        require_prompt_file(run.train_jsonl, "train_jsonl")  # before the output folder: nothing left behind
        if run.eval_n:
            require_prompt_file(run.val_jsonl, "val_jsonl")
        if run.resume and not (run.output_dir or run.run_name or os.environ.get("OUTPUT_DIR")):
            raise SetupError("--resume needs the run's --output_dir (or --run_name / $OUTPUT_DIR)")
        out = (Path(run.output_dir).expanduser() if run.output_dir else
               default_output_dir(run.run_name, self.sdpo.model, "+".join(self.user_styles)))
        self.out = out
        if self.main_process:
            self.folder = RunFolder.open(out, resume=run.resume, overwrite=run.overwrite)
            self.out = self.folder.path
            self.folder.attach_log()
            if run.resume:  # before any model loads: a changed experiment (another model, say) is one line
                self.folder.check_resume_config(self._config_parts(), run.allow_config_change)
        self._barrier()  # the others start once the folder is open (or the main process has failed)
        tokenizer, model_path = self._load_tokenizer()
        self._load_data(tokenizer)
        if self.num_steps % self.world:
            raise SetupError(f"{self.num_steps} training prompts cannot be shared evenly by {self.world} processes "
                             "(each update needs the same number of interactions on every process)")
        self._make_users_and_judges()
        self._load_policies()
        if self.parallel_arms:
            self._check_arms_in_parallel()
        if run.overlap_generation:
            self.frozen = {arm: FrozenPolicy(updater) for arm, updater in self.updaters.items()}
        if run.resume:
            self._resume()
        if self.world > 1:
            for updater in self.updaters.values():
                updater.distribute(device_ids=[updater.device.index] if updater.device.type == "cuda" else None)
        if self.main_process:
            self._load_or_make_baseline()
            WandbRun.require(run.wandb)
            self.folder.clear_earlier_results()  # --overwrite: only now, every check that can fail has passed
            self._write_config(model_path)
            self.wandb = WandbRun.start(run.wandb, self.out, run.wandb_project)

    def _start_processes(self) -> None:
        """Join the process group of a torchrun / accelerate launch (gloo on CPU, nccl on GPUs); what DDP's
        all-reduced gradient cannot reproduce exactly, or what one process alone must do, is refused first."""
        import torch
        import torch.distributed as dist

        problems = [(self.batch_size % self.world, f"--interactions_per_update a multiple of the {self.world} "
                                                   "processes (each takes an equal share of every batch)"),
                    (self.per_user, "no --per_user_adapters"), (self.sdpo.use_vllm, "generation without --use_vllm"),
                    (self.sdpo.beta > 0, "--beta 0 (its per-token mean and the loss's differ in what they average)")]
        for failed, need in problems:
            if failed:
                raise SetupError(f"{self.world} processes need {need}")
        if torch.cuda.is_available() and self.sdpo.device in ("auto", "cuda"):
            local = int(os.environ.get("LOCAL_RANK", self.rank))
            torch.cuda.set_device(local)
            self.sdpo = dataclasses.replace(self.sdpo, device=f"cuda:{local}")
        if not dist.is_initialized():
            # The others wait at a barrier through each evaluation (a large judge may take long): a generous timeout.
            dist.init_process_group("nccl" if torch.cuda.is_available() and self.sdpo.device.startswith("cuda")
                                    else "gloo", timeout=datetime.timedelta(hours=4))

    def _barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _check_per_user_adapters(self) -> None:
        problems = [(not self.sdpo.use_lora, "--use_lora (each user's adapter is a LoRA adapter)"),
                    (self.sdpo.use_vllm, "generation without --use_vllm"),
                    (self.run.save_checkpoints or self.run.resume, "a run without --save_checkpoints / --resume"),
                    (bool(self.run.eval_styles.strip()),
                     "no --eval_styles (each adapter is judged on its user's style)")]
        for failed, need in problems:
            if failed:
                raise SetupError(f"--per_user_adapters needs {need}")

    def _check_overlap(self) -> None:
        problems = [(self.world > 1, "a single process (each process's update waits for the others' all-reduce)"),
                    (self.sdpo.use_vllm, "generation without --use_vllm (the engine holds the latest weights)"),
                    (self.per_user, "no --per_user_adapters (the users' adapters share one base model)"),
                    (self.run.resume, "a run without --resume (a checkpoint holds the latest weights, not the older "
                                      "ones that answered the batch after it, so a resume would not replay the run)")]
        for failed, need in problems:
            if failed:
                raise SetupError(f"--overlap_generation needs {need}")

    @property
    def parallel_arms(self) -> bool:
        return self.run.arms_in_parallel and len(self.arms) > 1

    def _check_arms_in_parallel(self) -> None:
        """Two arms in two threads give the replies and weights of one after the other only when nothing in
        them draws from the process's one random stream: sampling does not (generation.SeededSampler), dropout
        would."""
        import torch

        if self.sdpo.use_vllm:
            raise SetupError("--arms_in_parallel needs generation without --use_vllm (each engine batches on its own)")
        if self.world > 1:  # two DDP models all-reducing from two threads would interleave their collectives
            raise SetupError(
                "--arms_in_parallel needs a single process (under torchrun each process runs its arms in turn)")
        for arm, updater in self.updaters.items():
            config = getattr(updater.model, "config", None)
            rates = [m.p for m in updater.model.modules() if isinstance(m, torch.nn.Dropout)]
            rates += [float(getattr(config, name, 0) or 0) for name in DROPOUT_SETTINGS]
            if any(rate > 0 for rate in rates):
                raise SetupError(f"--arms_in_parallel needs a model without dropout (the {arm} arm's has "
                                 f"{max(rates)}; with --use_lora set --lora_dropout 0): dropout draws from the "
                                 "process's one random stream, which two threads would share")

    def _per_arm(self, work) -> dict:
        """{arm: work(arm)}: one arm after the other, or (--arms_in_parallel) each arm in its own thread with
        its share of the torch threads; `work` must touch only its arm's policy."""
        if not self.parallel_arms:
            return {arm: work(arm) for arm in self.arms}
        from auxiliary.runtime.generation import run_side_by_side

        return dict(zip(self.arms, run_side_by_side([lambda arm=arm: work(arm) for arm in self.arms])))

    def _load_tokenizer(self):
        from auxiliary.runtime.model_loading import load_tokenizer, resolve_model_path

        model_path = resolve_model_path(self.sdpo.model)  # ModelLoadError on a missing path
        try:
            return load_tokenizer(model_path), model_path  # ModelLoadError without a chat template
        except OSError as err:
            raise SetupError(f"could not load the tokenizer of --model {self.sdpo.model}: {err}") from None

    def _load_data(self, tokenizer) -> None:
        from auxiliary.evals.evaluation_helpers import load_run_prompts

        run = self.run
        # A schedule sets the run's length: the sum of its phases.
        train_n = self.schedule.total if run.style_schedule.strip() else run.train_n
        self.train_prompts, self.eval_prompts, self.data_info = load_run_prompts(
            run.train_jsonl, train_n, run.val_jsonl, run.eval_n, self.sdpo.seed, tokenizer, run.max_prompt_tokens,
            logger)
        self.num_steps = len(self.train_prompts)

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
        if not self.main_process:
            return  # only the main process evaluates
        if run.relevance_model:
            from auxiliary.feedback.relevance import RelevanceScorer

            self.relevance = RelevanceScorer.load(run.relevance_model, self.sdpo.device)
        self.judges = factory.judges(run.judge, self.styles, model_for_kind(run.judge, run.judge_model),
                                     **judge_options(run.judge, run.judge_framing, run.judge_temperature,
                                                     run.judge_max_new_tokens, run.tie_margin),
                                     **({"relevance": self.relevance} if run.judge == "rule" else {}))

    def _load_policies(self) -> None:
        from online_sdpo_updater import OnlineSDPOUpdater

        # The run checkpoints (both arms, then a marker, then pruning); the updaters never do it on their own.
        # A decaying lr schedule spans the whole run unless --scheduler_steps says otherwise.
        updates = self.sdpo.scheduler_steps or max(1, self.num_updates * self.sdpo.train_steps_per_example)
        arm_config = dataclasses.replace(self.sdpo, checkpoint_dir=None, checkpoint_every=0, max_checkpoints=0,
                                         scheduler_steps=updates)
        import copy

        first = OnlineSDPOUpdater(arm_config)
        if self.per_user:
            # Each arm: one base model (the placebo's a copy, taken before any user adapter exists).
            models = {arm: first.model if arm == "feedback" else copy.deepcopy(first.model) for arm in self.arms}
            for arm in self.arms:
                self.adapter_updaters[arm] = self._adapter_updaters(models[arm], first.tokenizer, arm_config)
                self.updaters[arm] = self.adapter_updaters[arm][self.user_styles[0]]
            return
        self.updaters["feedback"] = first
        if self.sdpo.use_vllm:
            first.vllm_engine()  # started now: an engine that cannot start is bad input, found before any work
        if self.run.placebo:
            twin = copy.deepcopy(first.model)  # the same initial weights, without a second load
            # In two threads each arm has its own tokenizer (a fast tokenizer is not safe to share between threads).
            tokenizer = copy.deepcopy(first.tokenizer) if self.run.arms_in_parallel else first.tokenizer
            self.updaters["placebo"] = OnlineSDPOUpdater(arm_config, model=twin, tokenizer=tokenizer)

    def _adapter_updaters(self, peft_model, tokenizer, arm_config) -> dict:
        """One LoRA adapter per user on the arm's one base model (peft's named adapters: no copy of the base
        weights); each updater's optimizer holds only its adapter's parameters."""
        from online_sdpo_updater import OnlineSDPOUpdater

        template = peft_model.peft_config[peft_model.active_adapter]
        # The model arrives wrapped: the updater must not wrap it again (use_lora off for it alone).
        adapter_config = dataclasses.replace(arm_config, use_lora=False)
        updaters = {}
        for style in self.user_styles:
            peft_model.add_adapter(style, dataclasses.replace(template))
            peft_model.set_adapter(style)  # trainable: this adapter's parameters only
            updaters[style] = OnlineSDPOUpdater(adapter_config, model=peft_model, tokenizer=tokenizer)
        if "default" in peft_model.peft_config:
            peft_model.delete_adapter("default")  # the wrapping updater's own adapter: no user trains it
        return updaters

    def policy(self, arm: str, style: str):
        """The updater that answers and learns for `style`'s user: the arm's shared policy, or that user's adapter."""
        if not self.per_user:
            return self.updaters[arm]
        updater = self.adapter_updaters[arm][style]
        updater.model.set_adapter(style)
        return updater

    def _resume(self) -> None:
        found = [self.folder.resume_checkpoints(self.arms) if self.main_process else None]  # step -1: none
        if self.world > 1:
            import torch.distributed as dist

            dist.broadcast_object_list(found)  # every process loads the same checkpoint (a shared file system)
        step, paths = found[0]
        for arm, path in paths.items():
            self.updaters[arm].load_checkpoint(path)
        if self.main_process:
            if paths:
                logger.info("resuming after step %d from %s", step, self.folder.checkpoint_root)
            self.metrics, self.history = self.folder.truncate_after(step)  # what comes after is replayed
        self.start_step = max(step, 0) + 1

    def _config_parts(self) -> dict:
        from auxiliary.runtime.secrets import public_config

        return {"sdpo": public_config(self.sdpo.to_dict()), "run": public_config(dataclasses.asdict(self.run))}

    def _write_config(self, model_path: str) -> None:
        self.folder.write_config({**self._config_parts(),
                                  "resolved": {"model_path": model_path, "output_dir": str(self.out),
                                               "arms": self.arms, "styles": self.styles,
                                               "user_styles": self.user_styles, "boundaries": self.boundaries,
                                               "device": str(self.updaters["feedback"].device), **self.data_info}},
                                 resume_step=self.start_step - 1 if self.run.resume else None)

    def _load_or_make_baseline(self) -> None:
        signature = {"baseline_model": self.run.baseline_model or self.sdpo.model,
                     "eval_prompts_sha256": hashlib.sha256(json.dumps(self.eval_prompts).encode()).hexdigest(),
                     "seed": self.eval_seed, "max_new_tokens": self.run.eval_max_new_tokens,
                     "temperature": self.sdpo.temperature, "top_p": self.sdpo.top_p}
        self.baseline = self.folder.cached_baseline(signature)
        if self.baseline is not None:
            return
        if not self.eval_prompts:
            self.baseline = []
        elif self.run.baseline_model:
            from auxiliary.runtime.generation import generate_responses
            from auxiliary.runtime.model_loading import load_model_and_tokenizer

            model, tokenizer, _ = load_model_and_tokenizer(self.run.baseline_model, self.sdpo.dtype,
                                                           self.sdpo.attn_implementation, self.sdpo.device)
            replies = generate_responses(model, tokenizer, self._eval_messages(), self.run.eval_max_new_tokens,
                                         self.sdpo.temperature, self.sdpo.top_p, self.sdpo.generation_batch_size,
                                         self.sdpo.max_context_length, self.eval_seed, True, "baseline")
            del model
            self.baseline = [r.text for r in replies]
        else:
            if self.start_step > 1:
                raise SetupError(f"--resume: {self.out / 'baseline_completions.json'} is missing; "
                                 "the baseline (the initial policy) cannot be rebuilt")
            # --arms_in_parallel: the cores the two arms will share take the baseline's batches side by side
            workers = len(self.arms) if self.parallel_arms else 1
            self.baseline = [r.text for r in self._generate_eval("feedback", "baseline", workers=workers)]
        self.folder.save_baseline(signature, self.baseline)

    @property
    def boundaries(self) -> list[int]:
        """The last step of every phase but the final one (none without a schedule)."""
        return self.schedule.boundaries if self.schedule else []

    def phase_number(self, step: int) -> int:
        """1-based phase of `step` (step 0 and every step of a one-style or multi-user run: phase 1)."""
        return self.schedule.phase_at(max(step, 1)) + 1 if self.schedule else 1

    @property
    def num_updates(self) -> int:
        return -(-self.num_steps // self.batch_size)  # the last batch may be short

    @property
    def eval_seed(self) -> int:
        return derive_seed(self.sdpo.seed, "eval")

    # ------------------------------------------------------------ the loop
    def loop(self) -> None:
        from tqdm.auto import tqdm

        if self.start_step == 1 and self.main_process:
            self.evaluate(0)
        self._barrier()
        bar = tqdm(total=self.num_steps, initial=self.start_step - 1, desc="interactions", unit="step",
                   dynamic_ncols=True, disable=not self.main_process)
        try:  # closed on an interrupt too: the error line starts a line of its own
            batches = self.batches()
            for index, steps in enumerate(batches):
                records = self.interact_batch(steps, batches[index + 1] if index + 1 < len(batches) else None)
                if not self.main_process:
                    self._barrier()  # while the main process writes, evaluates and checkpoints
                    continue
                self.metrics.extend(records)
                self.folder.write_metrics(self.metrics)
                for record in records:
                    self.wandb.log({f"{arm}/{k}": v for arm in self.arms for k, v in record[arm].items()
                                    if isinstance(v, (int, float)) and not isinstance(v, bool)}, record["step"])
                first = records[-1][self.arms[0]]
                bar.update(len(steps))
                bar.set_postfix(loss=f"{first['loss']:.3g}", words=first["reply_words"], refresh=False)
                # Eval steps, phase boundaries and checkpoint steps are multiples of B (checked at setup): batch ends.
                step = steps[-1]
                if ((self.run.eval_every and step % self.run.eval_every == 0) or step == self.num_steps
                        or step in self.boundaries):
                    self.evaluate(step)
                if self.run.save_checkpoints and (step % (self.sdpo.checkpoint_every or self.batch_size) == 0
                                                  or step == self.num_steps):
                    self.checkpoint(step)
                self._barrier()
        finally:
            bar.close()
        users = list({id(u): u for u in self.users["feedback"].values()}.values())
        for name, part in [("user", u) for u in users] + [(f"judge {s}", j) for s, j in self.judges.items()]:
            stats = part.api_usage()  # one line per Claude client: requests, retries by reason, time waiting
            if stats is not None:
                logger.info("Claude API (%s): %d requests, %d retries %s, %.1f s waiting", name, stats["requests"],
                            stats["retries"], stats["retries_by_reason"], stats["wait_s"])

    def batches(self) -> list[list[int]]:
        """The steps of each update still to run: B consecutive steps from start_step (a resume starts after a
        checkpoint, taken at a batch end, so it replays the same batches); the last may be short."""
        first_steps = range(self.start_step, self.num_steps + 1, self.batch_size)
        return [list(range(start, min(start + self.batch_size, self.num_steps + 1))) for start in first_steps]

    def interact_batch(self, steps: list[int], next_steps: list[int] | None = None) -> list[dict]:
        """The interactions of `steps` (one batched generation per arm, the users' follow-ups, one update on
        them); one metrics record per step, the update's metrics shared by its rows (`update` names it).
        Several processes: each takes every world-th step of the batch; DDP's gradient is that of the union."""
        records, completions = self._interact_share(steps[self.rank::self.world], next_steps)
        if self.world > 1:
            import torch.distributed as dist

            shares = [None] * self.world
            dist.all_gather_object(shares, (records, completions))
            rows = sorted((row for share in shares for row in zip(*share)), key=lambda row: row[0]["step"])
            records, completions = [r for r, _ in rows], [c for _, c in rows]
        if self.main_process:
            for rows in completions:  # step by step, the arms in order
                for row in rows:
                    self.folder.append_completion(row)
        return records

    def _interact_share(self, steps: list[int], next_steps: list[int] | None = None
                        ) -> tuple[list[dict], list[list[dict]]]:
        """This process's interactions of a batch: (metrics records, completions rows per step).
        --overlap_generation: the batch was answered during the previous update (the first one now), and
        `next_steps` is answered during this one, by the frozen copies of the weights before it."""
        if not self.frozen:
            policies = {arm: self.policy(arm, self.plan.style_at(steps[0])) for arm in self.arms}
            answers = self._answer_share(steps, policies)
        elif steps[0] in self.answered_ahead:
            answers = self.answered_ahead.pop(steps[0])
            if isinstance(answers, BaseException):
                raise answers  # answering ahead failed: the batch before it is written, this one is not
        else:  # the run's first batch: nothing ran ahead of it
            for frozen in self.frozen.values():
                frozen.refresh()
            answers = self._answer_share(steps, self.frozen)
        prompts, conversations, styles = answers["prompts"], answers["conversations"], answers["styles"]
        answered, followups_of, sim_time = answers["answered"], answers["followups"], answers["sim_time"]
        now = time.time()
        records = [{"step": step, "time": now, "style": style, "phase": self.phase_number(step)}
                   for step, style in zip(steps, styles)]
        completions = [[] for _ in steps]
        # A row's part of the batch's phase times: the rows add up to the run's time (with --overlap_generation
        # the answering ran beside the previous update, so they add up to more).
        share = 1 / len(steps)

        def learn(arm):
            started = time.perf_counter()
            update = self.policy(arm, styles[0]).train_batch(conversations, [reply.ids for reply in answered[arm][0]],
                                                             followups_of[arm])
            return update, time.perf_counter() - started

        if self.frozen and next_steps:
            from auxiliary.runtime.generation import run_side_by_side

            for frozen in self.frozen.values():
                frozen.refresh()  # the weights before this update answer the next batch

            def answer_ahead():
                try:
                    return self._answer_share(next_steps, self.frozen)
                except Exception as err:  # raised when that batch's turn comes, after this one is written
                    return err

            learned, self.answered_ahead[next_steps[0]] = run_side_by_side(
                [lambda: self._per_arm(learn), answer_ahead])
        else:
            learned = self._per_arm(learn)
        for arm in self.arms:
            updater = self.policy(arm, styles[0])
            (replies, monitors, gen_time, generated_by), followups = answered[arm], followups_of[arm]
            update, train_time = learned[arm]
            signals = update.pop("signal_per_sequence")
            update["update"] = update.pop("step")  # the updater's count of updates: rows of one batch share it
            times = {"gen_time_s": round(share * gen_time, 4), "sim_time_s": round(share * sim_time[arm], 4),
                     "train_time_s": round(share * train_time, 4)}
            for i, (step, style, prompt, reply, followup) in enumerate(zip(steps, styles, prompts, replies, followups)):
                metrics = dict(update, generated_by_update=generated_by, followup=followup,
                               reply_tokens=len(reply.ids), reply_words=words(reply.text),
                               reply_finished=reply.finished, **times, reply_degenerate=monitors[i]["degenerate"],
                               reply_distinct_2=round(monitors[i]["distinct_2"], 4),
                               reply_entropy=monitors[i]["entropy"])
                problems = self.users["feedback"][style].problems(reply.text)  # what a rule user would complain about
                if problems is not None:
                    metrics["style_problems"] = problems
                records[i][arm] = metrics
                completions[i].append({"step": step, "phase": "train", "arm": arm, "style": style, "prompt": prompt,
                                       "completion": reply.text, "followup": followup})
                if self.run.debug_first_example and step == 1 and arm == "feedback":
                    print(debug_example_text(updater.tokenizer, conversations[i], reply, followup, signals[i],
                                             self.sdpo.hindsight_template, self.sdpo.hindsight_placement),
                          file=sys.stderr, flush=True)
        return records, completions

    def _answer_share(self, steps: list[int], policies: dict) -> dict:
        """The replies to `steps` by `policies` ({arm: its updater or FrozenPolicy}), with their collapse
        monitors and the users' follow-ups: everything of an interaction before the update."""
        from auxiliary.evals.collapse import reply_monitors
        from auxiliary.evals.evaluation_helpers import prompt_as_messages

        prompts = [self.train_prompts[step - 1] for step in steps]
        conversations = [prompt_as_messages(prompt) for prompt in prompts]
        styles = [self.plan.style_at(step) for step in steps]  # a function of the step (and seed): a resume replays it

        def answer(arm):
            policy = policies[arm]  # per-user adapters run with B = 1 (checked by the config)
            generated_by = policy.updates if isinstance(policy, FrozenPolicy) else policy.step
            started = time.perf_counter()
            # One sampling seed per batch, from its first step (B = 1: the step's own seed, as always).
            replies = policy.generate(conversations, seed=derive_seed(self.sdpo.seed, "train", steps[0]))
            generated = time.perf_counter()
            # Collapse monitors of each reply, scored by the weights that wrote it (before the update).
            monitors = [reply_monitors(policy.model, policy.tokenizer, messages, reply.text)
                        for messages, reply in zip(conversations, replies)]
            return replies, monitors, generated - started, generated_by

        answered = self._per_arm(answer)  # the policies' work may run in parallel; the users' never does
        followups_of, sim_time = {}, {}
        for arm in self.arms:
            asked = time.perf_counter()
            followups_of[arm] = self._followups(arm, steps, styles, prompts, [reply.text for reply in answered[arm][0]])
            sim_time[arm] = time.perf_counter() - asked
        return {"prompts": prompts, "conversations": conversations, "styles": styles, "answered": answered,
                "followups": followups_of, "sim_time": sim_time}

    def _followups(self, arm: str, steps: list[int], styles: list[str], prompts: list, texts: list[str]) -> list[str]:
        """Each reply's follow-up from its step's user: one call per user of the batch, whose randomness is a
        function of (seed, arm, the user's first step in the batch), so a resume replays it (B = 1: the step)."""
        followups: list = [None] * len(steps)
        for style in dict.fromkeys(styles):
            rows = [i for i, s in enumerate(styles) if s == style]
            answers = self.users[arm][style].generate_feedback(
                [prompts[i] for i in rows], [texts[i] for i in rows],
                seed=derive_seed(self.sdpo.seed, "user", arm, steps[rows[0]]))
            for i, answer in zip(rows, answers):
                followups[i] = answer
        return followups

    def _eval_messages(self) -> list[list[dict]]:
        from auxiliary.evals.evaluation_helpers import prompt_as_messages

        return [prompt_as_messages(p) for p in self.eval_prompts]

    def _generate_eval(self, arm: str, desc: str, adapter: str | None = None, workers: int = 1):
        return self.policy(arm, adapter or self.user_styles[0]).generate(
            self._eval_messages(), max_new_tokens=self.run.eval_max_new_tokens, seed=self.eval_seed, progress=True,
            desc=desc, workers=workers)

    def _eval_groups(self) -> list[tuple[str | None, list[str]]]:
        """(adapter, styles judged on its replies): the shared policy on every style, or each user's adapter
        on its user's style."""
        return [(style, [style]) for style in self.user_styles] if self.per_user else [(None, self.styles)]

    def evaluate(self, step: int) -> None:
        if not self.eval_prompts:
            return
        from auxiliary.evals.collapse import eval_monitors

        phase = self.phase_number(step)

        def replies_and_monitors(arm):
            """{adapter: (texts, generation seconds, the arm's collapse monitors on them)} of one arm."""
            found = {}
            for adapter, _ in self._eval_groups():
                started = time.perf_counter()
                if step == 0 and not self.run.baseline_model:
                    # Same initial weights (LoRA adapters start at zero) and sampling seed as the baseline: identical.
                    texts = list(self.baseline)
                else:
                    where = f"{arm}/{adapter}" if adapter else arm
                    texts = [r.text for r in self._generate_eval(arm, f"eval {where} @{step}", adapter)]
                gen_time = round(time.perf_counter() - started, 4)
                updater = self.policy(arm, adapter or self.user_styles[0])
                found[adapter] = (texts, gen_time, eval_monitors(updater.model, updater.tokenizer,
                                                                 self._eval_messages(), texts, self.baseline,
                                                                 self.relevance))
            return found

        evaluated = self._per_arm(replies_and_monitors)
        for arm in self.arms:
            for adapter, styles in self._eval_groups():
                texts, gen_time, monitors = evaluated[arm][adapter]
                self.eval_texts[(step, arm, adapter)] = texts
                tags = {"phase": phase, **({"adapter": adapter} if adapter else {}),
                        "monitors": self._monitors(step, arm, adapter, monitors)}
                for style in styles:
                    self._judge_record(step, style, arm, texts, self.baseline, "initial", gen_time, tags)
                if self.run.phase_baseline == "snapshot" and step > 0:
                    # The phase's own style against the arm's replies when the phase began (eval step 0 or the
                    # boundary before): what the phase added on top of what the policy had.
                    start = self.schedule.phases[phase - 1].first_step - 1
                    self._judge_record(step, self.schedule.phases[phase - 1].style, arm, texts,
                                       self._eval_texts_at(start, arm), "snapshot", gen_time,
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
        warnings = collapse_warnings(monitors, start or {}, text_monitors(self.baseline, self._eval_messages(),
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
                     text_monitors(self.baseline, self._eval_messages(), self.relevance)["degenerate_replies"]}
        plot_win_rates(plotted, self.out / "winrate.png",
                       title=f"{Path(self.sdpo.model).name}: win rate vs baseline ({self.run.judge} judge), +-1 SE",
                       boundaries=self.boundaries, reference=reference)

    def checkpoint(self, step: int) -> None:
        for arm in self.arms:
            self.updaters[arm].save_checkpoint(self.folder.checkpoint_path(arm, step))
        # The marker names a step only once every arm has it: a crash in between resumes from the older one.
        self.folder.write_checkpoint_marker(step, self.arms)
        for arm in self.arms:  # pruned only now, so the marker's step always survives
            self.updaters[arm].prune_checkpoints(self.folder.checkpoint_root / arm, self.sdpo.max_checkpoints)  # 0: all

    # ------------------------------------------------------------ reporting
    def summary(self) -> dict:
        """Judge the arms' final replies head to head, write summary.json, print the summary."""
        from auxiliary.evals.evaluation_helpers import win_rate_stats

        last_step = max((r["step"] for r in self.history), default=None)
        # style -> arm -> the final eval replies judged on that style (the shared policy's, or the user's adapter's)
        style_texts = {}
        if last_step is not None:
            for adapter, styles in self._eval_groups():
                for style in styles:
                    style_texts[style] = {arm: self._eval_texts_at(last_step, arm, adapter) for arm in self.arms}
        texts = style_texts.get(self.styles[0], {})
        head_to_head = {}
        for style, by_arm in style_texts.items():
            if by_arm.get("feedback") and by_arm.get("placebo"):
                # The same prompts answered by both arms, judged directly: a paired, more sensitive comparison.
                decisions = self.judges[style].compare(self.eval_prompts, by_arm["feedback"], by_arm["placebo"])
                head_to_head[style] = win_rate_stats(decisions, seed=derive_seed(self.sdpo.seed, "h2h", style))
        summary = build_summary(self.history, self.styles, last_step, self.baseline, texts, head_to_head, self.out,
                                style_texts=style_texts, phase_ends=self._phase_ends(last_step),
                                eval_prompts=self.eval_prompts, relevance=self.relevance)
        atomic_write_json(self.out / "summary.json", summary)
        print(summary_text(summary, self.history, self.arms, self.styles, self.baseline, texts, self.eval_prompts,
                           self.out), flush=True)
        self.wandb.finish(self.out / "winrate.png", {"final": summary["final"], "head_to_head": head_to_head})
        return summary

    def _phase_ends(self, last_step: int | None) -> list[dict] | None:
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

    def _eval_texts_at(self, step: int, arm: str, adapter: str | None = None) -> list[str]:
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


def _expected_errors() -> tuple[tuple, tuple]:
    """(bad input found by setup: exit 2, failures of a started run: exit 1); anything else is a bug."""
    from auxiliary.feedback.claude_client import ClaudeAuthError, ClaudeRequestError
    from auxiliary.feedback.personas import UnknownStyleError
    from auxiliary.feedback.user_simulator import EmptyFeedbackError, UnsupportedStyleError
    from auxiliary.runtime.cli import ConfigError
    from auxiliary.runtime.model_loading import ModelLoadError

    return ((SetupError, RunFolderError, WandbSetupError, DataError, ConfigError, ModelLoadError, UnknownStyleError,
             UnsupportedStyleError, ValueError, ClaudeAuthError),
             (ClaudeAuthError, ClaudeRequestError, EmptyFeedbackError))


def fail(message: str, code: int = 2, run: "OnlineRun | None" = None) -> int:
    print(f"eval_online_sdpo.py: error: {message}", file=sys.stderr, flush=True)
    folder = getattr(run, "folder", None)
    if folder is not None:
        folder.log_error(message)  # the final error goes to run.log too
        folder.close()
    return code


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
        return fail(str(err), 2, run)
    except KeyboardInterrupt:  # Ctrl-C while models load: one line, not a traceback through transformers
        stop_vllm_engines()
        return fail("interrupted during setup", 130, run)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main_thread else None  # SLURM preemption
    try:
        run.loop()
        if run.main_process:
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
        if run.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    return 0


def _resume_hint(run) -> str:
    if run.run.overlap_generation:  # refused by _check_overlap: a checkpoint lacks the weights that answered ahead
        return "a run with --overlap_generation cannot be resumed exactly; start it again"
    return "the run can be resumed: rerun with --resume"


def _terminated(signum, frame):
    raise KeyboardInterrupt("terminated (SIGTERM)")


if __name__ == "__main__":
    sys.exit(main())
