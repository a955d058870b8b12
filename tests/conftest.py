"""Shared fixtures: tiny models built on the spot, nothing from the network."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from auxiliary.runtime.tiny_model import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    from auxiliary.runtime.tiny_model import build_tiny_model

    return build_tiny_model(tiny_tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny model folder (config, weights, tokenizer with chat template)."""
    from auxiliary.runtime.tiny_model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def prompt_dir(tmp_path_factory):
    """prompt_dir(name, train, eval) -> a folder with train.jsonl and validation.jsonl of those prompts
    (one `{"prompt": ...}` line each), the online tests' data."""
    import json

    def make(name: str, train: list[str], evaluation: list[str]):
        folder = tmp_path_factory.mktemp(name)
        for file, prompts in (("train.jsonl", train), ("validation.jsonl", evaluation)):
            (folder / file).write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        return folder

    return make
