"""Web UI of the live chat (Gradio): the terminal chat's session, commands as buttons,
/why as highlighted text.

Logins: with --auth USER:PASS (repeatable) or --auth_file (one USER:PASS a line) Gradio asks
for a login, and each user gets their own ChatSession (conversation, adapter in
<adapters_dir>/<USER>/, optimizer, undo history): nothing one browser does reaches another
user's session. Without a login the page serves the single --user_id, and only on a loopback
address: binding another address without --auth is refused."""
# no `from __future__ import annotations`: Gradio finds the gr.Request parameter by its evaluated annotation
import ipaddress
import logging
import os
import socket
import stat
import threading
from pathlib import Path
from typing import Callable

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home

logger = logging.getLogger(__name__)

WHY_LABEL = ("/why: signal per token of the last reply that got a follow-up "
             "(red: the model would now write it less, purple: more)")
PLACEHOLDER = ("Write a message. Everything you write after a reply is feedback for it "
               "(commands: /undo /save /reset /why /new)")


def why_highlights(view) -> list[tuple[str, float | None]]:
    """HighlightedText value: (token, score in [-1, 1]) scaled by the largest |signal|.

    Gradio paints positive scores red and negative ones purple; the score is -signal so that
    red marks the tokens the model would now write less (negative signal), as in the terminal."""
    if view is None or not view.pieces:
        return []
    scale = max(abs(v) for _, v in view.pieces) or 1.0
    return [(piece, round(-value / scale, 4)) for piece, value in view.pieces if piece]


def why_caption(view) -> str:
    if view is None:
        return "nothing to explain yet: /why shows the last reply that received a follow-up"
    state = "the update used it" if view.updated else "no update (skipped or failed)"
    lowest, _ = view.extremes(5)
    worst = ", ".join(f"`{p.strip()}` {v:+.2f}" for p, v in lowest)
    return (f"follow-up: *{view.followup}* - signal mean {view.signal_mean:+.3f}, mean |signal| "
            f"{view.signal_abs_mean:.3f}; {state}. Less likely now: {worst}")


def status_markdown(session) -> str:
    last = (session.last_report.status_line() if session.last_report
            else "no update yet: your first follow-up triggers one")
    busy = " - working ..." if session.busy() else ""
    return (f"**updates** applied {session.updates_applied}, skipped {session.updates_skipped}{busy}  \n"
            f"last: `{last}`")


def visible_history(session) -> list[dict]:
    return [m for m in session.messages if m["role"] in ("user", "assistant")]


class WebSetupError(ValueError):
    """Bad --auth / --auth_file / --host combination; the message is one line."""


def parse_credentials(entries, source: str) -> list[tuple[str, str]]:
    """USER:PASS entries -> [(user, password)]; the user name must be a valid user id (it names a folder)."""
    from auxiliary.chat.session import ChatError, validate_user_id

    credentials: dict[str, str] = {}
    for number, entry in enumerate(entries, start=1):
        user, sep, password = entry.partition(":")
        where = f"{source} entry {number}"
        if not sep or not password:
            raise WebSetupError(f"{where}: expected USER:PASS with a non-empty password")
        try:
            validate_user_id(user)
        except ChatError:
            raise WebSetupError(f"{where}: user {user!r} must be 1-64 letters, digits, '_', '.', '-'") from None
        if user in credentials:
            raise WebSetupError(f"{where}: user {user!r} is given twice")
        credentials[user] = password
    return list(credentials.items())


def read_auth_file(path: str) -> list[str]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise WebSetupError(f"--auth_file {path}: file not found")
    if file.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("--auth_file %s can be read by other users: chmod 600 it", path)
    return [line.strip() for line in file.read_text().splitlines() if line.strip() and not line.startswith("#")]


def require_free_port(config) -> None:
    """Refuse a --port that is taken before the model loads (a big model takes minutes to load)."""
    with socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's own: TIME_WAIT is no refusal
        try:
            probe.bind((config.host, config.port))
        except OSError as err:
            raise WebSetupError(f"--port {config.port} on {config.host} cannot be used ({err.strerror or err}): "
                                "choose another --port") from None


def web_credentials(config) -> list[tuple[str, str]]:
    """The logins of --auth and --auth_file; refuses a non-loopback address without any."""
    credentials = parse_credentials(list(config.auth or []), "--auth")
    if config.auth_file:
        entries = read_auth_file(config.auth_file)
        if not entries:  # else the server would start without logins, open to anyone who reaches it
            raise WebSetupError(f"--auth_file {config.auth_file} holds no USER:PASS line")
        credentials += parse_credentials(entries, f"--auth_file {config.auth_file}")
    users = [user for user, _ in credentials]
    if len(set(users)) != len(users):
        raise WebSetupError("a user is given both in --auth and in --auth_file")
    if not credentials and not _is_loopback(config.host):
        raise WebSetupError(f"--host {config.host} is reachable from other machines: pass --auth USER:PASS "
                            "or --auth_file so that each person logs in to their own session")
    return credentials


class SessionRouter:
    """One ChatSession per logged-in user, opened at their first request.

    `open_session(user)` returns a loaded ChatSession of that user. Without logins every request
    is `default_user`'s (the single local user); with logins a request without a user name is
    refused, so no request can reach a session that is not its own."""

    def __init__(self, open_session: Callable[[str], object], default_user: str | None = None):
        self._open = open_session
        self.default_user = default_user
        self._sessions: dict[str, object] = {}
        self._lock = threading.Lock()
        # one per user, held while their session opens or closes: a request racing a /quit waits for the
        # save to end and the folder lock to go, then opens the next session (else: FolderLockError)
        self._user_locks: dict[str, threading.Lock] = {}

    def _user_lock(self, user: str) -> threading.Lock:
        with self._lock:
            return self._user_locks.setdefault(user, threading.Lock())

    def user_of(self, request) -> str:
        from auxiliary.chat.session import ChatError

        user = getattr(request, "username", None) if request is not None else None
        if self.default_user is not None:
            if user not in (None, self.default_user):
                raise ChatError(f"this server serves user '{self.default_user}' only")
            return self.default_user
        if not user:
            raise ChatError("not logged in")
        return user

    def session_for(self, request):
        user = self.user_of(request)
        with self._user_lock(user):  # two first requests of one user must not open two sessions
            with self._lock:
                session = self._sessions.get(user)
            if session is None or session.closed:
                session = self._open(user)  # other users' requests go on meanwhile
                with self._lock:
                    self._sessions[user] = session
            return session

    def call(self, request, action):
        """action(session) on the request's session; when a /quit of the same user closed that session
        meanwhile (SessionClosed), once more on the user's next session."""
        from auxiliary.chat.session import SessionClosed

        try:
            return action(self.session_for(request))
        except SessionClosed:
            return action(self.session_for(request))

    def open_session_of(self, request):
        """The request's session if it is open, else None (polling must not reopen a closed one)."""
        with self._lock:
            session = self._sessions.get(self.user_of(request))
        return session if session is not None and not session.closed else None

    def add(self, user: str, session) -> None:
        with self._lock:
            self._sessions[user] = session

    def close_user(self, user: str) -> Path | None:
        with self._user_lock(user):
            with self._lock:
                session = self._sessions.pop(user, None)
            return session.close() if session is not None else None

    def close_all(self) -> dict[str, str]:
        """Close (and save) every open session: {user: "saved to PATH" or the full disk's one line}; one user's
        failed save does not stop the others'."""
        from auxiliary.chat.session import save_line

        with self._lock:
            sessions, self._sessions = self._sessions, {}
        return {user: save_line(session.close) for user, session in sessions.items()}


def build_app(router: SessionRouter, config, quit_event: threading.Event | None = None):
    import gradio as gr

    from auxiliary.chat.session import ChatError, save_line

    multi_user = router.default_user is None
    # the last command's answer per user, shown above the status: the 1 s status poll would
    # otherwise replace it before it can be read
    notes: dict[str, str] = {}

    def status_of(session, request) -> str:
        note = notes.get(router.user_of(request))
        return f"{note}  \n{status_markdown(session)}" if note else status_markdown(session)

    def send(text, history, request: gr.Request):
        session = router.session_for(request)
        text = (text or "").strip()
        if not text:
            yield history, "", gr.skip(), gr.skip(), gr.skip()
            return
        if text.startswith("/"):
            yield (visible_history(session), "") + command(text.split()[0].lower(), request)
            return
        notes.pop(router.user_of(request), None)  # a new turn: the last command's answer is old news
        try:
            session, stream = router.call(request, lambda current: (current, current.send(text)))
        except ChatError as err:  # a message over --max_message_chars: refused before it costs anything
            yield history, gr.skip(), f"**not sent:** {err}  \n{status_markdown(session)}", gr.skip(), gr.skip()
            return
        history = list(history or []) + [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        yield history, "", status_markdown(session), gr.skip(), gr.skip()
        # the box was cleared above; skip it from now on so the user can type the next message meanwhile
        for piece in stream:
            history[-1]["content"] += piece
            yield history, gr.skip(), gr.skip(), gr.skip(), gr.skip()
        history[-1]["content"] = stream.reply().text or "(empty reply)"
        yield history, gr.skip(), status_markdown(session), gr.skip(), gr.skip()

    def command(name, request: gr.Request):
        """(status, why highlights, why caption) after a command of the request's own user."""
        return router.call(request, lambda session: command_on(session, name, request))

    def command_on(session, name, request):
        if name == "/why":
            view = session.why()
            return status_markdown(session), why_highlights(view), why_caption(view)
        if name == "/undo":
            message = session.undo()
        elif name == "/save":
            message = save_line(session.save)  # a full disk: our one line, not Gradio's generic error
        elif name == "/reset":
            message = session.reset()
        elif name == "/new":
            message = session.new_conversation()
        elif name == "/quit" and multi_user:
            # one user may not stop the server for the others: /quit ends (and saves) their own session
            saved = save_line(lambda: router.close_user(router.user_of(request)))
            notes[router.user_of(request)] = f"{saved}; your session ended (a new message starts it again)"
            return notes[router.user_of(request)], gr.skip(), gr.skip()
        elif name == "/quit":
            message = "saving and stopping the server ..."
            if quit_event is not None:
                quit_event.set()
        else:
            message = f"unknown command {name}; commands: /undo /save /reset /why /new /quit"
        notes[router.user_of(request)] = message
        return status_of(session, request), gr.skip(), gr.skip()

    def command_button(name):
        def press(request: gr.Request):
            return command(name, request)
        return press

    def poll_status(request: gr.Request):
        session = router.open_session_of(request)
        if session is None:
            return notes.get(router.user_of(request)) or "session ended: a new message starts it again"
        return status_of(session, request)

    def on_load(request: gr.Request):
        session = router.session_for(request)
        return visible_history(session), status_markdown(session), f"user `{router.user_of(request)}`"

    title = f"SDPO live chat - {config.model}"
    with gr.Blocks(title="SDPO live chat") as app:
        gr.Markdown(f"### {title}\nEvery message you send after a reply is the follow-up for that reply: "
                    f"the model takes one SDPO update on it (lr {config.lr:g}, "
                    f"{'LoRA r=' + str(config.lora_r) if config.use_lora else 'all weights'}, "
                    f"min_signal {config.min_signal:g}) while you read the next reply.")
        who = gr.Markdown("", elem_id="user")
        chatbot = gr.Chatbot(label="conversation", height=380, elem_id="chat", buttons=[], feedback_options=None)
        with gr.Row():
            box = gr.Textbox(placeholder=PLACEHOLDER, show_label=False, scale=8, elem_id="message", autofocus=True)
            send_button = gr.Button("Send", variant="primary", scale=1, elem_id="send")
        with gr.Row():
            buttons = {name: gr.Button(name, size="sm", elem_id=f"cmd-{name[1:]}")
                       for name in ("/undo", "/save", "/reset", "/why", "/new", "/quit")}
        status = gr.Markdown("connecting ...", elem_id="status")  # replaced once the page is live
        why_text = gr.HighlightedText(label=WHY_LABEL, elem_id="why", combine_adjacent=False, show_legend=False)
        why_note = gr.Markdown("", elem_id="why-note")
        outputs = [chatbot, box, status, why_text, why_note]
        box.submit(send, [box, chatbot], outputs)
        send_button.click(send, [box, chatbot], outputs)
        for name, button in buttons.items():
            button.click(command_button(name), None, [status, why_text, why_note])
        # the update runs after the reply: poll so its status line appears without a click
        gr.Timer(1.0).tick(poll_status, None, status, show_progress="hidden")
        app.load(on_load, None, [chatbot, status, who])
    return app


def offline_theme():
    import gradio as gr

    # system fonts only: Gradio's default theme fetches web fonts, which an offline browser waits for
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def serve(router: SessionRouter, config, credentials: list[tuple[str, str]] | None = None) -> None:
    """Run the web UI until Ctrl-C, SIGTERM / SIGHUP or (single user) the /quit button; then save every open
    session."""
    from auxiliary.chat.session import ChatTerminated

    quit_event = threading.Event()
    app = build_app(router, config, quit_event)
    app.queue(default_concurrency_limit=1)  # turns are served one at a time, in order
    try:  # the start is inside: a signal while the server starts leaves through the same end (saves, exit 128+n)
        app.launch(server_name=config.host, server_port=config.port, prevent_thread_lock=True, quiet=True,
                   theme=offline_theme(), footer_links=[], auth=credentials or None)
        logins = f", {len(credentials)} logins" if credentials else ""
        print(f"web UI on http://{config.host}:{config.port} (Ctrl-C or the /quit button to stop{logins})",
              flush=True)
        while not quit_event.wait(0.5):
            pass
    except (KeyboardInterrupt, ChatTerminated) as stop:  # Ctrl-C, `kill PID`, a closed terminal: save all
        if isinstance(stop, ChatTerminated):
            print(f"{stop}: saving every open session before leaving", flush=True)
    finally:  # any way out (a port in use included) saves every open session
        print("saving the adapter ...", flush=True)
        for saved in router.close_all().values():
            print(saved, flush=True)
        app.close()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
