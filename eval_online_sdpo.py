"""Online SDPO: the policy answers a prompt, a simulated user writes a follow-up, the policy learns
from it at once; periodically a style judge compares the policy with a fixed baseline.

    python eval_online_sdpo.py --model smollm2-135m-instruct --style no_lists \
        --train_jsonl data/samples/train.jsonl --val_jsonl data/samples/validation.jsonl --placebo

Flags: every field of OnlineSDPOConfig (online_sdpo_updater_config.py) and of OnlineRunConfig
below; `--config run.yaml` sets any of them (command-line flags win).

Loop, for step s = 1..train_n, one training prompt per step:
    generate a reply (sampling seed derived from (seed, s)) -> the simulated user writes the
    follow-up -> OnlineSDPOUpdater.train_step. With --placebo a second policy from the same
    initial weights sees the same prompts and sampling seeds, but its user always answers with a
    neutral approval (--placebo_texts): what it learns is what the objective does on its own.
Evaluation at step 0, every eval_every steps and at the end: each arm answers the eval prompts
(one batched generation, the same sampling seed at every evaluation and for the baseline) and
a judge per style (primary --style plus --eval_styles) compares each reply with the baseline's.

Outputs (OUTPUT_DIR): config.json, metrics.jsonl (one line per step), eval_history.json,
completions.jsonl, baseline_completions.json (cache), winrate.png, summary.json, run.log and,
with --save_checkpoints, checkpoints/<arm>/step_N plus checkpoints/latest.json.

Exact resume (--resume): every random draw is derived from (seed, step), so restarting from the
last checkpoint and dropping the records written after it replays the same run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from auxiliary.runtime.io_utils import DataError, append_jsonl, atomic_write_json, atomic_write_jsonl, atomic_write_text
from online_sdpo_updater_config import OnlineSDPOConfig

logger = logging.getLogger("eval_online_sdpo")

REPO_ROOT = Path(__file__).resolve().parent
ARMS = ("feedback", "placebo")
RESULT_FILES = ("config.json", "metrics.jsonl", "eval_history.json", "completions.jsonl", "winrate.png",
                "summary.json", "baseline_completions.json", "run.log")


@dataclass
class OnlineRunConfig:
    # data
    train_jsonl: str = field(default="data/helpsteer_prompts/train.jsonl",
                             metadata={"help": "training prompts (JSONL with `prompt` or `messages`)"})
    val_jsonl: str = field(default="data/helpsteer_prompts/validation.jsonl",
                           metadata={"help": "held-out evaluation prompts"})
    train_n: int = field(default=15, metadata={"help": "training prompts = interactions (clamped to the data)"})
    eval_n: int = field(default=100, metadata={"help": "evaluation prompts (clamped to the data)"})
    max_prompt_tokens: Optional[int] = field(default=1024, metadata={
        "help": "drop (and count) prompts whose chat-templated length exceeds this"})
    # user and judge
    style: str = field(default="no_emojis", metadata={"help": "the simulated user's style (persona)"})
    eval_styles: str = field(default="", metadata={"help": "more styles to evaluate on (space or comma separated)"})
    user_simulator: str = field(default="rule", metadata={"help": "rule, local, claude or vllm"})
    user_model_name_or_path: str = field(default="Qwen/Qwen3-32B", metadata={
        "help": "model of a local/vllm user; for --user_simulator claude a claude-* id (else the default Claude)"})
    user_vllm: bool = field(default=False, metadata={"help": "seed spelling of --user_simulator vllm"})
    judge: str = field(default="rule", metadata={"help": "rule, local, claude or vllm"})
    judge_model: str = field(default="Qwen/Qwen3-32B", metadata={
        "help": "model of a local/vllm judge; for --judge claude a claude-* id (else the default Claude)"})
    judge_local: bool = field(default=False, metadata={"help": "seed spelling of --judge local"})
    api_concurrency: int = field(default=8, metadata={"help": "Claude requests in flight at most"})
    api_max_retries: int = field(default=8, metadata={
        "help": "Claude: retries of a request on 429/408/5xx/timeouts/connection errors, then the run stops"})
    api_timeout_s: float = field(default=60.0, metadata={"help": "Claude: seconds to wait for one answer"})
    placebo: bool = field(default=False, metadata={"help": "also train a placebo arm whose user is always neutral"})
    placebo_texts: list[str] = field(default_factory=lambda: ["OK, thanks."], metadata={
        "help": "the placebo user's follow-ups (one is drawn per step)"})
    # evaluation
    baseline_model: Optional[str] = field(default=None, metadata={
        "help": "model whose replies the policy is compared with (default: the initial policy)"})
    eval_every: int = field(default=3, metadata={"help": "evaluate every N interactions (0: only at start and end)"})
    eval_max_new_tokens: int = field(default=512, metadata={"help": "reply length limit at evaluation"})
    # run
    save_checkpoints: bool = field(default=False, metadata={
        "help": "checkpoint both arms every `checkpoint_every` steps (0: every step) and at the end"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --output_dir from its last checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "delete earlier results in --output_dir first"})
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
        for name in ("train_n", "eval_n", "eval_every", "eval_max_new_tokens", "api_max_retries"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0")
        if self.api_concurrency < 1 or self.api_timeout_s <= 0:
            raise ValueError("--api_concurrency must be >= 1 and --api_timeout_s > 0")
        if not self.placebo_texts or not all(t.strip() for t in self.placebo_texts):
            raise ValueError("--placebo_texts needs at least one non-empty text")

    def styles(self) -> list[str]:
        extra = [s for s in self.eval_styles.replace(",", " ").split() if s]
        return [self.style] + [s for s in dict.fromkeys(extra) if s != self.style]


class SetupError(RuntimeError):
    """Bad input found before the run starts; the message is the whole story."""


def derive_seed(*parts) -> int:
    """A seed that depends only on its parts (stable across processes and restarts)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def default_output_dir(run: OnlineRunConfig, model: str) -> Path:
    if os.environ.get("OUTPUT_DIR"):
        return Path(os.environ["OUTPUT_DIR"])
    base = os.environ.get("BASE_WORK") or os.environ.get("SCRATCH") or os.environ.get("TMPDIR") or "/tmp"
    name = run.run_name or f"online-{Path(model.rstrip('/')).name}-{run.style}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(base) / "sdpo_runs" / name


def find_data_file(path: str) -> Path:
    """As given, else relative to the repository (so the defaults work from any directory)."""
    candidate = Path(path).expanduser()
    if candidate.exists() or candidate.is_absolute():
        return candidate
    in_repo = REPO_ROOT / path
    return in_repo if in_repo.exists() else candidate


def words(text: str) -> int:
    return sum(1 for token in text.split() if any(ch.isalnum() for ch in token))


# --------------------------------------------------------------------------- the run

class OnlineRun:
    def __init__(self, sdpo: OnlineSDPOConfig, run: OnlineRunConfig):
        self.sdpo, self.run = sdpo, run
        self.arms = list(ARMS) if run.placebo else [ARMS[0]]
        self.styles = run.styles()
        self.updaters: dict = {}
        self.users: dict = {}
        self.judges: dict = {}
        self.metrics: list[dict] = []
        self.history: list[dict] = []
        self.eval_texts: dict[tuple[int, str], list[str]] = {}
        self.start_step = 1
        self.wandb_run = None

    # ------------------------------------------------------------ setup (all bad input fails here)
    def setup(self) -> None:
        from auxiliary.feedback.personas import get_persona

        for style in self.styles:
            get_persona(style)  # UnknownStyleError lists the known styles
        self._prepare_output_dir()
        self._attach_log_file()
        tokenizer, model_path = self._load_tokenizer()
        self._load_data(tokenizer)
        self._make_users_and_judges()
        self._load_policies(tokenizer)
        if self.run.resume:
            self._resume()
        self._write_config(model_path)
        self._load_or_make_baseline()
        if self.run.wandb:
            self._init_wandb()

    def _prepare_output_dir(self) -> None:
        run = self.run
        if run.resume and not (run.output_dir or run.run_name or os.environ.get("OUTPUT_DIR")):
            raise SetupError("--resume needs the run's --output_dir (or --run_name / $OUTPUT_DIR)")
        out = Path(run.output_dir).expanduser() if run.output_dir else default_output_dir(run, self.sdpo.model)
        self.out = out.resolve()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / f".write_test.{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise SetupError(f"output dir {self.out} is not writable: {err.strerror or err}") from None
        has_results = (self.out / "metrics.jsonl").exists() or (self.out / "eval_history.json").exists()
        if run.overwrite:
            for name in RESULT_FILES:
                (self.out / name).unlink(missing_ok=True)
            shutil.rmtree(self.out / "checkpoints", ignore_errors=True)
            shutil.rmtree(self.out / "wandb", ignore_errors=True)
        elif has_results and not run.resume:
            raise SetupError(f"{self.out} already holds a run; pass --resume to continue it or --overwrite to replace it")
        self.checkpoint_root = self.out / "checkpoints"

    def _attach_log_file(self) -> None:
        root = logging.getLogger()
        for earlier in [h for h in root.handlers if getattr(h, "is_sdpo_run_log", False)]:
            root.removeHandler(earlier)  # an earlier run in this process (main() called twice) logs no more
            earlier.close()
        handler = logging.FileHandler(self.out / "run.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.is_sdpo_run_log = True
        root.addHandler(handler)
        logger.info("output dir: %s", self.out)

    def _load_tokenizer(self):
        from auxiliary.runtime.model_loading import load_tokenizer, resolve_model_path

        model_path = resolve_model_path(self.sdpo.model)  # ModelLoadError on a missing path
        try:
            return load_tokenizer(model_path), model_path  # ModelLoadError without a chat template
        except OSError as err:
            raise SetupError(f"could not load the tokenizer of --model {self.sdpo.model}: {err}") from None

    def _load_data(self, tokenizer) -> None:
        from auxiliary.evals.evaluation_helpers import load_prompts

        run, limit = self.run, self.run.max_prompt_tokens
        self.train_prompts, dropped_train = load_prompts(find_data_file(run.train_jsonl), n=run.train_n,
                                                         seed=self.sdpo.seed, tokenizer=tokenizer, max_prompt_tokens=limit)
        self.eval_prompts, dropped_eval = (([], 0) if run.eval_n == 0 else
                                           load_prompts(find_data_file(run.val_jsonl), n=run.eval_n,
                                                        seed=self.sdpo.seed + 1, tokenizer=tokenizer,
                                                        max_prompt_tokens=limit))
        self.data_info = {"train_prompts": len(self.train_prompts), "eval_prompts": len(self.eval_prompts),
                          "dropped_train_over_max_prompt_tokens": dropped_train,
                          "dropped_eval_over_max_prompt_tokens": dropped_eval}
        for path, asked, kept, dropped in ((run.train_jsonl, run.train_n, self.train_prompts, dropped_train),
                                           (run.val_jsonl, run.eval_n, self.eval_prompts, dropped_eval)):
            if asked and not kept:  # else a run of zero steps would look like a success
                raise SetupError(f"{path}: all {dropped} prompts are longer than --max_prompt_tokens {limit}")
        for name, asked, got in (("train_n", run.train_n, len(self.train_prompts)),
                                 ("eval_n", run.eval_n, len(self.eval_prompts))):
            if got < asked:
                logger.warning("--%s %d is more than the usable data: clamped to %d", name, asked, got)
        if dropped_train or dropped_eval:
            logger.warning("dropped prompts over max_prompt_tokens=%s: %d train, %d eval", limit, dropped_train,
                           dropped_eval)
        self.num_steps = len(self.train_prompts)

    def _make_users_and_judges(self) -> None:
        from auxiliary.feedback.factory import FeedbackFactory
        from auxiliary.feedback.user_simulator import NeutralUserSimulator

        run = self.run
        api = {"max_retries": run.api_max_retries, "timeout_s": run.api_timeout_s}  # Claude clients only
        # One factory: the judges of every style (and a user on the same model) share one loaded model.
        self.feedback_factory = FeedbackFactory(self.sdpo.dtype, self.sdpo.device, run.api_concurrency, api)
        self.users["feedback"] = self.feedback_factory.user(
            run.user_simulator, run.style, _model_for(run.user_simulator, run.user_model_name_or_path),
            seed=self.sdpo.seed)
        if run.placebo:
            self.users["placebo"] = NeutralUserSimulator(texts=run.placebo_texts, seed=self.sdpo.seed)
        self.judges = self.feedback_factory.judges(run.judge, self.styles, _model_for(run.judge, run.judge_model))

    def _load_policies(self, tokenizer) -> None:
        from online_sdpo_updater import OnlineSDPOUpdater

        # Checkpoints are written by this script (both arms, then a marker), never by the updater itself.
        arm_config = dataclasses.replace(self.sdpo, checkpoint_dir=None, checkpoint_every=0, max_checkpoints=0)
        first = OnlineSDPOUpdater(arm_config)
        self.updaters["feedback"] = first
        if self.run.placebo:
            import copy

            twin = copy.deepcopy(first.model)  # the same initial weights, without a second load
            self.updaters["placebo"] = OnlineSDPOUpdater(arm_config, model=twin, tokenizer=first.tokenizer)

    # ------------------------------------------------------------ resume
    def _resume(self) -> None:
        from auxiliary.runtime.io_utils import read_jsonl

        marker = self.checkpoint_root / "latest.json"
        step = -1  # no checkpoint: replay from the very start, step-0 evaluation included
        if marker.exists():
            step = int(json.loads(marker.read_text())["step"])
            for arm in self.arms:
                path = self.checkpoint_root / arm / f"step_{step:06d}"
                if not path.exists():
                    raise SetupError(f"--resume: {path} is missing (the run had arms {self.arms}?)")
                self.updaters[arm].load_checkpoint(path)
            logger.info("resuming after step %d from %s", step, self.checkpoint_root)
        else:
            logger.warning("--resume: no checkpoint in %s, starting again from step 0 (baseline cache kept)",
                           self.checkpoint_root)
        # Everything written after the checkpoint is replayed, so it is dropped first.
        if (self.out / "metrics.jsonl").exists():
            self.metrics = [r for r in read_jsonl(self.out / "metrics.jsonl") if r["step"] <= step]
        if (self.out / "eval_history.json").exists():
            self.history = [r for r in json.loads((self.out / "eval_history.json").read_text()) if r["step"] <= step]
        atomic_write_jsonl(self.out / "metrics.jsonl", self.metrics)
        atomic_write_json(self.out / "eval_history.json", self.history)
        completions = _read_jsonl_tolerant(self.out / "completions.jsonl")
        atomic_write_jsonl(self.out / "completions.jsonl", [r for r in completions if r["step"] <= step])
        self.start_step = max(step, 0) + 1

    # ------------------------------------------------------------ config, baseline, wandb
    def _write_config(self, model_path: str) -> None:
        from auxiliary.runtime.secrets import public_config

        config = {"sdpo": public_config(self.sdpo.to_dict()), "run": public_config(dataclasses.asdict(self.run)),
                  "resolved": {"model_path": model_path, "output_dir": str(self.out), "arms": self.arms,
                               "styles": self.styles, "device": str(self.updaters["feedback"].device),
                               **self.data_info}}
        previous = self.out / "config.json"
        if self.run.resume and previous.exists():
            old = json.loads(previous.read_text())
            ignore = {"resume", "overwrite", "wandb", "debug_first_example"}
            changed = sorted(k for part in ("sdpo", "run") for k, v in config[part].items()
                             if k not in ignore and old.get(part, {}).get(k) != v)
            if changed:
                logger.warning("--resume with settings that differ from the first run: %s", ", ".join(changed))
        atomic_write_json(previous, config)

    def _load_or_make_baseline(self) -> None:
        cache = self.out / "baseline_completions.json"
        signature = {"baseline_model": self.run.baseline_model or self.sdpo.model,
                     "eval_prompts_sha256": hashlib.sha256(json.dumps(self.eval_prompts).encode()).hexdigest(),
                     "seed": self.eval_seed, "max_new_tokens": self.run.eval_max_new_tokens,
                     "temperature": self.sdpo.temperature, "top_p": self.sdpo.top_p}
        if cache.exists():
            saved = json.loads(cache.read_text())
            if saved.get("signature") != signature:
                raise SetupError(f"{cache} was made with other settings ({saved.get('signature')}); "
                                 "use a new --output_dir or --overwrite")
            self.baseline = saved["completions"]
            logger.info("baseline completions reused from %s", cache)
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
                raise SetupError(f"--resume: {cache} is missing; the baseline (the initial policy) cannot be rebuilt")
            self.baseline = [r.text for r in self._generate_eval("feedback", "baseline")]
        atomic_write_json(cache, {"signature": signature, "completions": self.baseline})

    @property
    def eval_seed(self) -> int:
        return derive_seed(self.sdpo.seed, "eval")

    def _init_wandb(self) -> None:
        try:
            import wandb
        except ImportError:
            raise SetupError("--wandb needs the wandb package (pip install wandb)") from None
        id_file = self.out / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]  # kept for --resume
        atomic_write_text(id_file, run_id + "\n")
        self.wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", self.run.wandb_project),
                                    name=self.out.name, id=run_id, resume="allow", dir=str(self.out),
                                    config=_read_json(self.out / "config.json"))

    # ------------------------------------------------------------ the loop
    def loop(self) -> None:
        from tqdm.auto import tqdm

        if self.start_step == 1:
            self.evaluate(0)
        bar = tqdm(range(self.start_step, self.num_steps + 1), total=self.num_steps, initial=self.start_step - 1,
                   desc="interactions", unit="step", dynamic_ncols=True)
        for step in bar:
            record = self.interact(step)
            self.metrics.append(record)
            atomic_write_jsonl(self.out / "metrics.jsonl", self.metrics)
            self._wandb_log({f"{arm}/{k}": v for arm in self.arms for k, v in record[arm].items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)}, step)
            first = record[self.arms[0]]
            bar.set_postfix(loss=f"{first['loss']:.3g}", words=first["reply_words"], refresh=False)
            if (self.run.eval_every and step % self.run.eval_every == 0) or step == self.num_steps:
                self.evaluate(step)
            if self.run.save_checkpoints and (step % max(1, self.sdpo.checkpoint_every) == 0 or step == self.num_steps):
                self.checkpoint(step)
        bar.close()
        self._log_api_usage()

    def _log_api_usage(self) -> None:
        """One line per Claude client: requests, retries by reason, time spent waiting."""
        parts = [("user", self.users["feedback"])] + [(f"judge {s}", j) for s, j in self.judges.items()]
        for name, part in parts:
            client = getattr(part, "client", None)
            if client is not None and hasattr(client, "stats"):
                stats = client.stats
                logger.info("Claude API (%s): %d requests, %d retries %s, %.1f s waiting", name, stats["requests"],
                            stats["retries"], stats["retries_by_reason"], stats["wait_s"])

    def interact(self, step: int) -> dict:
        from auxiliary.evals.evaluation_helpers import prompt_as_messages

        prompt = self.train_prompts[step - 1]
        messages = prompt_as_messages(prompt)
        record: dict = {"step": step, "time": time.time()}
        completions = []
        for arm in self.arms:
            updater, user = self.updaters[arm], self.users[arm]
            reply = updater.generate([messages], seed=derive_seed(self.sdpo.seed, "train", step))[0]
            if hasattr(user, "seed"):  # the user's own randomness, also a function of (seed, step)
                user.seed = derive_seed(self.sdpo.seed, "user", arm, step)
            followup = user.generate_feedback([prompt], [reply.text])[0]
            metrics = updater.train_step(messages, reply.ids, followup)
            signals = metrics.pop("signal_per_sequence")
            metrics.pop("step", None)
            metrics.update(followup=followup, reply_tokens=len(reply.ids), reply_words=words(reply.text),
                           reply_finished=reply.finished)
            if hasattr(self.users["feedback"], "problems"):  # rule user: what it would complain about
                metrics["style_problems"] = self.users["feedback"].problems(reply.text)
            record[arm] = metrics
            completions.append({"step": step, "phase": "train", "arm": arm, "prompt": prompt,
                                "completion": reply.text, "followup": followup})
            if self.run.debug_first_example and step == 1 and arm == "feedback":
                self._print_debug_example(messages, reply, followup, signals[0])
        for row in completions:
            append_jsonl(self.out / "completions.jsonl", row)
        return record

    def _eval_messages(self) -> list[list[dict]]:
        from auxiliary.evals.evaluation_helpers import prompt_as_messages

        return [prompt_as_messages(p) for p in self.eval_prompts]

    def _generate_eval(self, arm: str, desc: str):
        return self.updaters[arm].generate(self._eval_messages(), max_new_tokens=self.run.eval_max_new_tokens,
                                           seed=self.eval_seed, progress=True, desc=desc)

    def evaluate(self, step: int) -> None:
        from auxiliary.evals.evaluation_helpers import plot_win_rates, win_rate_stats

        if not self.eval_prompts:
            return
        for arm in self.arms:
            if step == 0 and not self.run.baseline_model:
                # Same initial weights and the same sampling seed as the baseline: identical replies.
                texts = list(self.baseline)
            else:
                texts = [r.text for r in self._generate_eval(arm, f"eval {arm} @{step}")]
            self.eval_texts = {key: v for key, v in self.eval_texts.items() if key[1] != arm}  # keep the latest only
            self.eval_texts[(step, arm)] = texts
            mean_words = sum(map(words, texts)) / len(texts)
            for style in self.styles:
                decisions = self.judges[style].compare(self.eval_prompts, texts, self.baseline)
                stats = win_rate_stats(decisions, seed=derive_seed(self.sdpo.seed, "bootstrap", step, style, arm))
                unparseable = sum(v is None for pair in self.judges[style].last_verdicts for v in pair)
                if unparseable:
                    logger.warning("eval @%d %s/%s: %d of %d judge replies had no verdict (counted as ties)", step,
                                   style, arm, unparseable, 2 * len(decisions))
                record = {"step": step, "style": style, "arm": arm, **stats, "unparseable_verdicts": unparseable,
                          "mean_words": round(mean_words, 2)}
                self.history.append(record)
                self._wandb_log({f"eval/{style}/{arm}/{k}": v for k, v in stats.items() if v is not None}, step)
            for index, (prompt, text) in enumerate(zip(self.eval_prompts, texts)):
                append_jsonl(self.out / "completions.jsonl", {"step": step, "phase": "eval", "arm": arm,
                                                              "index": index, "prompt": prompt, "completion": text})
        atomic_write_json(self.out / "eval_history.json", self.history)
        # Step 0 with every pair tied is the policy reproducing the baseline: drawn at 50%, not left out.
        plotted = [dict(r, win_rate=50.0, se=0.0) if r["step"] == 0 and r["win_rate"] is None and r["ties"] == r["n"]
                   else r for r in self.history]
        plot_win_rates(plotted, self.out / "winrate.png",
                       title=f"{Path(self.sdpo.model).name}: win rate vs baseline ({self.run.judge} judge), +-1 SE")
        logger.info("eval @%d: %s", step, "; ".join(
            f"{r['style']}/{r['arm']} {_fmt_rate(r)}" for r in self.history if r["step"] == step))

    def checkpoint(self, step: int) -> None:
        from online_sdpo_updater import list_checkpoints

        for arm in self.arms:
            self.updaters[arm].save_checkpoint(self.checkpoint_root / arm / f"step_{step:06d}")
        # The marker names a step only once every arm has it: a crash in between resumes from the older one.
        atomic_write_json(self.checkpoint_root / "latest.json", {"step": step, "arms": self.arms})
        keep = max(1, self.sdpo.max_checkpoints)
        for arm in self.arms:
            for old in list_checkpoints(self.checkpoint_root / arm)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------ reporting
    def summary(self) -> dict:
        """Print the win-rate table, the net effect, a head-to-head of the arms and one example; write summary.json."""
        from auxiliary.evals.evaluation_helpers import net_effect, win_rate_stats

        last_step = max((r["step"] for r in self.history), default=None)
        final = {}
        for style in self.styles:
            by_arm = {r["arm"]: r for r in self.history if r["step"] == last_step and r["style"] == style}
            entry = {arm: {k: by_arm[arm][k] for k in ("win_rate", "se", "wins", "losses", "ties", "mean_words")}
                     for arm in by_arm}
            if "placebo" in by_arm:
                entry["net_effect"] = net_effect(by_arm["feedback"], by_arm["placebo"])
            final[style] = entry
        texts = {arm: self._final_eval_texts(last_step, arm) for arm in self.arms} if last_step is not None else {}
        head_to_head = {}
        if "placebo" in self.arms and texts.get("feedback") and texts.get("placebo"):
            # The same prompts answered by both arms, judged directly: a paired, more sensitive comparison.
            for style in self.styles:
                decisions = self.judges[style].compare(self.eval_prompts, texts["feedback"], texts["placebo"])
                head_to_head[style] = win_rate_stats(decisions, seed=derive_seed(self.sdpo.seed, "h2h", style))
        paired = {}
        if "placebo" in self.arms and texts.get("feedback") and texts.get("placebo"):
            for style in self.styles:
                diff = paired_score_difference(style, texts["feedback"], texts["placebo"])
                if diff is not None:
                    paired[style] = {**diff, "baseline_score": _mean_style_score(style, self.baseline)}
        baseline_words = sum(map(words, self.baseline)) / len(self.baseline) if self.baseline else None
        summary = {"final_step": last_step, "baseline_mean_words": baseline_words, "final": final,
                   "head_to_head_feedback_vs_placebo": head_to_head,
                   "paired_style_score_feedback_minus_placebo": paired,
                   "output_dir": str(self.out), "winrate_png": str(self.out / "winrate.png")}
        atomic_write_json(self.out / "summary.json", summary)

        lines = [summary_table(self.history, self.arms, self.styles), ""]
        for style, entry in final.items():
            if "net_effect" in entry:
                net = entry["net_effect"]
                text = "n/a (no decisive pair in an arm)" if net["diff"] is None else \
                    f"{net['diff']:+.1f} +- {net['se']:.1f} points"
                lines.append(f"net effect at step {last_step} ({style}, feedback - placebo win rate): {text}")
        for style, stats in head_to_head.items():
            lines.append(f"head to head at step {last_step} ({style}, feedback vs placebo replies): "
                         f"{_fmt_rate(stats)}")
        for style, diff in paired.items():
            lines.append(f"rule score of '{style}' per reply at step {last_step}: feedback - placebo {diff['diff']:+.2f} "
                         f"+- {diff['se']:.2f} (paired over {diff['n']} prompts; feedback {diff['feedback']:.2f}, "
                         f"placebo {diff['placebo']:.2f}, baseline {diff['baseline_score']:.2f}; higher fits the style)")
        if baseline_words is not None and last_step is not None:
            lines.append(f"mean words per eval reply: baseline {baseline_words:.1f}; at step {last_step}: " + ", ".join(
                f"{arm} {sum(map(words, texts[arm])) / len(texts[arm]):.1f}" for arm in self.arms if texts.get(arm)))
            lines.append(self._example(texts))
        lines.append(f"win-rate plot: {self.out / 'winrate.png'}")
        lines.append(f"results: {self.out}")
        print("\n".join(lines), flush=True)
        if self.wandb_run is not None:
            import wandb

            if (self.out / "winrate.png").exists():
                self.wandb_run.log({"winrate_plot": wandb.Image(str(self.out / "winrate.png"))})
            self.wandb_run.summary.update({"final": final, "head_to_head": head_to_head})
            self.wandb_run.finish()
        return summary

    def _final_eval_texts(self, step: int, arm: str) -> list[str]:
        """The arm's eval replies at `step` (from memory, or from completions.jsonl after a resume)."""
        if (step, arm) in self.eval_texts:
            return self.eval_texts[(step, arm)]
        rows = [r for r in _read_jsonl_tolerant(self.out / "completions.jsonl")
                if r["phase"] == "eval" and r["step"] == step and r["arm"] == arm]
        rows.sort(key=lambda r: r["index"])
        return [r["completion"] for r in rows] if len(rows) == len(self.eval_prompts) else []

    def _example(self, texts: dict, limit: int = 400) -> str:
        from auxiliary.evals.evaluation_helpers import prompt_as_text

        clip = lambda t: t if len(t) <= limit else t[:limit].rstrip() + " [...]"  # noqa: E731
        parts = [f"example eval prompt: {prompt_as_text(self.eval_prompts[0])}", f"  baseline: {clip(self.baseline[0])!r}"]
        parts += [f"  {arm}: {clip(texts[arm][0])!r}" for arm in self.arms if texts.get(arm)]
        return "\n".join(parts)

    def _wandb_log(self, values: dict, step: int) -> None:
        if self.wandb_run is not None and values:
            self.wandb_run.log({**values, "interaction": step})

    def _print_debug_example(self, messages, reply, followup, signal) -> None:
        from sdpo_objective import hindsight_messages, render_context_ids

        tok = self.updaters["feedback"].tokenizer
        x = tok.decode(render_context_ids(tok, messages))
        xo = tok.decode(render_context_ids(tok, hindsight_messages(messages, followup, self.sdpo.hindsight_template)))
        pieces = [tok.decode([i]) for i in reply.ids]
        tokens = " ".join(f"{p!r}:{float(s):+.2f}" for p, s in zip(pieces, signal.tolist()))
        print(f"\n=== first interaction ===\n--- context x ---\n{x}\n--- context xo ---\n{xo}\n--- reply y ---\n"
              f"{reply.text}\n--- follow-up o ---\n{followup}\n--- signal A_t per reply token ---\n{tokens}\n",
              file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- helpers

def _model_for(kind: str, name: str | None):
    """Claude components take a Claude model id; the seed's default user/judge model (a Qwen) is not one."""
    if kind == "rule":
        return None
    if kind == "claude":
        return name if name and name.startswith("claude") else None
    return name


def _read_json(path: Path):
    return json.loads(path.read_text())


def _read_jsonl_tolerant(path: Path) -> list[dict]:
    """completions.jsonl is appended to; a kill mid-append can leave a cut last line, which resume drops."""
    if not path.exists():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                logger.warning("%s: dropping a cut last line", path)
                continue
            raise DataError(f"{path}:{number}: malformed JSON") from None
    return rows


def _style_check(style: str):
    from auxiliary.feedback.style_checks import build_style_checks

    return build_style_checks().get(style)


def _mean_style_score(style: str, texts: list[str]) -> float | None:
    """Mean rule score of the replies (higher fits the style better); None for a style no rule checks."""
    check = _style_check(style)
    return None if check is None or not texts else round(sum(map(check.score, texts)) / len(texts), 4)


def paired_score_difference(style: str, texts_a: list[str], texts_b: list[str]) -> dict | None:
    """Mean and SE of score(a_i) - score(b_i) over the same prompts: a paired, sensitive comparison."""
    check = _style_check(style)
    if check is None or len(texts_a) != len(texts_b) or len(texts_a) < 2:
        return None
    diffs = [check.score(a) - check.score(b) for a, b in zip(texts_a, texts_b)]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return {"n": n, "diff": mean, "se": math.sqrt(var / n), "feedback": sum(map(check.score, texts_a)) / n,
            "placebo": sum(map(check.score, texts_b)) / n}


def _fmt_rate(record: dict) -> str:
    if record.get("win_rate") is None:
        return f"-  ({record['wins'] + record['losses']}/{record['n']} decisive)"
    return f"{record['win_rate']:.1f} +- {record['se']:.1f} ({record['wins'] + record['losses']}/{record['n']} decisive)"


def summary_table(history: list[dict], arms: list[str], styles: list[str]) -> str:
    """Win rate per eval step, style and arm, plus the net effect when a placebo arm ran."""
    from auxiliary.evals.evaluation_helpers import net_effect

    header = ["step", "style"] + arms + (["net (feedback - placebo)"] if "placebo" in arms else [])
    rows = []
    for step in sorted({r["step"] for r in history}):
        for style in styles:
            by_arm = {r["arm"]: r for r in history if r["step"] == step and r["style"] == style}
            if not by_arm:
                continue
            row = [str(step), style] + [_fmt_rate(by_arm[a]) if a in by_arm else "" for a in arms]
            if "placebo" in arms and {"feedback", "placebo"} <= set(by_arm):
                net = net_effect(by_arm["feedback"], by_arm["placebo"])
                row.append("-" if net["diff"] is None else f"{net['diff']:+.1f} +- {net['se']:.1f}")
            rows.append(row)
    widths = [max(len(line[i]) for line in [header] + rows) for i in range(len(header))]
    render = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    title = "win rate of the policy vs the baseline (%, ties excluded, +- analytic SE, decisive pairs / n)"
    return "\n".join([title, render(header), render(["-" * w for w in widths])] + [render(r) for r in rows])


def _setup_errors() -> tuple:
    from auxiliary.feedback.claude_client import ClaudeAuthError
    from auxiliary.runtime.cli import ConfigError
    from auxiliary.runtime.model_loading import ModelLoadError
    from auxiliary.feedback.personas import UnknownStyleError
    from auxiliary.feedback.user_simulator import UnsupportedStyleError

    return (SetupError, DataError, ConfigError, ModelLoadError, UnknownStyleError, UnsupportedStyleError, ValueError,
            ClaudeAuthError)


def _run_errors() -> tuple:
    from auxiliary.feedback.claude_client import ClaudeAuthError, ClaudeRequestError
    from auxiliary.feedback.user_simulator import EmptyFeedbackError

    return (ClaudeAuthError, ClaudeRequestError, EmptyFeedbackError)


def fail(message: str, code: int = 2) -> int:
    print(f"eval_online_sdpo.py: error: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from auxiliary.runtime.cli import parse_dataclasses

    try:
        sdpo, run_config = parse_dataclasses((OnlineSDPOConfig, OnlineRunConfig), argv, prog="eval_online_sdpo.py")
        run = OnlineRun(sdpo, run_config)
        run.setup()
    except _setup_errors() as err:
        return fail(str(err))
    try:
        run.loop()
        run.summary()
    except _run_errors() as err:
        return fail(f"{type(err).__name__}: {err} (completed steps are in {run.out}; rerun with --resume)", 1)
    except KeyboardInterrupt:
        return fail(f"interrupted; completed steps are in {run.out} (continue with --resume)", 130)
    return 0


if __name__ == "__main__":
    sys.exit(main())
