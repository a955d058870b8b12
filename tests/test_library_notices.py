"""Library notices a new user should not see (issue #29): DeepSpeed's "Setting accelerator to CPU" line is
dropped by its exact text, and nothing else of DeepSpeed's logger is."""
from __future__ import annotations

import importlib.util
import logging

import pytest


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed not installed")
def test_deepspeed_says_nothing_about_choosing_the_cpu_once_our_model_loading_is_imported(monkeypatch):
    import torch

    import auxiliary.runtime.model_loading  # noqa: F401 (every tool loads its models through it)
    from deepspeed.accelerator import real_accelerator

    collect = Collect()
    logger = logging.getLogger("DeepSpeed")
    logger.addHandler(collect)
    try:
        monkeypatch.setattr(real_accelerator, "ds_accelerator", None)  # detect again, as a fresh process does
        monkeypatch.delenv("DS_ACCELERATOR", raising=False)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
        assert real_accelerator.get_accelerator().device_name() == "cpu"
        logger.warning("a DeepSpeed warning about something else")
    finally:
        logger.removeHandler(collect)
    assert collect.messages == ["a DeepSpeed warning about something else"]
