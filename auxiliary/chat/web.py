"""Web UI of the live chat (Gradio): the terminal chat's session, commands as buttons,
/why as highlighted text. One user per process (see auxiliary/chat/session.py)."""
from __future__ import annotations

import ipaddress
import os
import threading

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home

WHY_LABEL = "/why: signal per token of the last reply that got a follow-up (red: the model would now write it less, purple: more)"
PLACEHOLDER = "Write a message. Everything you write after a reply is feedback for it (commands: /undo /save /reset /why /new)"


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
    last = session.last_report.status_line() if session.last_report else "no update yet: your first follow-up triggers one"
    busy = " - working ..." if session.busy() else ""
    return (f"**updates** applied {session.updates_applied}, skipped {session.updates_skipped}{busy}  \n"
            f"last: `{last}`")


def visible_history(session) -> list[dict]:
    return [m for m in session.messages if m["role"] in ("user", "assistant")]


def build_app(session, config, quit_event: threading.Event | None = None):
    import gradio as gr

    def send(text, history):
        text = (text or "").strip()
        if not text:
            yield history, "", gr.skip(), gr.skip(), gr.skip()
            return
        if text.startswith("/"):
            yield (visible_history(session), "") + command(text.split()[0].lower())
            return
        history = list(history or []) + [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        yield history, "", status_markdown(session), gr.skip(), gr.skip()
        stream = session.send(text)
        # the box was cleared above; skip it from now on so the user can type the next message meanwhile
        for piece in stream:
            history[-1]["content"] += piece
            yield history, gr.skip(), gr.skip(), gr.skip(), gr.skip()
        history[-1]["content"] = stream.reply().text or "(empty reply)"
        yield history, gr.skip(), status_markdown(session), gr.skip(), gr.skip()

    def command(name):
        """(status, why highlights, why caption) after a command."""
        if name == "/why":
            view = session.why()
            return status_markdown(session), why_highlights(view), why_caption(view)
        if name == "/undo":
            message = session.undo()
        elif name == "/save":
            message = f"saved to {session.save()}"
        elif name == "/reset":
            message = session.reset()
        elif name == "/new":
            message = session.new_conversation()
        elif name == "/quit":
            message = "saving and stopping the server ..."
            if quit_event is not None:
                quit_event.set()
        else:
            message = f"unknown command {name}; commands: /undo /save /reset /why /new /quit"
        return f"{message}  \n{status_markdown(session)}", gr.skip(), gr.skip()

    title = f"SDPO live chat - {config.model} - user `{config.user_id}`"
    with gr.Blocks(title="SDPO live chat") as app:
        gr.Markdown(f"### {title}\nEvery message you send after a reply is the follow-up for that reply: "
                    f"the model takes one SDPO update on it (lr {config.lr:g}, "
                    f"{'LoRA r=' + str(config.lora_r) if config.use_lora else 'all weights'}, "
                    f"min_signal {config.min_signal:g}) while you read the next reply.")
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
            button.click(lambda name=name: command(name), None, [status, why_text, why_note])
        # the update runs after the reply: poll so its status line appears without a click
        gr.Timer(1.0).tick(lambda: status_markdown(session), None, status, show_progress="hidden")
        app.load(lambda: (visible_history(session), status_markdown(session)), None, [chatbot, status])
    return app


def offline_theme():
    import gradio as gr

    # system fonts only: Gradio's default theme fetches web fonts, which an offline browser waits for
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def serve(session, config) -> None:
    """Run the web UI until Ctrl-C or the /quit button; then save the adapter."""
    if not _is_loopback(config.host):
        print(f"warning: listening on {config.host}: anyone who reaches this port can chat and change "
              f"user '{config.user_id}'s adapter", flush=True)
    quit_event = threading.Event()
    app = build_app(session, config, quit_event)
    app.queue(default_concurrency_limit=1)  # one model: turns are served one at a time, in order
    app.launch(server_name=config.host, server_port=config.port, prevent_thread_lock=True, quiet=True,
               theme=offline_theme(), footer_links=[])
    print(f"web UI on http://{config.host}:{config.port} (Ctrl-C or the /quit button to stop)", flush=True)
    try:
        while not quit_event.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    print("saving the adapter ...", flush=True)
    path = session.close()
    print(f"saved to {path}", flush=True)
    app.close()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
