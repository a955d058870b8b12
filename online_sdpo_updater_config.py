"""The online configs: every field is a CLI flag (`--field value`) and a YAML key (`--config f.yaml`).

OnlineSDPOConfig is the updater's (online_sdpo_updater.py); OnlineRunConfig is the online job's
(eval_online_sdpo.py: data, simulated user and judge, evaluation, the run folder).

The shared settings come from the option groups (sdpo_objective.ObjectiveOptions and
auxiliary/runtime/option_groups.py); this class adds the online trainer's own.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Optional

from auxiliary.runtime.option_groups import (ContextOptions, FeedbackPlacementOptions, GenerationOptions,
                                             JudgeOptions, LoraOptions,
                                             ModelOptions, OptimizerOptions, VLLMEngineOptions, accept_field_aliases,
                                             check_ranges)
from sdpo_objective import ObjectiveOptions


LR_SCHEDULERS = ("constant", "cosine", "linear")


@accept_field_aliases
@dataclass
class OnlineSDPOConfig(VLLMEngineOptions, LoraOptions, GenerationOptions, OptimizerOptions, ContextOptions,
                       ObjectiveOptions, ModelOptions):
    # dataclass fields follow the bases from the last one: model, objective, context, optimiser, generation, LoRA
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1 ..."})
    train_steps_per_example: int = field(default=1, metadata={
        "help": "gradient steps per interaction (signal recomputed each step)"})
    # learning-rate schedule (transformers' schedulers, stepped once per update)
    lr_scheduler: str = field(default="constant", metadata={
        "help": "constant, cosine or linear (decay to 0 over scheduler_steps), after warmup_steps of linear warm-up",
        "aliases": ["--lr_scheduler_type"]})
    warmup_steps: int = field(default=0, metadata={
        "help": "updates of linear warm-up from 0 to lr (the first update runs at lr 0 when > 0, as in transformers)"})
    scheduler_steps: Optional[int] = field(default=None, metadata={
        "help": "updates over which cosine/linear decay (default in eval_online_sdpo.py: interactions x "
                "train_steps_per_example)"})
    # checkpoints
    checkpoint_dir: Optional[str] = field(default=None, metadata={"help": "where step_N checkpoints go"})
    checkpoint_every: int = field(default=0, metadata={"help": "save every N updates (0 = only when asked)"})
    max_checkpoints: int = field(default=2, metadata={"help": "newest checkpoints kept (0 = all)"})
    # misc
    seed: int = field(default=1234, metadata={"help": "random seed"})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "share of GPU memory vLLM may take"})
    vllm_enable_sleep_mode: bool = field(default=False, metadata={
        "help": "policy's vLLM engine sleeps during each update (weights to CPU, KV cache freed) and wakes for the "
                "next generation"})

    def __post_init__(self):
        super().__post_init__()  # the objective group validates its options
        check_ranges(self)  # every numeric flag in its range, before anything is loaded or written
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"--lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        if self.scheduler_steps and self.lr_scheduler != "constant" and self.warmup_steps >= self.scheduler_steps:
            raise ValueError(
                f"--warmup_steps {self.warmup_steps} must be below --scheduler_steps {self.scheduler_steps}")

    def objective_options(self) -> ObjectiveOptions:
        return ObjectiveOptions.from_config(self)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class OnlineRunConfig(JudgeOptions, FeedbackPlacementOptions):
    # data
    train_jsonl: str = field(default="data/helpsteer_prompts/train.jsonl",
                             metadata={"help": "training prompts (JSONL with `prompt` or `messages`)"})
    val_jsonl: str = field(default="data/helpsteer_prompts/validation.jsonl",
                           metadata={"help": "held-out evaluation prompts"})
    train_n: int = field(default=15, metadata={"help": "training prompts = interactions (clamped to the data)"})
    interactions_per_update: int = field(default=1, metadata={
        "help": "B: B prompts answered in one batched generation, B follow-ups, one update on the B interactions "
                "(1: the paper's one update per interaction); eval_every, checkpoint_every and schedule phases must be "
                "multiples of B"})
    eval_n: int = field(default=100, metadata={"help": "evaluation prompts (clamped to the data)"})
    max_prompt_tokens: Optional[int] = field(default=1024, metadata={
        "help": "drop (and count) prompts whose chat-templated length exceeds this"})
    # user and judge
    style: str = field(default="no_emojis", metadata={"help": "the simulated user's style (persona)"})
    style_schedule: str = field(default="", metadata={
        "help": "STYLE:N[,STYLE:N...]: the user follows each style for N interactions in turn (a flip, sequential "
                "preferences); sets the run's length and replaces --style"})
    users: str = field(default="", metadata={
        "help": "STYLE,STYLE,...: several simulated users at once, the user of each interaction drawn at random "
                "(seeded)"})
    per_user_adapters: bool = field(default=False, metadata={
        "help": "with --users and --use_lora: each user trains its own LoRA adapter on one shared base model"})
    phase_baseline: str = field(default="initial", metadata={
        "help": "initial (the initial policy for every style) or snapshot (also: each phase's style against the "
                "policy's replies at the start of that phase)"})
    eval_styles: str = field(default="", metadata={"help": "more styles to evaluate on (space or comma separated)"})
    user_simulator: str = field(default="rule", metadata={"help": "rule, local, claude or vllm"})
    user_model_name_or_path: str = field(default="Qwen/Qwen3-32B", metadata={
        "help": "model of a local/vllm user; for --user_simulator claude a claude-* id (else the default Claude)"})
    user_vllm: bool = field(default=False, metadata={
        "help": "the paper repository's spelling of --user_simulator vllm"})
    judge: str = field(default="rule", metadata={"help": "rule, local, claude or vllm"})
    judge_model: str = field(default="Qwen/Qwen3-32B", metadata={
        "help": "model of a local/vllm judge; for --judge claude a claude-* id (else the default Claude)"})
    judge_local: bool = field(default=False, metadata={"help": "the paper repository's spelling of --judge local"})
    user_temperature: Optional[float] = field(default=None, metadata={
        "help": "user decoding temperature (default: 0 = greedy for Claude and vLLM users, 0.7 for local ones, as the "
                "paper's)"})
    api_concurrency: int = field(default=8, metadata={"help": "Claude requests in flight at most"})
    api_max_retries: int = field(default=8, metadata={
        "help": "Claude: retries of a request on 429/408/5xx/timeouts/connection errors, then the run stops"})
    api_timeout_s: float = field(default=60.0, metadata={"help": "Claude: seconds to wait for one answer"})
    placebo: bool = field(default=False, metadata={"help": "also train a placebo arm whose user is always neutral"})
    arms_in_parallel: bool = field(default=False, metadata={
        "help": "with --placebo: each arm generates, is scored and is updated in a thread of its own, with half the "
                "torch threads (CPU: about half the wall time; the same replies and weights as one arm after the "
                "other; the users still answer one at a time); needs a model without dropout"})
    overlap_generation: bool = field(default=False, metadata={
        "help": "answer the next batch (replies, collapse monitors, follow-ups) in a thread while the update runs, "
                "with a frozen copy of each arm's policy taken before that update: every batch after the first is "
                "answered by weights one update older (as asynchronous RL trainers do; `generated_by_update` in "
                "metrics.jsonl says which); one more copy of the model per arm; a single process, without "
                "--use_vllm, --per_user_adapters or --resume"})
    placebo_texts: list[str] = field(default_factory=lambda: ["OK, thanks."], metadata={
        "help": "the placebo user's follow-ups (one is drawn per step)"})
    # evaluation
    baseline_model: Optional[str] = field(default=None, metadata={
        "help": "model whose replies the policy is compared with (default: the initial policy)"})
    eval_every: int = field(default=3, metadata={"help": "evaluate every N interactions (0: only at start and end)"})
    eval_max_new_tokens: int = field(default=512, metadata={"help": "reply length limit at evaluation"})
    relevance_model: str = field(default="", metadata={
        "help": "a small chat model (smollm2-135m-instruct, as make demo) that scores whether an eval reply takes up "
                "its request (auxiliary/feedback/relevance.py); one that ignores it counts as degenerate in the "
                "collapse monitors and loses to a sound reply for the rule judge; empty: off"})
    # run
    save_checkpoints: bool = field(default=False, metadata={
        "help": "checkpoint both arms every `checkpoint_every` steps (0: every step) and at the end"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --output_dir from its last checkpoint"})
    allow_config_change: bool = field(default=False, metadata={
        "help": "--resume with settings that change the experiment (recorded in config.json's history); else refused"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace an earlier run of ours in --output_dir (its results go once every check has passed)"})
    output_dir: Optional[str] = field(default=None, metadata={
        "help": "default: $OUTPUT_DIR, else ${BASE_WORK:-${SCRATCH:-${TMPDIR:-/tmp}}}/sdpo_runs/<run_name>"})
    run_name: Optional[str] = field(default=None, metadata={"help": "default: online-<model>-<style>-<time>"})
    wandb: bool = field(default=False, metadata={"help": "log to Weights & Biases (WANDB_MODE=offline works)"})
    wandb_project: str = field(default="sdpo-online", metadata={"help": "W&B project (or $WANDB_PROJECT)"})
    debug_first_example: bool = field(default=False, metadata={
        "help": "print the first interaction in full: contexts x and xo, reply, follow-up, per-token signal"})

    def __post_init__(self):
        if self.user_vllm:
            self.user_simulator = "vllm"
        if self.judge_local and self.judge == "rule":
            self.judge = "local"
        for name, value in (("user_simulator", self.user_simulator), ("judge", self.judge)):
            if value not in ("rule", "local", "claude", "vllm"):
                raise ValueError(f"--{name} must be rule, local, claude or vllm, got {value!r}")
        self.check_judge_options()
        check_ranges(self)
        self.user_plan(seed=0)  # a malformed schedule or user list is one line, before anything is loaded
        from auxiliary.feedback.personas import get_persona

        for style in self.styles():  # --style and --eval_styles too
            get_persona(style)  # UnknownStyleError lists the known styles
        if self.phase_baseline not in ("initial", "snapshot"):
            raise ValueError(f"--phase_baseline must be initial or snapshot, got {self.phase_baseline!r}")
        if not self.placebo_texts or not all(t.strip() for t in self.placebo_texts):
            raise ValueError("--placebo_texts needs at least one non-empty text")

    def user_plan(self, seed: int):
        """Who the user is at each step: a StyleSchedule (--style, --style_schedule) or a MultiUserDraw (--users)."""
        from auxiliary.feedback.schedule import MultiUserDraw, StyleSchedule

        if self.users.strip():
            return MultiUserDraw(self.users.replace(" ", ",").split(","), seed=seed)
        if self.style_schedule.strip():
            return StyleSchedule.parse(self.style_schedule)
        return StyleSchedule.single(self.style, self.train_n)

    def user_styles(self) -> list[str]:
        """The styles the simulated users follow (--style alone: just it)."""
        return self.user_plan(seed=0).styles

    def styles(self) -> list[str]:
        """Every style evaluated: the users' styles (all phases of a schedule, the ones to come too), then
        --eval_styles."""
        extra = [s for s in self.eval_styles.replace(",", " ").split() if s]
        first = self.user_styles()
        return first + [s for s in dict.fromkeys(extra) if s not in first]


def online_rules(sdpo: OnlineSDPOConfig, run: OnlineRunConfig, processes: int = 1) -> list[tuple[object, str]]:
    """Every rule between the flags of an online run (and its number of processes), one line each, in the
    order checked: (broken, the message). Ranges are option_groups.RANGES'; what needs the data or the
    model (an even share of the prompts, a model without dropout) is checked where they load."""
    b, per_user, overlap, parallel = run.interactions_per_update, run.per_user_adapters, run.overlap_generation, \
        run.arms_in_parallel and run.placebo
    phases = getattr(run.user_plan(seed=0), "phases", [])
    # The last phase may end with a short batch; every other phase ends where an update (and an evaluation) does.
    uneven = [p for p in phases[:-1] if p.interactions % b] if run.style_schedule.strip() else []
    contrast = sdpo.contrast_followup.strip()
    return [
        (uneven, f"--style_schedule: every phase but the last must be a multiple of --interactions_per_update {b} "
                 f"(a phase ends between updates); {uneven[0].style}:{uneven[0].interactions} is not"
         if uneven else ""),
        (run.style_schedule.strip() and run.users.strip(),
         "--style_schedule and --users are exclusive: one user whose style changes, or several users"),
        # A batch draws several users, each with its own adapter: one update on it has no single set of weights.
        (per_user and b > 1, "--per_user_adapters needs --interactions_per_update 1 (one user's adapter per update)"),
        (run.eval_every % b, f"--eval_every {run.eval_every} must be a multiple of --interactions_per_update {b} "
                             "(evaluations fall between updates)"),
        (per_user and not run.users.strip(), "--per_user_adapters needs --users (one adapter per simulated user)"),
        (run.phase_baseline == "snapshot" and not run.style_schedule.strip(),
         "--phase_baseline snapshot needs --style_schedule (a snapshot is taken at each phase start)"),
        (sdpo.checkpoint_every % b, f"--checkpoint_every {sdpo.checkpoint_every} must be a multiple of "
                                    f"--interactions_per_update {b} (checkpoints are taken between updates)"),
        (per_user and not sdpo.use_lora,
         "--per_user_adapters needs --use_lora (each user's adapter is a LoRA adapter)"),
        (per_user and sdpo.use_vllm, "--per_user_adapters needs generation without --use_vllm"),
        (per_user and (run.save_checkpoints or run.resume),
         "--per_user_adapters needs a run without --save_checkpoints / --resume"),
        (per_user and run.eval_styles.strip(),
         "--per_user_adapters needs no --eval_styles (each adapter is judged on its user's style)"),
        (overlap and processes > 1, "--overlap_generation needs a single process (each process's update waits for "
                                    "the others' all-reduce)"),
        (overlap and sdpo.use_vllm,
         "--overlap_generation needs generation without --use_vllm (the engine holds the latest weights)"),
        (overlap and per_user,
         "--overlap_generation needs no --per_user_adapters (the users' adapters share one base model)"),
        (overlap and run.resume, "--overlap_generation needs a run without --resume (a checkpoint holds the latest "
                                 "weights, not the older ones that answered the batch after it, so a resume would "
                                 "not replay the run)"),
        (processes > 1 and b % processes, f"{processes} processes need --interactions_per_update a multiple of the "
                                          f"{processes} processes (each takes an equal share of every batch)"),
        (processes > 1 and per_user, f"{processes} processes need no --per_user_adapters"),
        (processes > 1 and sdpo.use_vllm, f"{processes} processes need generation without --use_vllm"),
        (processes > 1 and sdpo.beta > 0, f"{processes} processes need --beta 0 (its per-token mean and the loss's "
                                          "differ in what they average)"),
        # A placebo follow-up equal to the contrast text scores y under the same context twice: its signal is
        # identically zero and the control would show nothing of what the objective does on its own.
        (run.placebo and contrast and any(text.strip() == contrast for text in run.placebo_texts),
         f"--placebo_texts holds the --contrast_followup text {contrast!r}: the placebo's signal would be identically "
         "zero; give the placebo other neutral replies (or another contrast text)"),
        (run.resume and not (run.output_dir or run.run_name or os.environ.get("OUTPUT_DIR")),
         "--resume needs the run's --output_dir (or --run_name / $OUTPUT_DIR)"),
        (parallel and sdpo.use_vllm,
         "--arms_in_parallel needs generation without --use_vllm (each engine batches on its own)"),
        # two DDP models all-reducing from two threads would interleave their collectives
        (parallel and processes > 1,
         "--arms_in_parallel needs a single process (under torchrun each process runs its arms in turn)"),
    ]


def models_loaded(sdpo: OnlineSDPOConfig, run: OnlineRunConfig) -> list:
    """Every model an online run loads (None where a role loads none): the policy, a --ref_model with --beta > 0, a
    local or vLLM user or judge, the relevance model."""
    return [sdpo.model, sdpo.ref_model if sdpo.beta > 0 else None, run.relevance_model,
            run.user_model_name_or_path if run.user_simulator in ("local", "vllm") else None,
            run.judge_model if run.judge in ("local", "vllm") else None]


def check_online_rules(sdpo: OnlineSDPOConfig, run: OnlineRunConfig, processes: int = 1) -> None:
    """ValueError with the first broken rule of online_rules."""
    for broken, message in online_rules(sdpo, run, processes):
        if broken:
            raise ValueError(message)
