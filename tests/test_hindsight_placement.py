"""--hindsight_placement last_user_message|separate_turn reaches every path that builds xo: online updater,
offline collator (as main_offline_sdpo builds it) and the chat; the new flags are in both entry points' --help."""
import pytest

from auxiliary.runtime.tiny_model import build_tiny_model
from sdpo_objective import hindsight_messages, render_context_ids

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a short email."}]
FOLLOWUP = "Use a formal tone."


def separate_turn_ids(tokenizer):
    return render_context_ids(tokenizer, hindsight_messages(MESSAGES, FOLLOWUP, placement="separate_turn"))


def test_the_two_placements_render_differently(tiny_tokenizer):
    separate = tiny_tokenizer.decode(separate_turn_ids(tiny_tokenizer))
    inline = tiny_tokenizer.decode(render_context_ids(tiny_tokenizer, hindsight_messages(MESSAGES, FOLLOWUP)))
    assert separate != inline
    assert "Write a short email.<|im_end|>\n<|im_start|>user\n=== HINDSIGHT CONTEXT ===" in separate
    assert "Write a short email.\n\n=== HINDSIGHT CONTEXT ===" in inline


def test_online_updater_renders_the_separate_turn(tiny_tokenizer):
    from online_sdpo_updater import OnlineSDPOUpdater
    from online_sdpo_updater_config import OnlineSDPOConfig

    config = OnlineSDPOConfig(model="tiny", device="cpu", hindsight_placement="separate_turn")
    updater = OnlineSDPOUpdater(config, build_tiny_model(tiny_tokenizer, seed=0), tiny_tokenizer)
    _, batch_xo, _ = updater.build_batches([MESSAGES], [[5, 6, 2]], [FOLLOWUP])
    expected = separate_turn_ids(tiny_tokenizer)
    assert batch_xo.input_ids[0, batch_xo.context_width - len(expected):batch_xo.context_width].tolist() == expected


def test_offline_collator_renders_the_separate_turn(tiny_tokenizer):
    from offline_sdpo.offline_sdpo_trainer import SDPOCollator

    record = {"prompt": MESSAGES, "completion": "Dear manager.", "user_response": FOLLOWUP}
    encoded = SDPOCollator(tiny_tokenizer, hindsight_placement="separate_turn").encode(record)
    assert encoded["xo_ids"] == separate_turn_ids(tiny_tokenizer)
    assert SDPOCollator(tiny_tokenizer).encode(record)["xo_ids"] != encoded["xo_ids"]


def test_main_offline_passes_the_placement_to_its_collator(tiny_model_dir, tmp_path, monkeypatch):
    import offline_sdpo.offline_sdpo_trainer as trainer_module
    from offline_sdpo.main_offline_sdpo import main
    from reliability_helpers import run_in_process
    from test_offline_training import common_flags

    placements = []

    class RecordingCollator(trainer_module.SDPOCollator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            placements.append(self.hindsight_placement)

    monkeypatch.setattr(trainer_module, "SDPOCollator", RecordingCollator)
    run_in_process(main, common_flags(tiny_model_dir, tmp_path / "out") + ["--max_steps", "1", "--batch_size", "1",
                                                                "--grad_accum", "1",
                                                                "--hindsight_placement", "separate_turn"])
    assert placements == ["separate_turn"]


def test_chat_signal_uses_the_placement(tmp_path, tiny_tokenizer):
    from auxiliary.chat.session import PendingReply
    from auxiliary.runtime.generation import GeneratedResponse
    from sdpo_objective import compute_signal
    from test_chat_session import make_session

    session = make_session(tmp_path, tiny_tokenizer, hindsight_placement="separate_turn")
    reply = GeneratedResponse(text="Dear", ids=[5, 6, 2], finished=True)
    signal = session.hindsight_signal(PendingReply(MESSAGES, reply), FOLLOWUP)
    context_x = render_context_ids(tiny_tokenizer, MESSAGES)
    expected = compute_signal(session.updater.model, [context_x], [separate_turn_ids(tiny_tokenizer)], [[5, 6, 2]],
                              tiny_tokenizer.pad_token_id)[0]["signal"]
    assert signal == pytest.approx(expected, abs=1e-6)


def test_the_online_debug_print_shows_the_separate_turn(tiny_tokenizer):
    import torch

    from auxiliary.evals.online_report import debug_example_text
    from auxiliary.runtime.generation import GeneratedResponse
    from sdpo_objective import DEFAULT_HINDSIGHT_TEMPLATE

    reply = GeneratedResponse(text="Dear", ids=[5, 6, 2], finished=True)
    text = debug_example_text(tiny_tokenizer, MESSAGES, reply, FOLLOWUP, torch.zeros(3), DEFAULT_HINDSIGHT_TEMPLATE,
                              "separate_turn")
    assert tiny_tokenizer.decode(separate_turn_ids(tiny_tokenizer)) in text


def test_bad_placement_fails_clearly():
    from offline_sdpo.main_offline_sdpo import OfflineSDPOArguments
    from online_sdpo_updater_config import OnlineSDPOConfig

    for config in (OnlineSDPOConfig, OfflineSDPOArguments):
        with pytest.raises(ValueError, match="unknown --hindsight_placement 'end'; "
                                             "choose one of last_user_message, separate_turn"):
            config(hindsight_placement="end")


@pytest.mark.parametrize("module", ["eval_online_sdpo", "offline_sdpo.main_offline_sdpo"])
def test_new_objective_flags_are_in_help(module, capsys):
    import importlib

    with pytest.raises(SystemExit) as exited:
        importlib.import_module(module).main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--divergence", "--divergence_alpha", "--teacher", "--teacher_ema_rate", "--hindsight_placement"):
        assert f"{flag} " in out, flag


def test_the_offline_trainers_read_the_paper_placeholder_too():
    from offline_sdpo.main_offline_sdpo import OfflineSDPOArguments

    args = OfflineSDPOArguments(hindsight_template="\n\n(later: {follow_up})")
    assert args.hindsight_template == "\n\n(later: {followup})"
    with pytest.raises(ValueError, match="must contain the placeholder"):
        OfflineSDPOArguments(hindsight_template="no placeholder here")
