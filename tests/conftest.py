"""Shared fixtures: tiny models built on the spot, nothing from the network."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
# One torch thread per process (set before torch is imported; children inherit it): the suite runs many tiny models
# and child processes, on two pytest-xdist workers under `make test`, on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

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


def pytest_configure(config):
    """Under `--dist loadfile` pytest-xdist queues the files by their number of tests, most first, unless told not
    to: then the few-test files that take longest (two-process runs, end-to-end runs) came last and left one worker
    alone at the end, and test_first_hour.py, which waits for its commands, came early. Here the files go in the
    order pytest_collection_modifyitems gives."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    """Files with a test marked slow first, in the order collected, then the rest (short ones fill the end on both
    workers); docs/first_hour.md's commands (tests/test_first_hour.py) run in the background from the first test on
    (first_hour_runs), beside the rest of the suite, and their tests come last, when the results are in."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (item.path.name == "test_first_hour.py", item.path not in slow_files))


@pytest.fixture(scope="session", autouse=True)
def first_hour_runs(request, tmp_path_factory):
    """The folder where the page's commands this session selected run and leave their results
    (test_first_hour.started and .finished); None when it selected none or .venv/bin/python is missing.
    They run once per session: under pytest-xdist the first worker here starts them in the folder all workers share
    (the run's temporary folder, above each worker's own), the others read their results there."""
    selected = [item.callspec.params["name"] for item in request.session.items
                if item.path.name == "test_first_hour.py" and item.originalname == "test_the_command_runs_as_written"]
    if not selected:
        yield None
        return
    import test_first_hour

    if not test_first_hour.PYTHON.exists():
        yield None
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    root = (tmp_path_factory.getbasetemp().parent if worker else tmp_path_factory.getbasetemp()) / "first_hour"
    try:
        root.mkdir()  # atomic: one worker creates it and runs the commands
    except FileExistsError:
        yield root
        return
    # One process alone drops the commands not yet started when it stops early; a worker waits for all of them,
    # since the page's tests may be another worker's.
    with test_first_hour.started(selected, root, drop_queued_at_exit=not worker):
        yield root
