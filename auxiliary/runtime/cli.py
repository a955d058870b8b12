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
            value = inline if eq else (argv[index + 1] if index + 1 < len(argv)
                                       and not argv[index + 1].startswith("--") else "")
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


def _strict_yaml_loader():
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently) and
    remembers the line of each top-level key (for the type errors)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        key_lines: dict = {}

        def get_single_node(self):
            self.root = super().get_single_node()
            return self.root

        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, str) and key in seen:
                    raise ConfigError(f"{line}: key {key!r} is given twice (also on line {seen[key]}); keep one")
                seen[key] = line
            if node is getattr(self, "root", None):
                self.key_lines = seen
            return super().construct_mapping(node, deep)

    return StrictLoader


def yaml_error_line(path: str, err) -> str:
    """PyYAML's several-line report as one line: file, line and column of the problem, and what it is."""
    mark = getattr(err, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    what = " ".join(part for part in (getattr(err, "context", None), getattr(err, "problem", None)) if part)
    return f"{where}: invalid YAML: {what or str(err).splitlines()[0]}"


def load_yaml_config(path: str, key_lines: dict | None = None) -> dict:
    """The top-level mapping of a YAML file; `key_lines` (if given) receives each key's line number."""
    import yaml

    file = Path(path)
    if not file.exists():
        raise ConfigError(f"config file {path} not found")
    if file.is_dir():
        raise ConfigError(f"config file {path} is a folder; --config takes a YAML file")
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{err.object[err.start]:02x}); "
                          "save the config as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror or err}") from None
    loader = _strict_yaml_loader()(text)
    try:
        data = loader.get_single_data() or {}
    except yaml.YAMLError as err:
        raise ConfigError(yaml_error_line(path, err)) from None
    except ConfigError as err:
        raise ConfigError(f"{path}:{err}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value at the top level")
    if key_lines is not None:
        key_lines.update(loader.key_lines)
    return data


def _type_name(kind) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number", str: "text"}.get(kind, str(kind))


def check_value_type(key: str, value, kind) -> str | None:
    """Why `value` does not fit the field type `kind` (None when it fits). YAML values bypass the
    command-line parser's conversion, so each is checked here: a bool is not a number, 1.5 is not a
    whole number, a number is not text, and a list must hold its element type."""
    import types
    import typing

    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):  # Optional[X], X | None
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        return check_value_type(key, value, kinds[0]) if len(kinds) == 1 else None
    if origin in (list, tuple):
        element = args[0] if args else None
        if not isinstance(value, list):  # one value, as the flag takes it (`eval_styles: a b` splits later)
            problem = check_value_type(key, value, element) if element is not None else None
            return f"expected a list, got {value!r}" if problem else None
        for item in value:
            problem = check_value_type(key, item, element) if element is not None else None
            if problem:
                return f"in the list: {problem}"
        return None
    if kind in (bool, int, float) and isinstance(value, str):
        # text is converted as the flag's text would be (YAML reads 5e-6, without a dot, as text)
        return None if _converts(value, kind) else f"expected {_type_name(kind)}, got {value!r}"
    if kind is bool:
        return None if isinstance(value, bool) else f"expected {_type_name(bool)}, got {value!r}"
    if kind is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else \
            f"expected {_type_name(int)}, got {value!r}"
    if kind is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else \
            f"expected {_type_name(float)}, got {value!r}"
    if kind is str:
        hint = f" (quote it: '{value}')" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
        return None if isinstance(value, str) else f"expected {_type_name(str)}, got {value!r}{hint}"
    return None  # a type this check does not know: the field's own validation decides


def _converts(text: str, kind) -> bool:
    if kind is bool:
        return text.strip().lower() in ("yes", "true", "t", "y", "1", "no", "false", "f", "n", "0")
    try:
        kind(text)
    except ValueError:
        return False
    return True


def check_yaml_types(values: dict, classes: Sequence[type], path: str, key_lines: dict) -> None:
    """Every YAML value against its field's declared type: one line naming the file, line and key."""
    import typing

    types = {}
    for cls in classes:
        types.update(typing.get_type_hints(cls))
    for key, value in values.items():
        if key in types:
            problem = check_value_type(key, value, types[key])
            if problem:
                line = key_lines.get(key)
                raise ConfigError(f"{path}{f':{line}' if line else ''}: {key}: {problem}")


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
                        help="YAML file whose keys are any of these flags "
                             "(several: later ones win; flags win over all)")
    parser.add_argument(PRINT_CONFIG_FLAG, action="store_true",
                        help="print the resolved settings (defaults < YAML < flags) as YAML and exit")
    known = {f.name for cls in classes for f in dataclasses.fields(cls)}
    values: dict = {}
    for config_path in config_paths:
        key_lines: dict = {}
        loaded = _canonical_yaml(load_yaml_config(config_path, key_lines), aliases, config_path)
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise ConfigError(f"{config_path}: unknown keys {unknown}")
        check_yaml_types(loaded, classes, config_path, {aliases.get(k, k): n for k, n in key_lines.items()})
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


def exit_with_error(message, code: int = 2, prog: str | None = None) -> int:
    """The one way an entry point ends with an error: one `[prog: ]error: message` line on stderr; returns
    `code` (2: bad input, found before anything was written; 1: a started run failed) for sys.exit."""
    print(f"{prog}: error: {message}" if prog else f"error: {message}", file=sys.stderr, flush=True)
    return code


def run_cli(args_class: type, run: Callable, argv: Sequence[str] | None, prog: str) -> int:
    """Parse one dataclass of flags and call run(args); bad input prints one `error:` line and exits 2."""
    from auxiliary.runtime.io_utils import DataError, describe_os_error
    from auxiliary.runtime.model_loading import ModelLoadError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        (args,) = parse_dataclasses((args_class,), argv, prog=prog)
        run(args)
    except (ConfigError, DataError, ModelLoadError, ValueError) as err:
        return exit_with_error(err)
    except OSError as err:
        return exit_with_error(describe_os_error(err))
    finally:
        stop_vllm_engines()
    return 0


def stop_vllm_engines() -> None:
    """Stop the vLLM engines a command started (none unless it imported the adapter, so no import here)."""
    adapter = sys.modules.get("auxiliary.runtime.vllm_adapter")
    if adapter is not None:
        adapter.shutdown_engines()
