"""The factory builds every user and judge kind and loads each model once per run."""
import pytest

from auxiliary.feedback import user_simulator
from auxiliary.feedback.factory import JUDGE_KINDS, USER_SIMULATOR_KINDS, FeedbackFactory


def test_judges_of_every_style_share_one_loaded_model(tiny_model_dir, monkeypatch):
    loads = []
    real = user_simulator.load_local_model
    monkeypatch.setattr(user_simulator, "load_local_model",
                        lambda name, dtype, device: (isinstance(name, str) and loads.append(name)) or
                        real(name, dtype, device))
    factory = FeedbackFactory(device="cpu")
    judges = factory.judges("local", ["concise", "no_emojis", "no_lists"], str(tiny_model_dir), mode="logprob")
    user = factory.user("local", "concise", str(tiny_model_dir), seed=3)
    assert loads == [str(tiny_model_dir)]  # one load from disk for three judges and the user
    models = {id(j.model) for j in judges.values()} | {id(user.model)}
    assert len(models) == 1 and sorted(judges) == ["concise", "no_emojis", "no_lists"]


def test_claude_judges_share_a_client_but_not_with_the_user():
    pytest.importorskip("anthropic")
    factory = FeedbackFactory(api_options={"api_key": "sk-test", "base_url": "http://127.0.0.1:9"})
    judges = factory.judges("claude", ["concise", "no_emojis"], None)
    user = factory.user("claude", "concise", None)
    assert judges["concise"].client is judges["no_emojis"].client
    assert user.client is not judges["concise"].client


def test_unknown_kinds_and_styles_fail_before_loading():
    factory = FeedbackFactory()
    with pytest.raises(ValueError, match="choose one of " + ", ".join(JUDGE_KINDS)):
        factory.judge("gpt4", "concise")
    with pytest.raises(ValueError, match="choose one of " + ", ".join(USER_SIMULATOR_KINDS)):
        factory.user("gpt", "concise")
    with pytest.raises(ValueError, match="known styles|unknown style"):
        factory.judges("local", ["concise", "no_such_style"], "/does/not/exist")
