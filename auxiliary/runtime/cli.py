"""Dataclass configs as CLI flags and YAML keys (HfArgumentParser), with `--config file.yaml`.

Precedence: dataclass defaults < YAML files (in order) < command-line flags. Fields may declare
alias spellings (metadata["aliases"]), accepted as flags and YAML keys; `--print_config` prints
the resolved settings and exits.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence


class ConfigError(ValueError):
    pass


PRINT_CONFIG_FLAG = "--print_config"


def _split_config_flags(argv: Sequence[str]) -> tuple[list[str], bool, list[str]]:
    """(--config paths in order, whether --print_config was given, the other arguments)."""
    rest, config_paths, print_config = [], [], False
    argv = list(argv)
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--config":
            if index + 1 >= len(argv):
                raise ConfigError("--config needs a YAML file path")
            config_paths.append(argv[index + 1])
            index += 2
            continue
        if arg.startswith("--config="):
            config_paths.append(arg.split("=", 1)[1])
        elif arg == PRINT_CONFIG_FLAG:
            print_config = True
        else:
            rest.append(arg)
        index += 1
    return config_paths, print_config, rest


def field_aliases(classes: Sequence[type]) -> dict[str, str]:
    """Other spellings of fields (metadata["aliases"], e.g. learning_rate -> lr), without dashes."""
    aliases = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            for alias in f.metadata.get("aliases", ()):
                aliases[alias.lstrip("-")] = f.name
    return aliases


def _canonical_argv(argv: list[str], aliases: dict[str, str]) -> list[str]:
    """Flags spelled by an alias renamed to their field; an alias and its field with different values is an error."""
    out, given = [], {}  # field -> (spelling, value) of the first flag seen for it
    for index, arg in enumerate(argv):
        if not arg.startswith("--"):
            out.append(arg)
            continue
        name, eq, inline = arg[2:].partition("=")
        canonical = aliases.get(name, name)
        if canonical in aliases.values():
            value = inline if eq else (argv[index + 1] if index + 1 < len(argv) and not argv[index + 1].startswith("--") else "")
            spelling, earlier = given.setdefault(canonical, (name, value))
            if spelling != name and earlier != value:
                raise ConfigError(f"--{spelling} {earlier} and --{name} {value} set the same setting ({canonical}) "
                                  "to different values: give one of them")
        out.append(f"--{canonical}{eq}{inline}" if canonical != name else arg)
    return out


def _canonical_yaml(values: dict, aliases: dict[str, str], path: str) -> dict:
    out, spelled = {}, {}
    for key, value in values.items():
        canonical = aliases.get(key, key)
        if canonical in out and out[canonical] != value:
            raise ConfigError(f"{path}: {spelled[canonical]}: {out[canonical]!r} and {key}: {value!r} set the same "
                              f"setting ({canonical}) to different values: keep one of them")
        out[canonical], spelled[canonical] = value, key
    return out


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
    """Parse flags (and optional --config YAML files) into instances of `classes` (a tuple, same order).

    Precedence: dataclass defaults < each --config file in order < flags. Alias spellings of a
    field are accepted as flags and YAML keys. `--print_config` prints the resolved settings as
    YAML (secrets masked) and exits 0 before the caller loads or writes anything.
    """
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    config_paths, print_config, rest = _split_config_flags(argv)
    aliases = field_aliases(classes)
    rest = _canonical_argv(rest, aliases)
    parser = HfArgumentParser(list(classes), prog=prog)
    parser.add_argument("--config", default=None, action="append",
                        help="YAML file whose keys are any of these flags (several: later ones win; flags win over all)")
    parser.add_argument(PRINT_CONFIG_FLAG, action="store_true",
                        help="print the resolved settings (defaults < YAML < flags) as YAML and exit")
    known = {f.name for cls in classes for f in dataclasses.fields(cls)}
    values: dict = {}
    for config_path in config_paths:
        loaded = _canonical_yaml(load_yaml_config(config_path), aliases, config_path)
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise ConfigError(f"{config_path}: unknown keys {unknown}")
        values.update(loaded)
    if values:
        parser.set_defaults(**values)
    parsed = tuple(parser.parse_args_into_dataclasses(args=rest)[: len(classes)])
    if print_config:
        print(resolved_config_yaml(parsed), end="")
        raise SystemExit(0)
    return parsed


def resolved_config_yaml(instances: Sequence) -> str:
    """The settings of parsed dataclass instances as one YAML mapping, secrets masked."""
    import yaml

    from auxiliary.runtime.secrets import public_config

    merged: dict = {}
    for instance in instances:
        merged.update(dataclasses.asdict(instance))
    return yaml.safe_dump(public_config(merged), sort_keys=False, default_flow_style=False)


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
    finally:
        stop_vllm_engines()
    return 0


def stop_vllm_engines() -> None:
    """Stop the vLLM engines a command started (none unless it imported the adapter, so no import here)."""
    adapter = sys.modules.get("auxiliary.runtime.vllm_adapter")
    if adapter is not None:
        adapter.shutdown_engines()
