"""Web chat logins without a browser: each login gets its own ChatSession (conversation, adapter),
one user's commands never reach another's session, a public address needs --auth. The Gradio
part runs the real app in-process with Gradio's own client logging in as two users."""
import socket
from types import SimpleNamespace

import pytest

from auxiliary.chat.session import ChatError
from auxiliary.chat.web import SessionRouter, WebSetupError, parse_credentials, web_credentials
from chat_sdpo import ChatConfig, main, merge_repeated_flag


class FakeStream:
    def __init__(self, text):
        self.text = text

    def __iter__(self):
        yield self.text

    def reply(self):
        return SimpleNamespace(text=self.text)


class FakeSession:
    """Stands in for a ChatSession: records what was asked of it."""

    def __init__(self, user):
        self.user = user
        self.messages, self.commands = [], []
        self.updates_applied = self.updates_skipped = 0
        self.last_report = None
        self.closed = False

    def send(self, text):
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": f"reply to {self.user}"}]
        return FakeStream(f"reply to {self.user}")

    def busy(self):
        return False

    def reset(self):
        self.commands.append("/reset")
        return "reset"

    def save(self):
        self.commands.append("/save")
        return f"/adapters/{self.user}/adapter"

    def close(self):
        self.closed = True
        self.commands.append("close")
        return f"/adapters/{self.user}/adapter"


def request(user):
    return SimpleNamespace(username=user)


def make_router(default_user=None):
    opened = {}

    def open_session(user):
        opened.setdefault(user, []).append(FakeSession(user))
        return opened[user][-1]
    return SessionRouter(open_session, default_user=default_user), opened


def test_each_login_gets_its_own_session_and_keeps_it():
    router, opened = make_router()
    alice, bob = router.session_for(request("alice")), router.session_for(request("bob"))
    assert alice is not bob and (alice.user, bob.user) == ("alice", "bob")
    assert router.session_for(request("alice")) is alice and len(opened["alice"]) == 1
    with pytest.raises(ChatError, match="not logged in"):
        router.session_for(request(None))
    assert router.close_user("alice") == "/adapters/alice/adapter" and alice.closed and not bob.closed
    assert router.open_session_of(request("alice")) is None  # polling does not reopen it
    assert router.session_for(request("alice")) is not alice  # a new message does
    assert set(router.close_all()) == {"alice", "bob"} and bob.closed


def test_without_logins_every_request_is_the_single_local_user():
    router, opened = make_router(default_user="me")
    assert router.session_for(request(None)) is router.session_for(request("me"))
    with pytest.raises(ChatError, match="serves user 'me' only"):
        router.session_for(request("mallory"))
    assert list(opened) == ["me"]


def test_credentials_parsing_and_refusals(tmp_path):
    assert parse_credentials(["alice:pw:with:colons", "bob:x"], "--auth") == [("alice", "pw:with:colons"), ("bob", "x")]
    for bad, reason in (("alice", "USER:PASS"), ("alice:", "non-empty password"), ("../etc:pw", "letters, digits"),
                        ("a b:pw", "letters, digits")):
        with pytest.raises(WebSetupError, match=reason):
            parse_credentials([bad], "--auth")
    with pytest.raises(WebSetupError, match="given twice"):
        parse_credentials(["a:1", "a:2"], "--auth")
    logins = tmp_path / "logins"
    logins.write_text("# team\ncarol:secret\n\n")
    config = ChatConfig(model="tiny-test", ui="web", host="0.0.0.0", auth=["alice:pw"], auth_file=str(logins))
    assert web_credentials(config) == [("alice", "pw"), ("carol", "secret")]
    with pytest.raises(WebSetupError, match="0.0.0.0 is reachable from other machines: pass --auth"):
        web_credentials(ChatConfig(model="tiny-test", ui="web", host="0.0.0.0"))
    assert web_credentials(ChatConfig(model="tiny-test", ui="web", host="127.0.0.1")) == []


def test_repeated_auth_flags_are_merged():
    assert merge_repeated_flag(["--auth", "a:1", "--port", "1", "--auth", "b:2"], "--auth") == \
        ["--port", "1", "--auth", "a:1", "b:2"]


def test_public_address_without_auth_exits_2_before_loading(capsys):
    assert main(["--ui", "web", "--host", "0.0.0.0", "--model", "does-not-exist"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --host 0.0.0.0 is reachable") and "\n" not in err


def test_logins_are_masked_in_saved_configs():
    from online_sdpo_updater import public_config

    saved = public_config(ChatConfig(model="tiny-test", auth=["alice:pw"], auth_file="/x").to_dict())
    assert saved["auth"] == "***" and saved["auth_file"] == "***"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_gradio_app_routes_two_logins_to_their_own_sessions():
    """The real app, Gradio's auth and Gradio's client: bob's /reset never reaches alice's session."""
    pytest.importorskip("gradio")
    client_module = pytest.importorskip("gradio_client")
    from auxiliary.chat.web import build_app

    router, opened = make_router()
    config = ChatConfig(model="tiny-test", ui="web")
    app = build_app(router, config)
    app.queue(default_concurrency_limit=1)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
               auth=[("alice", "pa"), ("bob", "pb")])
    try:
        url = f"http://127.0.0.1:{port}/"
        with pytest.raises(Exception):
            client_module.Client(url, auth=("alice", "wrong"), verbose=False)
        alice = client_module.Client(url, auth=("alice", "pa"), verbose=False)
        bob = client_module.Client(url, auth=("bob", "pb"), verbose=False)
        history = alice.predict("hello from alice", [], api_name="/send")[0]
        content = history[-1]["content"]  # Gradio 6 returns a message's content as a list of parts
        text = "".join(part["text"] for part in content) if isinstance(content, list) else content
        assert text == "reply to alice"
        bob.predict("/reset", [], api_name="/send")
        assert opened["bob"][0].commands == ["/reset"]
        assert opened["alice"][0].commands == []  # alice's adapter untouched by bob's command
        assert [m["content"] for m in opened["alice"][0].messages] == ["hello from alice", "reply to alice"]
        assert opened["bob"][0].messages == []  # bob never sees alice's conversation
    finally:
        app.close()


def test_a_full_disk_on_web_save_or_quit_shows_our_one_line_not_gradios_error(tmp_path):
    """The real app and Gradio's client: /save (and a login's /quit, which saves) on a full disk answer with the
    terminal chat's `cannot write PATH` line, and the chat goes on."""
    import errno

    pytest.importorskip("gradio")
    client_module = pytest.importorskip("gradio_client")
    from auxiliary.chat.web import build_app

    adapter = tmp_path / "alice" / "adapter"

    class FullDisk(FakeSession):
        def save(self):
            raise OSError(errno.ENOSPC, "No space left on device", str(adapter))

        def close(self):
            self.closed = True
            self.save()

    router = SessionRouter(FullDisk)
    app = build_app(router, ChatConfig(model="tiny-test", ui="web"))
    app.queue(default_concurrency_limit=1)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
               auth=[("alice", "pa")])
    line = f"error: cannot write {adapter}: No space left on device (the disk is full: free space or choose another " \
           "output folder)"
    try:
        alice = client_module.Client(f"http://127.0.0.1:{port}/", auth=("alice", "pa"), verbose=False)
        status = alice.predict("/save", [], api_name="/send")[2]
        assert status.splitlines()[0].strip() == line
        assert alice.predict("/quit", [], api_name="/send")[2] == \
            f"{line}; your session ended (a new message starts it again)"
        history = alice.predict("still here?", [], api_name="/send")[0]  # the chat goes on: a new session
        assert len(history) == 2
    finally:
        app.close()


def test_a_port_in_use_is_refused_before_the_model_loads(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["--ui", "web", "--port", str(port), "--model", str(tmp_path / "not_loaded_yet"),
                     "--adapters_dir", str(tmp_path / "adapters")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --port {port} on 127.0.0.1 cannot be used (Address already in use): choose another --port"]
    assert not (tmp_path / "adapters").exists()
