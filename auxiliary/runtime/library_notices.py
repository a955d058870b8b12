"""Two notices of third-party libraries that tell a user of this project nothing, hidden by their exact text.

- DeepSpeed, when installed, is imported by accelerate/transformers while a model is saved or a Trainer is
  built; on a machine without a GPU it logs "Setting accelerator to CPU. If you have GPU ...". Every tool
  here chooses its device itself (`--device`), so the line is noise; the DeepSpeed logger's other records
  still print.
- alpaca_eval imports `pkg_resources`, whose import warns that it is deprecated: a note to alpaca_eval's
  authors. It is ignored only while our code imports alpaca_eval; every other warning still shows.
"""
from __future__ import annotations

import importlib
import logging
import warnings

DEEPSPEED_LOGGER = "DeepSpeed"
DEEPSPEED_CPU_NOTICE = "Setting accelerator to CPU."
PKG_RESOURCES_NOTICE = "pkg_resources is deprecated as an API"


class _DropMessagesStartingWith(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def hide_deepspeed_cpu_notice() -> None:
    """Drop DeepSpeed's "Setting accelerator to CPU" record (and only it). DeepSpeed creates its logger
    with logging.getLogger, so a filter placed before DeepSpeed is imported stays on it."""
    logger = logging.getLogger(DEEPSPEED_LOGGER)
    if not any(isinstance(f, _DropMessagesStartingWith) for f in logger.filters):
        logger.addFilter(_DropMessagesStartingWith(DEEPSPEED_CPU_NOTICE))


def import_alpaca_eval(submodule: str = ""):
    """`alpaca_eval` (or `alpaca_eval.SUBMODULE`), imported without the pkg_resources deprecation warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PKG_RESOURCES_NOTICE, category=UserWarning)
        return importlib.import_module("alpaca_eval" + (f".{submodule}" if submodule else ""))
