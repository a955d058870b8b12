"""ChatSession: the UI-independent core of the live chat (`chat_sdpo.py`, terminal and web).

Every user message that follows a reply is the follow-up o for that reply and drives
one SDPO update (x = the conversation before the reply, y = the reply's sampled ids).

Threading: all model work (generation, updates, undo, save, reset, /why) runs as jobs
on ONE worker thread, in the order they were asked for. So there is no lock to forget,
and the order is fixed: a turn first streams the reply to the new message (with the
weights as they are), THEN runs the update that the message triggers, while the user
reads and types. The reply to o is therefore written before o's own update; every
later reply uses all updates so far.

One session per user: it owns one adapter (under `<adapters_dir>/<user_id>/`, a private
folder held with a FolderLock from `load()` to `close()`, so no second process writes it) and
one optimizer. The web UI keeps one session per logged-in user (auxiliary/chat/web.py).
"""
from __future__ import annotations

import contextlib
import copy
import re
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from auxiliary.runtime.generation import GeneratedResponse, cut_at_stop, left_pad, stop_token_ids
from auxiliary.runtime.io_utils import append_jsonl, describe_os_error, private_dir, recover_folder
from auxiliary.runtime.locks import FolderLock
from sdpo_objective import compute_signal, hindsight_contexts, render_context_ids

ADAPTER_FOLDER = "adapter"            # <adapters_dir>/<user_id>/adapter: an updater checkpoint
INTERACTIONS_FILE = "interactions.jsonl"
USER_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

COMMANDS = {
    "/undo": "restore the weights and optimizer state from before the last update",
    "/save": "save this user's adapter and optimizer state now (also done on exit)",
    "/reset": "back to the base model: a fresh adapter and optimizer (undoable)",
    "/why": "the last reply that got a follow-up, each token coloured by its signal",
    "/new": "start a new conversation (the weights stay)",
    "/help": "list the commands",
    "/quit": "save and leave",
}


class ChatError(RuntimeError):
    pass


class SessionClosed(ChatError):
    """A job asked of a session that is closing or closed (a command racing a /quit): the caller asks the
    user's next session instead."""


class ChatTerminated(Exception):
    """SIGTERM or SIGHUP (a closed terminal, `kill PID`): raised in the main thread so that the UI leaves
    through its normal end, which saves every open session."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def save_on_termination():
    """While inside, SIGTERM and SIGHUP raise ChatTerminated (once: a second signal must not interrupt the
    save the first one started). Main thread only."""
    received: list[int] = []

    def handler(signum, frame):
        if not received:
            received.append(signum)
            raise ChatTerminated(signum)

    watched = (signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, handler) for signum in watched}
    try:
        yield received
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def save_line(save: Callable[[], Path | None]) -> str:
    """What the terminal and the web UI show for a save: "saved to PATH", or on a full disk (any OSError) the
    one line "error: cannot write PATH: ..." (the adapter saved before, if any, is intact; the chat goes on)."""
    try:
        return f"saved to {save()}"
    except OSError as err:
        return f"error: {describe_os_error(err)}"


def validate_user_id(user_id: str) -> str:
    if not USER_ID_PATTERN.fullmatch(user_id or ""):  # fullmatch: `$` would let a trailing newline through
        raise ChatError(f"--user_id {user_id!r}: use 1-64 letters, digits, '_', '.', '-' (it names a folder)")
    return user_id


@dataclass
class UpdateReport:
    """What one follow-up did to the weights; `status_line()` is what the UIs show."""
    kind: str                    # "update", "skipped" (|signal| below min_signal) or "error"
    update_number: int           # updates applied in this process so far
    skipped_total: int
    signal_mean: float = 0.0
    signal_abs_mean: float = 0.0
    loss: float = float("nan")
    seconds: float = 0.0
    tokens: int = 0
    min_signal: float = 0.0
    error: str = ""

    def status_line(self) -> str:
        if self.kind == "error":
            return f"[update failed: {self.error}]"
        signal = f"signal mean {self.signal_mean:+.3f}, mean |signal| {self.signal_abs_mean:.3f}"
        if self.kind == "skipped":
            return (f"[update skipped: {signal} < min_signal {self.min_signal:g} "
                    f"({self.skipped_total} skipped so far)]")
        return (f"[update {self.update_number}: loss {self.loss:.4f}, {signal}, "
                f"{self.tokens} tokens, {self.seconds:.1f} s]")


@dataclass
class WhyView:
    """The last reply that received a follow-up, split into tokens with their signal A_t."""
    pieces: list[tuple[str, float]]
    followup: str
    signal_mean: float
    signal_abs_mean: float
    updated: bool                # False when the update was skipped (low signal) or failed

    def extremes(self, count: int = 5) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
        """(most negative, most positive) tokens: what the model would now write less / more."""
        visible = [(t, s) for t, s in self.pieces if t.strip()]
        ordered = sorted(visible, key=lambda item: item[1])
        return ordered[:count], [p for p in reversed(ordered[-count:]) if p[1] > 0]


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """Text of each token, decoded incrementally so multi-byte characters come out whole."""
    pieces, previous = [], ""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end], skip_special_tokens=False)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for its last byte
            pieces.append("")
            continue
        shared = len(previous) if text.startswith(previous) else len(_common_prefix(previous, text))
        pieces.append(text[shared:])
        previous = text
    return pieces


def _common_prefix(a: str, b: str) -> str:
    size = 0
    while size < min(len(a), len(b)) and a[size] == b[size]:
        size += 1
    return a[:size]


class _StopOnEvent:
    """A generate() stopping criterion that ends generation when the UI asks (Ctrl-C, Stop)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ReplyStream:
    """Iterate over the text of a reply as it is generated; `reply()` gives the finished reply."""

    def __init__(self, streamer, reply_future: Future, turn_future: Future, stop_event: threading.Event):
        self._streamer = streamer
        self.reply_future = reply_future
        self.turn_future = turn_future   # done when the turn's update (if any) is done too
        self._stop = stop_event

    def __iter__(self) -> Iterator[str]:
        for piece in self._streamer:
            if piece:
                yield piece
        self.reply()  # re-raise a generation error here rather than end silently

    def reply(self, timeout: float | None = None) -> GeneratedResponse:
        return self.reply_future.result(timeout)

    def stop(self) -> None:
        self._stop.set()


@dataclass
class _Snapshot:
    """The whole training state /undo and /reset restore: weights, optimizer, lr scheduler, step counters
    and (--teacher ema) the teacher's weights."""
    params: dict[str, torch.Tensor]
    optimizer: dict
    step: int
    label: str
    scheduler: dict
    skipped_nonfinite: int
    teacher: dict | None


@dataclass
class PendingReply:
    """A reply waiting for its follow-up: x (messages before it) and y (its sampled ids)."""
    context: list[dict]
    reply: GeneratedResponse


class ChatSession:
    def __init__(self, updater, user_dir: str | Path, min_signal: float = 0.0, undo_depth: int = 10,
                 system_prompt: str = "", log_interactions: bool = True,
                 on_event: Callable[[UpdateReport], None] | None = None, max_message_chars: int = 0):
        if undo_depth < 1:
            raise ChatError("undo_depth must be >= 1")
        if min_signal < 0:
            raise ChatError("min_signal must be >= 0")
        self.updater = updater
        self.tokenizer = updater.tokenizer
        self.user_dir = Path(user_dir)
        self.min_signal = min_signal
        self.undo_depth = undo_depth
        self.system_prompt = system_prompt
        self.log_interactions = log_interactions
        self.max_message_chars = max_message_chars  # 0: no limit
        self.on_event = on_event
        self.messages: list[dict] = self._fresh_messages()
        self.updates_applied = 0
        self.updates_skipped = 0
        self.last_report: UpdateReport | None = None
        self._pending: PendingReply | None = None
        self._why: WhyView | None = None
        self._undo: list[_Snapshot] = []
        self._fresh = self._snapshot("fresh adapter")  # /reset target, taken before any saved state is loaded
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chat-model")
        self._jobs_in_flight = 0
        self._jobs_lock = threading.RLock()  # close() submits its save while holding it
        self._closed = False
        self._lock = FolderLock(self.user_dir)

    # ------------------------------------------------------------------ paths and persistence
    @property
    def adapter_path(self) -> Path:
        return self.user_dir / ADAPTER_FOLDER

    def load(self) -> str:
        """Take this user's folder (lock) and load the saved adapter and optimizer if there is one;
        returns what happened. A failed load gives the folder back."""
        self._hold_folder()
        try:
            return self._run(self._load)
        except BaseException:
            self._lock.release()
            raise

    def _hold_folder(self) -> None:
        if not self._lock.held:
            private_dir(self.user_dir)
            self._lock.acquire()

    def _load(self) -> str:
        path = self.adapter_path
        repaired = recover_folder(path)  # an interrupted save: the old or the new adapter, never none
        if not (path / "updater_state.json").exists():
            return f"new user: fresh adapter (will be saved to {path})"
        import json

        state = json.loads((path / "updater_state.json").read_text())
        extra = state.get("extra", {})
        if bool(state.get("use_lora")) != bool(self.updater.config.use_lora):
            raise ChatError(f"{path} was saved with use_lora={state.get('use_lora')}, "
                            f"but this run has use_lora={self.updater.config.use_lora}")
        saved_base = extra.get("base_model")
        if saved_base and saved_base != str(self.updater.model_path):
            raise ChatError(f"{path} adapts base model {saved_base}, not {self.updater.model_path}; "
                            "use the same --model or another --adapters_dir/--user_id")
        self._check_lora_shape(path / "model" / "adapter_config.json")
        self.updater.load_checkpoint(path)
        self.updates_applied = int(extra.get("updates_applied", 0))
        self.updates_skipped = int(extra.get("updates_skipped", 0))
        note = f"; {repaired}" if repaired else ""
        return (f"loaded adapter of user '{self.user_dir.name}' from {path} "
                f"({self.updates_applied} updates so far{note})")

    def _check_lora_shape(self, adapter_config: Path) -> None:
        if not self.updater.config.use_lora or not adapter_config.exists():
            return
        import json

        saved = json.loads(adapter_config.read_text())
        config = self.updater.config
        for key, ours in (("r", config.lora_r), ("lora_alpha", config.lora_alpha)):
            if key in saved and saved[key] != ours:
                flag = "--lora_r" if key == "r" else "--lora_alpha"
                raise ChatError(f"{adapter_config}: the saved adapter has {key}={saved[key]}, this run {flag} {ours}; "
                                f"pass {flag} {saved[key]} to continue it")
        # peft stores the resolved module names (all-linear becomes the list it stands for): compare those
        targets = getattr(self.updater.model, "peft_config", {}).get("default")
        saved_targets = saved.get("target_modules")
        ours = set(targets.target_modules) if targets is not None and targets.target_modules else None
        if saved_targets and ours is not None and set(saved_targets) != ours:
            saved_flag = self._saved_target_flag(adapter_config.parent.parent / "config.json", saved_targets)
            raise ChatError(f"{adapter_config}: the saved adapter has --lora_target_modules {saved_flag}, this run "
                            f"{config.lora_target_modules}; pass --lora_target_modules {saved_flag} to continue it")

    @staticmethod
    def _saved_target_flag(checkpoint_config: Path, saved_targets: list) -> str:
        """The saved --lora_target_modules as the user gave it (config.json beside the adapter: "all-linear"
        rather than the hundred names peft resolved it to); without it, the resolved names, short or counted."""
        import json

        try:
            given = json.loads(checkpoint_config.read_text(encoding="utf-8")).get("lora_target_modules")
        except (OSError, ValueError, AttributeError):
            given = None
        if isinstance(given, str) and given.strip():
            return given
        names = sorted(saved_targets)
        return ",".join(names) if len(names) <= 8 else f"{','.join(names[:3])},... ({len(names)} modules)"

    def save(self) -> Path:
        return self._run(self._save)

    def _save(self) -> Path:
        self._hold_folder()
        extra = {"base_model": str(self.updater.model_path), "user_id": self.user_dir.name,
                 "updates_applied": self.updates_applied, "updates_skipped": self.updates_skipped}
        return self.updater.save_checkpoint(self.adapter_path, extra_state=extra)

    def close(self, save: bool = True) -> Path | None:
        """Finish queued work, save (by default) and stop the worker. Safe to call twice, from any thread:
        from the moment it starts, new jobs are refused with SessionClosed, so nothing runs after the save."""
        with self._jobs_lock:
            if self._closed:
                return None
            self._closed = True
            saved = self._submit(self._save, closing=True) if save else None  # after every job queued before
        try:
            return saved.result() if saved is not None else None
        finally:
            self._worker.shutdown(wait=True)
            self._lock.release()

    @property
    def closed(self) -> bool:
        """True from the moment close() starts: new jobs are refused from then on."""
        return self._closed

    # ------------------------------------------------------------------ chatting
    def send(self, text: str) -> ReplyStream:
        """Queue a turn: stream the reply to `text`, then update on the previous reply with `text` as o."""
        from transformers import TextIteratorStreamer

        text = text.strip()
        if not text:
            raise ChatError("empty message")
        if self.max_message_chars and len(text) > self.max_message_chars:
            raise ChatError(f"the message has {len(text)} characters, more than --max_message_chars "
                            f"{self.max_message_chars}; shorten it")
        if self._closed:
            raise SessionClosed(f"the session of user '{self.user_dir.name}' is closed")
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop_event = threading.Event()
        reply_future: Future = Future()
        turn_future = self._submit(self._turn, text, streamer, stop_event, reply_future)
        return ReplyStream(streamer, reply_future, turn_future, stop_event)

    def wait_idle(self) -> None:
        """Block until every queued job (turns and their updates) has finished."""
        self._run(lambda: None)

    def _turn(self, text: str, streamer, stop_event: threading.Event, reply_future: Future) -> UpdateReport | None:
        pending = self._pending
        self.messages.append({"role": "user", "content": text})
        try:
            reply = self._stream_generate(list(self.messages), streamer, stop_event)
        except BaseException as err:
            self.messages.pop()
            streamer.end()  # unblock the reader; it re-raises through reply_future
            reply_future.set_exception(err)
            raise
        self._pending = PendingReply(context=list(self.messages), reply=reply)
        self.messages.append({"role": "assistant", "content": reply.text})
        reply_future.set_result(reply)
        if pending is None:
            return None
        report = self._update(pending, text)
        self.last_report = report
        if self.on_event:
            self.on_event(report)
        return report

    def _stream_generate(self, messages: list[dict], streamer, stop_event: threading.Event) -> GeneratedResponse:
        from transformers import StoppingCriteriaList

        model, config = self.updater.model, self.updater.config
        context = render_context_ids(self.tokenizer, messages)
        if config.max_context_length:
            context = context[-config.max_context_length:]
        input_ids, attention = left_pad([context], self.tokenizer.pad_token_id, self.updater.device)
        stops = stop_token_ids(model, self.tokenizer)
        kwargs = dict(max_new_tokens=config.max_new_tokens, eos_token_id=stops,
                      pad_token_id=self.tokenizer.pad_token_id,
                      do_sample=config.temperature > 0, streamer=streamer,
                      stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop_event)]))
        if config.temperature > 0:
            kwargs.update(temperature=config.temperature, top_p=config.top_p, top_k=0)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                output = model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        finally:
            model.train(was_training)
        # The sampled ids ARE y: the update scores these exact ids, never a re-tokenisation of the text.
        ids, finished = cut_at_stop(output[0, input_ids.shape[1]:].tolist(), set(stops))
        if not ids:
            ids, finished = [stops[0]], True
        return GeneratedResponse(text=self.tokenizer.decode(ids, skip_special_tokens=True).strip(), ids=ids,
                                 finished=finished)

    # ------------------------------------------------------------------ the update
    def _update(self, pending: PendingReply, followup: str) -> UpdateReport:
        started = time.perf_counter()
        try:
            signal = None
            if self.min_signal > 0:
                signal = self.hindsight_signal(pending, followup)
                abs_mean = float(torch.tensor(signal).abs().mean())
                if abs_mean < self.min_signal:
                    self.updates_skipped += 1
                    self._remember_why(pending, followup, signal, updated=False)
                    self._log(pending, followup, updated=False, signal=signal)
                    return UpdateReport("skipped", self.updates_applied, self.updates_skipped,
                                        signal_mean=float(torch.tensor(signal).mean()), signal_abs_mean=abs_mean,
                                        seconds=time.perf_counter() - started, tokens=len(signal),
                                        min_signal=self.min_signal)
            snapshot = self._snapshot(f"update {self.updates_applied + 1}")
            metrics = self.updater.train_step(pending.context, pending.reply.ids, followup)
            self._push_undo(snapshot)
            self.updates_applied += 1
            signal = metrics["signal_per_sequence"][0].tolist()
            self._remember_why(pending, followup, signal, updated=True)
            self._log(pending, followup, updated=True, signal=signal)
            return UpdateReport("update", self.updates_applied, self.updates_skipped,
                                signal_mean=metrics["signal_mean"],
                                signal_abs_mean=metrics["signal_abs_mean"], loss=metrics["loss"],
                                seconds=time.perf_counter() - started, tokens=metrics["tokens"],
                                min_signal=self.min_signal)
        except Exception as err:  # a failed update must not end the conversation
            return UpdateReport("error", self.updates_applied, self.updates_skipped,
                                error=f"{type(err).__name__}: {err}")

    def hindsight_signal(self, pending: PendingReply, followup: str) -> list[float]:
        """The per-token signal of the pending reply's ids given the follow-up (what --min_signal gates on)."""
        config = self.updater.config
        context_x, context_xo, context_neutral = hindsight_contexts(
            self.tokenizer, pending.context, followup, config.hindsight_template, config.hindsight_placement,
            config.contrast_followup)
        result = compute_signal(self.updater.model, [context_x], [context_xo], [pending.reply.ids],
                                self.tokenizer.pad_token_id, config.max_context_length, config.logits_chunk_size,
                                teacher=self.updater.teacher,
                                contexts_neutral=None if context_neutral is None else [context_neutral])
        return result[0]["signal"]

    def _remember_why(self, pending: PendingReply, followup: str, signal: list[float], updated: bool) -> None:
        values = torch.tensor(signal, dtype=torch.float32)
        pieces = token_pieces(self.tokenizer, pending.reply.ids)
        self._why = WhyView(list(zip(pieces, values.tolist())), followup, float(values.mean()),
                            float(values.abs().mean()), updated)

    def _log(self, pending: PendingReply, followup: str, updated: bool, signal: list[float]) -> None:
        """Append the interaction in the offline trainer's format: chats become offline training data."""
        if not self.log_interactions:
            return
        values = torch.tensor(signal, dtype=torch.float32)
        append_jsonl(self.user_dir / INTERACTIONS_FILE, private=True, record={
            "prompt": pending.context, "completion": pending.reply.text, "user_response": followup,
            "updated": updated, "signal_mean": float(values.mean()), "signal_abs_mean": float(values.abs().mean()),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })

    # ------------------------------------------------------------------ undo / reset
    def _trainable(self) -> dict[str, torch.Tensor]:
        return self.updater.trainable_parameters()

    def _snapshot(self, label: str) -> _Snapshot:
        updater = self.updater
        params = {name: p.detach().clone() for name, p in self._trainable().items()}
        teacher = updater.teacher.state_dict() if updater.teacher.mode == "ema" else None  # a copy already
        return _Snapshot(params, copy.deepcopy(updater.optimizer.state_dict()), updater.step, label,
                         copy.deepcopy(updater.scheduler.state_dict()), updater.skipped_nonfinite, teacher)

    def _restore(self, snapshot: _Snapshot) -> None:
        updater = self.updater
        with torch.no_grad():
            for name, param in self._trainable().items():
                param.copy_(snapshot.params[name])
        # deepcopy: load_state_dict keeps the given tensors, and Adam updates them in place later.
        updater.optimizer.load_state_dict(copy.deepcopy(snapshot.optimizer))
        updater.scheduler.load_state_dict(copy.deepcopy(snapshot.scheduler))  # the lr follows the step back
        if snapshot.teacher is not None:
            updater.teacher.load_state_dict(snapshot.teacher, source="the /undo copy")
        updater.step = snapshot.step
        updater.skipped_nonfinite = snapshot.skipped_nonfinite

    def _push_undo(self, snapshot: _Snapshot) -> None:
        self._undo.append(snapshot)
        del self._undo[:-self.undo_depth]

    def undo(self) -> str:
        return self._run(self._undo_last)

    def _undo_last(self) -> str:
        if not self._undo:
            return "nothing to undo"
        snapshot = self._undo.pop()
        self._restore(snapshot)
        if snapshot.label.startswith("update"):
            self.updates_applied -= 1
        return f"undone: {snapshot.label} (weights and optimizer state restored; {len(self._undo)} more undo steps)"

    def reset(self) -> str:
        return self._run(self._reset)

    def _reset(self) -> str:
        self._push_undo(self._snapshot("reset"))
        self._restore(self._fresh)
        return "back to the base model: fresh adapter and optimizer (/undo brings the previous weights back)"

    # ------------------------------------------------------------------ other commands
    def why(self) -> WhyView | None:
        return self._run(lambda: self._why)

    def new_conversation(self) -> str:
        def start_over():
            self.messages = self._fresh_messages()
            self._pending = None
            return "new conversation (the adapter keeps what it learned)"
        return self._run(start_over)

    def _fresh_messages(self) -> list[dict]:
        return [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """A copy of the trainable tensors (tests compare these across /undo)."""
        return self._run(lambda: {n: p.detach().clone() for n, p in self._trainable().items()})

    def _run(self, job):
        """Run a job on the model thread (after everything queued before it) and wait for its result."""
        return self._submit(job).result()

    def _submit(self, job, *args, closing: bool = False) -> Future:
        with self._jobs_lock:  # the check and the submit together: close() cannot slip in between
            if self._closed and not closing:
                raise SessionClosed(f"the session of user '{self.user_dir.name}' is closed")
            self._jobs_in_flight += 1
            future = self._worker.submit(job, *args)
        future.add_done_callback(self._job_done)
        return future

    def _job_done(self, _future) -> None:
        with self._jobs_lock:
            self._jobs_in_flight -= 1

    def busy(self) -> bool:
        """True while a reply or an update is being computed or waits its turn."""
        with self._jobs_lock:
            return self._jobs_in_flight > 0


def help_text() -> str:
    width = max(len(name) for name in COMMANDS)
    return "\n".join(f"  {name.ljust(width)}  {text}" for name, text in COMMANDS.items())
