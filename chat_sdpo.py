"""Chat with a model that learns from you: every message you write after a reply is the
follow-up o for that reply and drives one SDPO update (in the background).

    python chat_sdpo.py --model smollm2-135m-instruct                 # terminal
    python chat_sdpo.py --model smollm2-135m-instruct --ui web        # Gradio on 127.0.0.1:7860
    python chat_sdpo.py --user_id alice --adapters_dir runs/adapters  # alice's own LoRA adapter

Flags: every OnlineSDPOConfig field (the chat changes a few defaults, see ChatConfig) plus
the chat's own. Commands: /undo /save /reset /why /new /help /quit.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from auxiliary.runtime.io_utils import base_work_dir  # noqa: E402
from auxiliary.runtime.option_groups import override  # noqa: E402
from online_sdpo_updater_config import OnlineSDPOConfig  # noqa: E402

# Off: on SmolLM2-135M-Instruct a reply's mean |signal| was 0.203 for follow-ups about it and
# 0.255 for new-topic ones (auxiliary/chat_signal_threshold.py; README, section chat), so no
# threshold separates them on small models. Choose a value per model with that script.
DEFAULT_MIN_SIGNAL = 0.0


@dataclass
class ChatConfig(OnlineSDPOConfig):
    # Chat defaults that differ from the online trainer: a model that runs on a laptop,
    # LoRA (a per-user adapter, cheap /undo), a LoRA-sized learning rate, shorter replies.
    model: str = override(OnlineSDPOConfig, "model", "smollm2-135m-instruct")
    use_lora: bool = override(OnlineSDPOConfig, "use_lora", True,
                              help="train a per-user LoRA adapter (--no_use_lora: all weights, one user)")
    lr: float = override(OnlineSDPOConfig, "lr", 1e-4, help="AdamW learning rate (LoRA-sized by default)")
    max_new_tokens: int = override(OnlineSDPOConfig, "max_new_tokens", 256, help="reply length limit")
    temperature: float = override(OnlineSDPOConfig, "temperature", 0.7)
    top_p: float = override(OnlineSDPOConfig, "top_p", 0.9)
    # the chat's own flags
    user_id: str = field(default="default", metadata={
        "help": "whose adapter: <adapters_dir>/<user_id>/ (letters, digits, _ . -)"})
    adapters_dir: Optional[str] = field(default=None, metadata={
        "help": "folder of per-user adapters "
                "(default: $BASE_WORK/chat_adapters, BASE_WORK=${SCRATCH:-${TMPDIR:-/tmp}})"})
    ui: str = field(default="terminal", metadata={"help": "terminal or web (Gradio)"})
    host: str = field(default="127.0.0.1", metadata={
        "help": "web UI address (loopback unless told otherwise; another address needs --auth or --auth_file)"})
    auth: Optional[list[str]] = field(default=None, metadata={
        "help": "web UI logins USER:PASS (repeatable); each user gets their own session and adapter "
                "<adapters_dir>/<USER>/"})
    auth_file: Optional[str] = field(default=None, metadata={
        "help": "web UI logins from a file, one USER:PASS a line (safer than --auth: not shown by ps)"})
    port: int = field(default=7860, metadata={"help": "web UI port"})
    min_signal: float = field(default=DEFAULT_MIN_SIGNAL, metadata={
        "help": "skip updates whose mean |signal| is below this (0 = never skip)"})
    undo_depth: int = field(default=10, metadata={
        "help": "how many updates /undo can take back (each keeps a copy of the adapter + optimizer state)"})
    system_prompt: str = field(default="", metadata={"help": "system message of every conversation (empty: none)"})
    max_message_chars: int = field(default=20_000, metadata={
        "help": "longest message accepted, in characters (a longer one is refused before it reaches the model: "
                "on the web server one huge message would stall every user)"})
    log_interactions: bool = field(default=True, metadata={
        "help": "append (prompt, completion, user_response) to <adapters_dir>/<user_id>/interactions.jsonl"})
    color: str = field(default="auto", metadata={
        "help": "terminal colours: auto (a tty and no NO_COLOR), always, never"})

    def __post_init__(self):
        super().__post_init__()
        if self.ui not in ("terminal", "web"):
            raise ValueError(f"--ui {self.ui!r}: choose terminal or web")
        if self.color not in ("auto", "always", "never"):
            raise ValueError(f"--color {self.color!r}: choose auto, always or never")

    def resolved_adapters_dir(self) -> Path:
        if self.adapters_dir:
            return Path(self.adapters_dir).expanduser()
        return base_work_dir() / "chat_adapters"


# ---------------------------------------------------------------------- terminal UI

PROMPT = "you> "
COLOUR_CODES = re.compile(r"\x1b\[[0-9;]*m")
# 256-colour backgrounds by |signal| level: red = the model would now write this token less, green = more.
NEGATIVE_BG = (224, 210, 196)
POSITIVE_BG = (194, 114, 34)
LEVELS = (0.1, 0.5, 1.5)   # |A| thresholds of the three shades (below 0.1: uncoloured)


def signal_level(value: float) -> int:
    """0 (uncoloured) .. 3 (strongest shade)."""
    return sum(abs(value) >= t for t in LEVELS)


def colour_piece(piece: str, value: float) -> str:
    level = signal_level(value)
    if level == 0 or not piece:
        return piece
    bg = (NEGATIVE_BG if value < 0 else POSITIVE_BG)[level - 1]
    fg = 97 if level == 3 else 30
    # colour each line separately so the background never runs to the end of the terminal line
    return "\n".join(f"\x1b[48;5;{bg}m\x1b[{fg}m{part}\x1b[0m" if part else part for part in piece.split("\n"))


def render_why(view, colour: bool) -> str:
    """The /why view as terminal text: coloured reply, legend, most negative/positive tokens."""
    if view is None:
        return "nothing to explain yet: /why shows the last reply that received a follow-up"
    status = "the update used it" if view.updated else "no update (skipped or failed)"
    lines = [f"follow-up: {view.followup!r}   signal mean {view.signal_mean:+.3f}, "
             f"mean |signal| {view.signal_abs_mean:.3f}; {status}"]
    if colour:
        lines.append("".join(colour_piece(p, v) for p, v in view.pieces))
        lines.append("legend: red = the model would now write this token less, green = more; "
                     f"shades at |signal| >= {', '.join(map(str, LEVELS))}")
    else:
        lines.append("".join(p for p, _ in view.pieces))
    lowest, highest = view.extremes()
    lines.append("less likely now: " + ", ".join(f"{p.strip()!r} {v:+.2f}" for p, v in lowest))
    lines.append("more likely now: " + (", ".join(f"{p.strip()!r} {v:+.2f}" for p, v in highest) or "none"))
    return "\n".join(lines)


class TerminalChat:
    def __init__(self, session, colour: bool, out=None):
        self.session = session
        self.colour = colour
        self.out = out or sys.stdout
        self._print_lock = threading.Lock()
        self._at_prompt = False
        self._queued: list[str] = []
        try:
            import readline  # line editing, and lets a background status line redraw what was typed
            self._readline = readline
        except ImportError:  # pragma: no cover - non-GNU platforms
            self._readline = None

    def _write(self, text: str) -> None:
        try:
            self.out.write(text if self.colour else COLOUR_CODES.sub("", text))
            self.out.flush()
        except OSError:  # the terminal is gone (SIGHUP): the save goes on without it
            pass

    def on_event(self, report) -> None:
        """Called on the model thread when an update ends: print now if the user sits at the prompt."""
        line = report.status_line()
        with self._print_lock:
            if self._at_prompt:
                typed = self._readline.get_line_buffer() if self._readline else ""
                self._write(f"\r\x1b[K{line}\n{PROMPT}{typed}")
            else:
                self._queued.append(line)

    def _flush_queued(self) -> None:
        for line in self._queued:
            self._write(line + "\n")
        self._queued.clear()

    def _read(self) -> str:
        with self._print_lock:
            self._flush_queued()
            self._at_prompt = True
        try:
            return input(PROMPT)
        finally:
            with self._print_lock:
                self._at_prompt = False

    def run(self) -> None:
        """Chat until /quit, Ctrl-D or SIGTERM/SIGHUP (ChatTerminated); every way out saves."""
        from auxiliary.chat.session import ChatTerminated, save_line

        self._write("commands:\n" + _help() + "\n")
        while True:
            try:
                if self._step() == "quit":
                    break
            except ChatTerminated as stop:
                self._write(f"\n({stop}: saving before leaving)\n")
                break
        self._write("saving the adapter ...\n")
        saved = save_line(self.session.close)  # finishes a running update first
        with self._print_lock:
            self._flush_queued()
        self._write(saved + "\n")

    def _step(self) -> str | None:
        """Read one line and act on it; "quit" ends the chat."""
        try:
            line = self._read().strip()
        except EOFError:
            self._write("\n")
            return "quit"
        except KeyboardInterrupt:
            self._write("\n(use /quit to leave)\n")
            return None
        if line.startswith("/"):
            return self.command(line)
        if line:
            self.chat(line)
        return None

    def chat(self, text: str) -> None:
        from auxiliary.chat.session import ChatError, ChatTerminated

        try:
            stream = self.session.send(text)
        except ChatError as err:  # a message over --max_message_chars
            self._write(f"[not sent: {err}]\n")
            return
        self._write("bot> ")
        try:
            for piece in stream:
                self._write(piece)
        except KeyboardInterrupt:
            stream.stop()  # generation ends at the next token; the reply keeps what was written
            for _ in stream:
                pass
            self._write(" [stopped]")
        except ChatTerminated:
            stream.stop()  # the reply ends at the next token; its update (if any) is saved with the rest
            raise
        self._write("\n")

    def command(self, line: str) -> str | None:
        from auxiliary.chat.session import save_line

        name = line.split()[0].lower()
        session = self.session
        if name == "/quit":
            return "quit"
        if name == "/why":
            self._write(render_why(session.why(), self.colour) + "\n")
        elif name == "/undo":
            self._write(session.undo() + "\n")
        elif name == "/save":
            self._write(save_line(session.save) + "\n")
        elif name == "/reset":
            self._write(session.reset() + "\n")
        elif name == "/new":
            self._write(session.new_conversation() + "\n")
        elif name == "/help":
            self._write(_help() + "\n")
        else:
            self._write(f"unknown command {name}; /help lists them\n")
        return None


def _help() -> str:
    from auxiliary.chat.session import help_text

    return help_text()


# ---------------------------------------------------------------------- main

def build_session(config: ChatConfig, on_event=None, user_id: str | None = None):
    """A loaded ChatSession of `user_id` (default: --user_id), with its own model and optimizer."""
    from auxiliary.chat.session import ChatSession, validate_user_id
    from auxiliary.runtime.io_utils import folders_to_create, private_dir
    from auxiliary.runtime.run_folder import remove_unstarted
    from online_sdpo_updater import OnlineSDPOUpdater

    user_id = validate_user_id(user_id or config.user_id)
    # owner-only, and refused when someone else owns it: the default lives in a world-writable /tmp
    created = folders_to_create(Path(config.resolved_adapters_dir()))
    adapters_dir = private_dir(config.resolved_adapters_dir())
    try:
        updater = OnlineSDPOUpdater(config)
    except BaseException:  # a model that does not load: the adapters folder this call made goes again
        remove_unstarted(created, ())
        raise
    session = ChatSession(updater, adapters_dir / user_id, min_signal=config.min_signal,
                          undo_depth=config.undo_depth, system_prompt=config.system_prompt,
                          log_interactions=config.log_interactions, on_event=on_event,
                          max_message_chars=config.max_message_chars)
    try:
        return session, session.load()
    except BaseException:  # a bad adapter, Ctrl-C or SIGTERM while it loads: the folder lock goes
        session.close(save=False)
        raise


def quiet_libraries() -> None:
    """A chat screen has no room for progress bars of weight loading/saving or deprecation notices."""
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning)
    hf_logging.disable_progress_bar()


def use_colour(setting: str) -> bool:
    if setting != "auto":
        return setting == "always"
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def merge_repeated_flag(argv: list[str], flag: str) -> list[str]:
    """`--auth a --auth b` (or `--auth=a --auth=b`) -> `--auth a b` (the parser keeps only the last of a repeated
    list flag)."""
    values, rest, index = [], [], 0
    while index < len(argv):
        if argv[index].startswith(flag + "="):  # --auth=alice:pw (one value)
            values.append(argv[index].split("=", 1)[1])
            index += 1
            continue
        if argv[index] == flag:
            index += 1
            while index < len(argv) and not argv[index].startswith("--"):
                values.append(argv[index])
                index += 1
            continue
        rest.append(argv[index])
        index += 1
    return rest + ([flag, *values] if values else [])


def main(argv=None) -> int:
    from auxiliary.chat.session import save_on_termination

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    argv = merge_repeated_flag(list(sys.argv[1:] if argv is None else argv), "--auth")
    # SIGTERM / SIGHUP from here on: while loading, one line and exit 128+n (nothing learned yet); once chatting,
    # leave through the normal end, which saves every open session
    with save_on_termination() as received:
        return _load_and_chat(argv, received)


def _load_and_chat(argv: list[str], received: list[int]) -> int:
    from auxiliary.chat.session import ChatError, ChatTerminated
    from auxiliary.runtime.cli import ConfigError, exit_with_error, parse_dataclasses
    from auxiliary.runtime.locks import FolderLockError
    from auxiliary.runtime.model_loading import ModelLoadError

    credentials, session, loaded = [], None, ""
    try:
        (config,) = parse_dataclasses((ChatConfig,), argv, prog="chat_sdpo.py")
        if config.ui == "web":
            from auxiliary.chat.web import require_free_port, web_credentials

            credentials = web_credentials(config)  # before loading: a refused --host fails at once
            require_free_port(config)  # and a port in use
        who = f"{len(credentials)} users" if credentials else f"user '{config.user_id}'"
        print(f"loading {config.model} ({who}, adapters in {config.resolved_adapters_dir()}) ...", flush=True)
        if not credentials:  # with logins each user's session opens at their first request
            session, loaded = build_session(config)
        terminal = TerminalChat(session, use_colour(config.color)) if config.ui == "terminal" else None
        if terminal is not None:
            session.on_event = terminal.on_event
    except (ConfigError, ChatError, ModelLoadError, FolderLockError, ValueError, FileNotFoundError,
            PermissionError) as err:
        return exit_with_error(err)
    except (KeyboardInterrupt, ChatTerminated) as stop:  # while the model loads: one line, not a traceback
        if session is not None:
            session.close(save=False)  # nothing was learned yet; the folder lock goes
        if isinstance(stop, ChatTerminated):
            print(f"{stop} while loading: nothing learned yet, nothing to save", file=sys.stderr)
            return 128 + stop.signum
        print("interrupted while loading", file=sys.stderr)
        return 130
    if loaded:
        print(loaded, flush=True)
    print(f"every message you send after a reply is feedback for it: one SDPO update each "
          f"(lr {config.lr:g}, {'LoRA r=' + str(config.lora_r) if config.use_lora else 'all weights'}, "
          f"loss {config.loss_mode}, min_signal {config.min_signal:g})", flush=True)
    if terminal is not None:
        terminal.run()
    else:
        from auxiliary.chat.web import SessionRouter, serve

        router = SessionRouter(lambda user: build_session(config, user_id=user)[0],
                               default_user=None if credentials else config.user_id)
        if session is not None:
            router.add(config.user_id, session)
        try:
            serve(router, config, credentials)
        except OSError as err:  # the port taken since the check: every open session was saved on the way out
            return exit_with_error(f"web UI on {config.host}:{config.port}: {err}")
    return 128 + received[0] if received else 0


if __name__ == "__main__":
    sys.exit(main())
