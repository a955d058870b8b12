"""The env-var tables of the bash wrappers, generated from the dataclass metadata.

Each wrapper declares its variables (scripts/_common.sh: `sdpo_field NAME --flag` for a setting of
the Python entry point, `sdpo_var NAME DEFAULT MEANING` for the wrapper's own, `sdpo_profile` for
its YAML profile) and prints the declarations with `--list-vars`. This module maps every
`sdpo_field` variable to its dataclass field (aliases included) and prints the field's default,
or the profile's value, and its help text.

    python -m auxiliary.runtime.env_vars --write docs/env_vars.md   # the committed tables
    python -m auxiliary.runtime.env_vars --check docs/env_vars.md   # exit 1 when out of date
    python -m auxiliary.runtime.env_vars --help-for scripts/eval_online_sdpo.sh   # a wrapper's --help
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# wrapper (relative to the repo) -> the dataclasses its entry point parses ("module:Class")
WRAPPERS: dict[str, tuple[str, ...]] = {
    "scripts/eval_online_sdpo.sh": ("online_sdpo_updater_config:OnlineSDPOConfig", "eval_online_sdpo:OnlineRunConfig"),
    "scripts/train_offline_sdpo.sh": ("offline_sdpo.main_offline_sdpo:OfflineSDPOArguments",),
    "scripts/train_offline_sft.sh": ("offline_sdpo.main_offline_sft:OfflineSFTArguments",),
    "scripts/eval_checkpoints.sh": ("auxiliary.eval_checkpoints:EvalCheckpointsArgs",),
    "scripts/eval_incontext_oracle.sh": ("auxiliary.eval_incontext_oracle:OracleArgs",),
    "scripts/run_signal_analysis.sh": ("auxiliary.sdpo_signal_analysis:SignalAnalysisArgs",),
    "scripts/eval_benchmarks.sh": ("auxiliary.evals.benchmarks:BenchmarkArgs",),
    "scripts/prepare_data.sh": (),
    "scripts/slurm/train_offline_sdpo.sbatch": (),
    "scripts/slurm/train_offline_sft.sbatch": (),
}


class EnvVarError(ValueError):
    pass


@dataclass
class Row:
    name: str
    default: str
    meaning: str

    def markdown(self) -> str:
        return f"| `{self.name}` | {self.default} | {self.meaning} |"


@dataclass
class WrapperTable:
    path: str
    description: str
    rows: list[Row]
    common: list[Row]


def _load_class(spec: str) -> type:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _fields_by_flag(classes: tuple[type, ...]) -> dict[str, dataclasses.Field]:
    by_flag = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            by_flag[f.name] = f
            for alias in f.metadata.get("aliases", ()):
                by_flag[alias.lstrip("-")] = f
    return by_flag


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _shown(value, dir_of_file: bool = False) -> str:
    if value is None or value == "" or value == []:
        return "(empty)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (list, tuple)):
        value = " ".join(map(str, value))
    if isinstance(value, float):
        value = f"{value:g}".replace("e-0", "e-")  # 5e-6, as one writes it
    value = str(value)
    if dir_of_file:
        value = os.path.dirname(value)
    return f"`{value}`"


def wrapper_declarations(wrapper: str) -> list[list[str]]:
    """The wrapper's `--list-vars` lines, split on tabs (a clean environment: no .env, no SLURM)."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(SDPO_ENV_FILE="", BASE_WORK="/nonexistent", SDPO_PYTHON=sys.executable)
    result = subprocess.run(["bash", str(REPO / wrapper), "--list-vars"], env=env, capture_output=True, text=True,
                            timeout=60)
    if result.returncode != 0:
        raise EnvVarError(f"{wrapper} --list-vars failed: {result.stderr.strip()}")
    return [line.split("\t") for line in result.stdout.splitlines() if line.strip()]


def _profile_values(path: str | None) -> dict:
    if not path:
        return {}
    import yaml

    return yaml.safe_load((REPO / path).read_text()) or {}


def wrapper_table(wrapper: str) -> WrapperTable:
    if wrapper not in WRAPPERS:
        raise EnvVarError(f"{wrapper}: not a known wrapper (add it to WRAPPERS in {__name__})")
    classes = tuple(_load_class(spec) for spec in WRAPPERS[wrapper])
    by_flag = _fields_by_flag(classes)
    lines = wrapper_declarations(wrapper)
    profile_path = next((line[1] for line in lines if line[0] == "profile"), None)
    profile = _profile_values(profile_path)
    description, rows, common = "", [], []
    for kind, *rest in lines:
        if kind == "description":
            description = rest[0]
        elif kind == "var":
            name, shown, meaning, scope = rest
            if shown != "(empty)" and not shown.startswith("("):
                shown = f"`{shown}`"
            (common if scope == "common" else rows).append(Row(name, shown, meaning))
        elif kind == "field":
            name, flags, shown = (rest + [""])[:3]
            fields = []
            for flag in flags.split():
                f = by_flag.get(flag.lstrip("-"))
                if f is None:
                    raise EnvVarError(f"{wrapper}: {name} maps to {flag}, which is no field of "
                                      f"{', '.join(c.__name__ for c in classes) or 'any dataclass'}")
                fields.append(f)
            first = fields[0]
            if first.name in profile:
                default = f"{_shown(profile[first.name])} ({profile_path})"
            else:
                default = _shown(_field_default(first),
                                 dir_of_file=name.endswith("_DIR") and first.name.endswith("_jsonl"))
            if shown:
                default = shown
            targets = ", ".join(f"`--{f.name}`" for f in fields)
            meaning = first.metadata.get("help", "").replace("|", "/")
            rows.append(Row(name, default, f"{meaning} ({targets})"))
    return WrapperTable(wrapper, description, rows, common)


def _table(rows: list[Row]) -> list[str]:
    return ["| Variable | Default | Meaning |", "|---|---|---|", *(row.markdown() for row in rows)]


def help_text(wrapper: str) -> str:
    table = wrapper_table(wrapper)
    lines = [table.description, "", *_table(table.rows)]
    if table.common:
        lines += ["", "Read by every wrapper:", "", *_table(table.common)]
    return "\n".join(lines) + "\n"


def markdown() -> str:
    tables = [wrapper_table(w) for w in WRAPPERS]
    common = next((t.common for t in tables if t.common), [])
    out = ["# Environment variables of the wrappers",
           "",
           "Generated by `python -m auxiliary.runtime.env_vars --write docs/env_vars.md` from the dataclass",
           "metadata of each entry point and the wrappers' declarations; do not edit by hand (a test compares).",
           "A wrapper passes a flag only for a variable you set (environment or `.env`); an unset one leaves the",
           "default to the entry point, or to the wrapper's YAML profile under `configs/wrappers/` where named.",
           "",
           "## Read by every wrapper",
           "",
           *_table(common)]
    for table in tables:
        out += ["", f"## `{table.path}`", "", table.description, "", *_table(table.rows)]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m auxiliary.runtime.env_vars", description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", metavar="FILE", help="write the tables of every wrapper (markdown)")
    group.add_argument("--check", metavar="FILE", help="exit 1 when FILE differs from the generated tables")
    group.add_argument("--help-for", metavar="WRAPPER", help="print one wrapper's tables (its --help)")
    args = parser.parse_args(argv)
    try:
        if args.help_for:
            path = Path(args.help_for).resolve()
            wrapper = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else args.help_for
            sys.stdout.write(help_text(wrapper))
            return 0
        text = markdown()
    except EnvVarError as err:
        from auxiliary.runtime.cli import exit_with_error

        return exit_with_error(err)
    if args.write:
        Path(args.write).write_text(text)
        return 0
    if Path(args.check).read_text() != text:
        print(f"{args.check} is out of date: python -m auxiliary.runtime.env_vars --write {args.check}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
