"""Dataclass configs as CLI flags and YAML keys (HfArgumentParser), with `--config file.yaml`.

Precedence: dataclass defaults < YAML file < command-line flags.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence


class ConfigError(ValueError):
    pass


def _split_config_flag(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    rest, config_path = [], None
    argv = list(argv)
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--config":
            if index + 1 >= len(argv):
                raise ConfigError("--config needs a YAML file path")
            config_path = argv[index + 1]
            index += 2
            continue
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        index += 1
    return config_path, rest


def load_yaml_config(path: str) -> dict:
    import yaml

    file = Path(path)
    if not file.exists():
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value at the top level")
    return data


def parse_dataclasses(classes: Sequence[type], argv: Sequence[str] | None = None, prog: str | None = None):
    """Parse flags (and an optional --config YAML) into instances of `classes` (a tuple, same order)."""
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    config_path, rest = _split_config_flag(argv)
    parser = HfArgumentParser(list(classes), prog=prog)
    parser.add_argument("--config", default=None, help="YAML file whose keys are any of these flags")
    if config_path:
        values = load_yaml_config(config_path)
        known = {f.name for cls in classes for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{config_path}: unknown keys {unknown}")
        parser.set_defaults(**values)
    parsed = parser.parse_args_into_dataclasses(args=rest)
    return tuple(parsed[: len(classes)])


def run_cli(args_class: type, run: Callable, argv: Sequence[str] | None, prog: str) -> int:
    """Parse one dataclass of flags and call run(args); bad input prints one `error:` line and exits 2."""
    from auxiliary.runtime.io_utils import DataError, describe_os_error
    from auxiliary.runtime.model_loading import ModelLoadError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        (args,) = parse_dataclasses((args_class,), argv, prog=prog)
        run(args)
    except (ConfigError, DataError, ModelLoadError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {describe_os_error(err)}", file=sys.stderr)
        return 2
    return 0
