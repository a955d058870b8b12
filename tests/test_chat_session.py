"""ChatSession (the live chat's core) in-process on a tiny model: updates, undo, reset,
min_signal, persistence per user, /why pieces, rendering helpers."""
import json

import pytest
import torch

from auxiliary.chat.session import ChatError, ChatSession, help_text, token_pieces, validate_user_id
from auxiliary.runtime.tiny_model import build_tiny_model
from chat_sdpo import ChatConfig, colour_piece, render_why, signal_level
from online_sdpo_updater import OnlineSDPOUpdater
from sdpo_objective import compute_signal, hindsight_messages, render_context_ids


def make_session(tmp_path, tokenizer, user="alice", min_signal=0.0, undo_depth=10, **config_overrides):
    settings = dict(model="tiny-test", max_new_tokens=6, temperature=0.0, lora_r=4, lora_alpha=8, lr=1e-2)
    settings.update(config_overrides)
    updater = OnlineSDPOUpdater(ChatConfig(**settings), model=build_tiny_model(tokenizer, seed=0), tokenizer=tokenizer)
    session = ChatSession(updater, tmp_path / user, min_signal=min_signal, undo_depth=undo_depth)
    session.load()
    return session


def chat(session, text):
    stream = session.send(text)
    streamed = "".join(stream)
    report = stream.turn_future.result()
    return stream.reply(), streamed, report


def optimizer_tensors(session):
    state = session.updater.optimizer.state_dict()["state"]
    return {f"{index}.{key}": value.clone() for index, values in state.items() for key, value in values.items()}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_differs(a: dict, b: dict):
    assert any(not torch.equal(a[name], b[name]) for name in a)


def test_turns_updates_and_exact_undo(tmp_path, tiny_tokenizer):
    session = make_session(tmp_path, tiny_tokenizer)
    fresh = session.trainable_state()
    reply1, streamed, report = chat(session, "Hello, how are you today?")
    assert report is None and session.updates_applied == 0  # a first message is not a follow-up
    assert streamed.strip() == reply1.text and len(reply1.ids) <= 6
    _, _, report1 = chat(session, "Too long, be concise.")
    assert report1.kind == "update" and report1.update_number == 1 and report1.tokens == len(reply1.ids)
    after_first = session.trainable_state()
    optimizer_first = optimizer_tensors(session)
    assert_differs(fresh, after_first)
    _, _, report2 = chat(session, "Use a formal tone.")
    assert report2.kind == "update" and session.updates_applied == 2 and session.updater.step == 2
    assert_differs(after_first, session.trainable_state())

    assert session.undo().startswith("undone: update 2")
    assert_same(after_first, session.trainable_state())
    assert_same(optimizer_first, optimizer_tensors(session))
    assert session.updates_applied == 1 and session.updater.step == 1
    assert session.undo().startswith("undone: update 1")
    assert_same(fresh, session.trainable_state())
    assert session.undo() == "nothing to undo"
    assert len(session.messages) == 6  # undo changes the weights, never the conversation
    session.close(save=False)


def test_update_scores_the_sampled_ids_with_the_eval_mode_signal(tmp_path, tiny_tokenizer):
    """/why shows A_t of the exact reply ids under x and xo (recomputed here independently)."""
    session = make_session(tmp_path, tiny_tokenizer)
    reply, _, _ = chat(session, "Explain how photosynthesis works in simple terms.")
    x = [{"role": "user", "content": "Explain how photosynthesis works in simple terms."}]
    followup = "No emojis please."
    tok = tiny_tokenizer
    expected = compute_signal(session.updater.model, [render_context_ids(tok, x)],
                              [render_context_ids(tok, hindsight_messages(x, followup))], [reply.ids],
                              tok.pad_token_id)[0]["signal"]
    _, _, report = chat(session, followup)
    view = session.why()
    assert [p for p, _ in view.pieces] == token_pieces(tok, reply.ids)
    assert [v for _, v in view.pieces] == pytest.approx(expected, abs=1e-5)
    assert report.signal_abs_mean == pytest.approx(sum(abs(v) for v in expected) / len(expected), abs=1e-5)
    assert view.followup == followup and view.updated
    logged = [json.loads(line) for line in (tmp_path / "alice" / "interactions.jsonl").read_text().splitlines()]
    assert logged == [dict(logged[0], prompt=x, completion=reply.text, user_response=followup, updated=True)]
    session.close(save=False)


def test_min_signal_skips_and_counts(tmp_path, tiny_tokenizer):
    session = make_session(tmp_path, tiny_tokenizer, min_signal=100.0)
    before = session.trainable_state()
    chat(session, "Give me three tips for better sleep.")
    _, _, report = chat(session, "What is 27 times 4?")
    assert report.kind == "skipped" and report.skipped_total == 1 and session.updates_skipped == 1
    assert "skipped" in report.status_line() and "min_signal 100" in report.status_line()
    assert session.updates_applied == 0 and session.updater.step == 0
    assert_same(before, session.trainable_state())
    assert session.why().updated is False and session.undo() == "nothing to undo"
    session.min_signal = 1e-9  # any real signal passes
    _, _, report = chat(session, "Thanks, that was helpful!")
    assert report.kind == "update" and report.signal_abs_mean >= 1e-9
    session.close(save=False)


def test_reset_gives_the_base_model_and_is_undoable(tmp_path, tiny_tokenizer):
    session = make_session(tmp_path, tiny_tokenizer)
    chat(session, "Hello there")
    chat(session, "Please be more concise.")
    trained = session.trainable_state()
    model = session.updater.model
    ids = torch.tensor([render_context_ids(tiny_tokenizer, [{"role": "user", "content": "Hi"}])])
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=ids).logits
    assert "base model" in session.reset()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base_logits)  # a fresh LoRA adds exactly zero
    assert optimizer_tensors(session) == {}
    assert session.undo().startswith("undone: reset")
    assert_same(trained, session.trainable_state())
    session.close(save=False)


def test_undo_depth_bounds_the_history(tmp_path, tiny_tokenizer):
    session = make_session(tmp_path, tiny_tokenizer, undo_depth=1)
    for text in ("Hello", "Shorter please.", "More formal please."):
        chat(session, text)
    assert session.undo().startswith("undone: update 2")
    assert session.undo() == "nothing to undo"
    session.close(save=False)


def test_adapters_are_per_user_and_reload_exactly(tmp_path, tiny_tokenizer):
    alice = make_session(tmp_path, tiny_tokenizer, user="alice")
    fresh = alice.trainable_state()
    chat(alice, "Hello")
    chat(alice, "Be concise.")
    trained, optimizer = alice.trainable_state(), optimizer_tensors(alice)
    path = alice.close()
    assert path == tmp_path / "alice" / "adapter" and (path / "model" / "adapter_model.safetensors").exists()

    again = make_session(tmp_path, tiny_tokenizer, user="alice")
    assert again.updates_applied == 1 and again.updater.step == 1
    assert_same(trained, again.trainable_state())
    assert_same(optimizer, optimizer_tensors(again))
    bob = make_session(tmp_path, tiny_tokenizer, user="bob")
    assert_same(fresh, bob.trainable_state())  # bob starts from the base model, not from alice
    assert bob.updates_applied == 0
    again.close(save=False)
    bob.close(save=False)


def test_saved_adapter_mismatch_fails_clearly(tmp_path, tiny_tokenizer):
    first = make_session(tmp_path, tiny_tokenizer, user="carol")
    first.close()
    with pytest.raises(ChatError, match="r=4.*--lora_r 8"):
        make_session(tmp_path, tiny_tokenizer, user="carol", lora_r=8)
    with pytest.raises(ChatError, match="adapts base model tiny-test"):
        make_session(tmp_path, tiny_tokenizer, user="carol", model="another-model")


def test_another_lora_target_modules_is_refused_at_load_and_the_adapter_kept(tmp_path, tiny_tokenizer):
    first = make_session(tmp_path, tiny_tokenizer, user="dana", lora_target_modules="q_proj,v_proj")
    chat(first, "Hello there")
    chat(first, "Shorter, please.")
    first.close()
    adapter = tmp_path / "dana" / "adapter"
    saved = {p: p.read_bytes() for p in sorted(adapter.rglob("*")) if p.is_file()}
    with pytest.raises(ChatError, match=r"has --lora_target_modules q_proj,v_proj, this run all-linear; "
                                        r"pass --lora_target_modules q_proj,v_proj to continue it$"):
        make_session(tmp_path, tiny_tokenizer, user="dana")
    assert {p: p.read_bytes() for p in sorted(adapter.rglob("*")) if p.is_file()} == saved  # never overwritten
    again = make_session(tmp_path, tiny_tokenizer, user="dana", lora_target_modules="v_proj,q_proj")
    assert again.updates_applied == 1  # the same modules in another order: loaded
    again.close(save=False)


def test_an_all_linear_adapter_is_named_all_linear_in_one_short_refusal(tmp_path, tiny_tokenizer):
    make_session(tmp_path, tiny_tokenizer, user="gina").close()  # the default, all-linear: peft saves every name
    adapter_config = tmp_path / "gina" / "adapter" / "model" / "adapter_config.json"
    assert len(json.loads(adapter_config.read_text())["target_modules"]) > 2
    with pytest.raises(ChatError) as refused:
        make_session(tmp_path, tiny_tokenizer, user="gina", lora_target_modules="q_proj")
    assert str(refused.value) == (f"{adapter_config}: the saved adapter has --lora_target_modules all-linear, "
                                  "this run q_proj; pass --lora_target_modules all-linear to continue it")


def test_an_adapter_of_another_shape_names_its_file_not_an_optimizer_error(tmp_path, tiny_tokenizer):
    from online_sdpo_updater import CheckpointError

    first = make_session(tmp_path, tiny_tokenizer, user="erin", lora_target_modules="q_proj")
    first.close()
    # adapter_config.json edited to pass the flag checks: the tensors themselves are checked before loading
    config_file = tmp_path / "erin" / "adapter" / "model" / "adapter_config.json"
    assert json.loads(config_file.read_text())["target_modules"] == ["q_proj"]
    other = make_session(tmp_path, tiny_tokenizer, user="frank")
    updater = other.updater
    state_before = {n: p.detach().clone() for n, p in updater.trainable_parameters().items()}
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors: the saved adapter does not fit"):
        updater.load_checkpoint(tmp_path / "erin" / "adapter")
    assert_same(state_before, {n: p.detach().clone() for n, p in updater.trainable_parameters().items()})
    other.close(save=False)


def test_stop_ends_generation_early(tmp_path, tiny_tokenizer):
    session = make_session(tmp_path, tiny_tokenizer, max_new_tokens=50)
    stream = session.send("Tell me a story")
    stream.stop()
    list(stream)
    assert len(stream.reply().ids) == 1  # the criterion is checked after every token
    session.close(save=False)


def test_failed_update_is_reported_and_the_chat_goes_on(tmp_path, tiny_tokenizer):
    session = make_session(tmp_path, tiny_tokenizer)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    session.updater.train_step = broken
    chat(session, "Hello")
    _, _, report = chat(session, "Shorter.")
    assert report.kind == "error" and "out of memory" in report.status_line()
    reply, _, _ = chat(session, "Still there?")
    assert reply.ids and session.updates_applied == 0
    session.close(save=False)


def test_token_pieces_keep_multibyte_characters_whole(tiny_tokenizer):
    text = "héllo 日本 😀 ok"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # byte-level: characters are split across tokens
    pieces = token_pieces(tiny_tokenizer, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_rendering_and_validation():
    assert [signal_level(v) for v in (0.05, -0.2, 0.7, -3.0)] == [0, 1, 2, 3]
    assert colour_piece("word", 0.01) == "word"
    assert colour_piece("bad", -2.0) == "\x1b[48;5;196m\x1b[97mbad\x1b[0m"
    assert colour_piece("a\nb", 0.3) == "\x1b[48;5;194m\x1b[30ma\x1b[0m\n\x1b[48;5;194m\x1b[30mb\x1b[0m"
    from auxiliary.chat.session import WhyView

    view = WhyView([("Sure", -1.0), ("!", -2.0), (" ok", 0.6)], "be formal", -0.8, 1.2, True)
    plain = render_why(view, colour=False)
    assert "\x1b" not in plain and "Sure! ok" in plain and "'!' -2.00, 'Sure' -1.00" in plain
    assert "'ok' +0.60" in plain
    assert "\x1b[48;5;196m" in render_why(view, colour=True)
    assert "nothing to explain" in render_why(None, colour=False)
    from auxiliary.chat.web import why_highlights

    assert why_highlights(view) == [("Sure", 0.5), ("!", 1.0), (" ok", -0.3)]  # red (positive) = written less now
    assert validate_user_id("alice_2.x-y") == "alice_2.x-y"
    for bad in ("", "../x", "a b", ".hidden", "x" * 65):
        with pytest.raises(ChatError):
            validate_user_id(bad)
    assert "/undo" in help_text() and "/quit" in help_text()


def test_bad_flags_fail_before_the_model_loads(tmp_path, capsys):
    from chat_sdpo import main

    assert main(["--model", "no-such-model-anywhere", "--user_id", "../escape", "--adapters_dir", str(tmp_path)]) == 2
    assert "error: --user_id '../escape'" in capsys.readouterr().err
    assert main(["--ui", "gui"]) == 2
    assert "--ui 'gui': choose terminal or web" in capsys.readouterr().err
