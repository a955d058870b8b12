"""Shared logic of the dataset preprocessors (`auxiliary/preprocess_*.py`).

* `load_splits` reads a Hugging Face hub dataset name OR a local file / folder
  (JSONL, JSON array, parquet, a folder of split files, or a `save_to_disk` folder)
  and returns {split: Rows}; every row knows where it came from (file:line), so a bad
  record is reported with its location.
* `normalize_message` / `conversation_messages` accept `role/content` and
  `from/value` (human/gpt) messages.
* `build_interactions` turns one conversation into interaction records: one per
  assistant turn that is directly followed by a user turn, with `prompt` (the last
  `max_history` messages before the assistant turn, starting with a user message and
  alternating), `completion` and `user_response`, ids and lengths (in characters).
* `Summary` counts what was read, kept and dropped (with reasons) and is printed at the end.

Only the standard library is imported at module level, so `--help` of every
preprocessor stays instant and side-effect free; `datasets`/`pyarrow` load lazily.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from auxiliary.runtime.io_utils import DataError, atomic_write_jsonl, describe_os_error, iter_jsonl

MESSAGE_LIST_FIELDS = ("messages", "conversation", "conversations")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
SPLIT_ALIASES = {
    "train": "train",
    "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation",
    "valid1": "validation", "valid2": "validation",
    "test": "test",
}


# --------------------------------------------------------------------------- loading
@dataclass
class Rows:
    """Records of one split plus what is needed to name a record's location in errors."""

    label: str                       # "path/file.jsonl" or "allenai/WildChat[train]"
    records: Sequence[dict]          # a list or a `datasets.Dataset` (len + getitem + iter)
    line_numbers: Sequence[int] | None = None  # JSONL: the file line of each record
    unit: str = "row"

    def __len__(self) -> int:
        return len(self.records)

    def location(self, index: int) -> str:
        if self.line_numbers is not None:
            return f"{self.label}:{self.line_numbers[index]}"
        return f"{self.label} {self.unit} {index}"

    def __iter__(self) -> Iterator[tuple[str, dict]]:
        for index, record in enumerate(self.records):
            yield self.location(index), record

    def get(self, index: int) -> tuple[str, dict]:
        return self.location(index), self.records[index]

    def fallback_id(self, index: int) -> str:
        """A stable name for a record without an id: its line, else its position."""
        if self.line_numbers is not None:
            return f"line{self.line_numbers[index]}"
        return f"row{index}"


def canonical_split(name: str | None) -> str | None:
    return SPLIT_ALIASES.get(str(name).strip().lower()) if name is not None else None


def is_local_source(source: str) -> bool:
    """A path that exists, or that plainly means a path (so a typo is not sent to the hub)."""
    if os.path.exists(source):
        return True
    looks_like_path = source.startswith((".", "/", "~")) or source.lower().endswith(LOCAL_SUFFIXES)
    if looks_like_path:
        raise DataError(f"{source}: file or folder not found")
    return False


def load_splits(source: str, config: str | None = None) -> dict[str, Rows]:
    """{split name: Rows} from a hub dataset name or a local file / folder."""
    if is_local_source(source):
        return _load_local(Path(source).expanduser())
    return _load_hub(source, config)


def _load_hub(name: str, config: str | None) -> dict[str, Rows]:
    import datasets  # heavy: imported only when data is actually loaded

    try:
        loaded = datasets.load_dataset(name, config) if config else datasets.load_dataset(name)
    except Exception as err:  # network, auth, offline mode: all end the same way for the user
        raise DataError(
            f"could not load '{name}'{f' (config {config})' if config else ''} from the Hugging Face hub: "
            f"{type(err).__name__}: {err}. Without network, pass a local file or folder instead "
            "(--dataset; scripts/prepare_data.sh takes one per data set: HELPSTEER_SOURCE, TLDR_SOURCE, "
            "WILDFEEDBACK_SOURCE, WILDCHAT_SOURCE)."
        ) from None
    return {split: Rows(f"{name}[{split}]", dataset) for split, dataset in loaded.items()}


def _load_local(path: Path) -> dict[str, Rows]:
    if path.is_file():
        return {_split_from_filename(path): _load_file(path)}
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return _load_saved_to_disk(path)
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and p.name.lower().endswith(LOCAL_SUFFIXES)
        and not any(part.startswith(".") for part in p.relative_to(path).parts)  # e.g. .cache/ of a hub download
    )
    if not files:
        raise DataError(f"{path}: folder holds no .jsonl/.json/.parquet file and is not a save_to_disk folder")
    splits: dict[str, list[Rows]] = {}
    for file in files:
        splits.setdefault(_split_from_filename(file), []).append(_load_file(file))
    return {split: _concat(parts) for split, parts in splits.items()}


def _split_from_filename(path: Path) -> str:
    """`train.jsonl`, `validation-00000-of-00001.parquet`, `comparisons_valid.json` -> split; else train."""
    for token in re.split(r"[-_.]", path.name.lower()):
        split = canonical_split(token)
        if split:
            return split
    return "train"


def _load_file(path: Path) -> Rows:
    name = path.name.lower()
    if name.endswith(".jsonl"):
        return _load_jsonl(path)
    if name.endswith(".json"):
        return _load_json(path)
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:
            raise DataError(f"{path}: not a readable parquet file ({err})") from None
        return Rows(str(path), table.to_pylist())
    raise DataError(f"{path}: unsupported file type (use .jsonl, .json or .parquet)")


def _load_jsonl(path: Path) -> Rows:
    line_numbers, records = [], []
    for line_number, record in iter_jsonl(path):  # raises DataError naming file:line
        line_numbers.append(line_number)
        records.append(record)
    return Rows(str(path), records, line_numbers)


def _load_json(path: Path) -> Rows:
    """A JSON array of objects (as the hub's wildfeedback.json), or JSON lines named .json."""
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        return _load_jsonl(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            raise DataError(f"{path} item {index}: expected a JSON object, got {type(item).__name__}")
    return Rows(str(path), data, unit="item")


def _load_saved_to_disk(path: Path) -> dict[str, Rows]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.Dataset):
        return {"train": Rows(str(path), loaded)}
    return {split: Rows(f"{path}[{split}]", dataset) for split, dataset in loaded.items()}


def _concat(parts: list[Rows]) -> Rows:
    if len(parts) == 1:
        return parts[0]
    return _ConcatRows(parts)


class _ConcatRows(Rows):
    """Several files of one split, read in order; locations still name the right file."""

    def __init__(self, parts: list[Rows]):
        self.parts = parts
        self.label = ", ".join(part.label for part in parts)
        self.records = [record for part in parts for record in part.records]
        self._where = [(part, i) for part in parts for i in range(len(part))]
        self.line_numbers = None
        self.unit = "row"

    def location(self, index: int) -> str:
        part, inner = self._where[index]
        return part.location(inner)

    def fallback_id(self, index: int) -> str:
        part, inner = self._where[index]
        return f"{Path(part.label).name}:{part.fallback_id(inner)}"


def all_rows(splits: dict[str, Rows]) -> Rows:
    """Every split in one sequence (conversation datasets ignore splits)."""
    ordered = [splits[name] for name in sorted(splits, key=lambda s: (s != "train", s))]
    return _concat(ordered)


# --------------------------------------------------------------------------- messages
def message_content(raw: Any, where: str) -> str:
    """A message's text: a string, None (-> ""), or OpenAI-style content parts."""
    if raw is None:
        return ""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list):  # [{"type": "text", "text": ...}, {"type": "image_url", ...}]
        texts = [part.get("text", "") for part in raw if isinstance(part, dict) and part.get("type", "text") == "text"]
        return "\n".join(t for t in texts if isinstance(t, str))
    raise DataError(f"{where}: message content must be a string, got {type(raw).__name__}")


def normalize_message(raw: Any, where: str) -> dict:
    """{"role": user|assistant|system|<other>, "content": str} from role/content or from/value."""
    if not isinstance(raw, dict):
        raise DataError(
            f"{where}: a message must be an object with role/content or from/value, got {type(raw).__name__}")
    role = raw.get("role", raw.get("from"))
    if not isinstance(role, str) or not role.strip():
        raise DataError(f"{where}: message has no 'role' (or 'from') field")
    content = raw["content"] if "content" in raw else raw.get("value")
    from sdpo_objective import ROLE_ALIASES  # lazy: the objective imports torch, --help stays light

    role = role.strip().lower()
    role = ROLE_ALIASES.get(role, role)  # other roles (tool, function, ...) pass through; callers decide
    return {"role": role, "content": message_content(content, where)}


def find_message_list(record: dict, where: str, fields: Sequence[str] = MESSAGE_LIST_FIELDS) -> list:
    for name in fields:
        if name in record and record[name] is not None:
            messages = record[name]
            if not isinstance(messages, (list, tuple)):
                raise DataError(f"{where}: field '{name}' must be a list of messages, got {type(messages).__name__}")
            return list(messages)
    accepted = "', '".join(fields)
    raise DataError(f"{where}: conversation record has no '{fields[0]}' field (accepted: '{accepted}')")


def conversation_messages(record: dict, where: str, fields: Sequence[str] = MESSAGE_LIST_FIELDS) -> list[dict]:
    raw = find_message_list(record, where, fields)
    return [normalize_message(message, f"{where} message {i}") for i, message in enumerate(raw)]


def merge_consecutive_roles(messages: list[dict]) -> list[dict]:
    """Join back-to-back messages of one role (a user who sent two messages before the
    reply): the reply answered both, so they form one turn and the roles alternate."""
    merged: list[dict] = []
    for message in messages:
        if merged and merged[-1]["role"] == message["role"]:
            parts = [p for p in (merged[-1]["content"], message["content"]) if p.strip()]
            merged[-1] = {"role": message["role"], "content": "\n\n".join(parts)}
        else:
            merged.append(dict(message))
    return merged


# --------------------------------------------------------------------------- summary
@dataclass
class Summary:
    """What a preprocessor read, kept and dropped; printed at the end of every run."""

    title: str
    counts: Counter = field(default_factory=Counter)   # e.g. "conversations read"
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    levels: dict = field(default_factory=dict)         # reason -> "conversation" / "interaction" / "row"
    outputs: list = field(default_factory=list)        # (path, number of records)
    notes: list = field(default_factory=list)

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def drop(self, reason: str, level: str, n: int = 1) -> None:
        self.dropped[reason] += n
        self.levels[reason] = level

    def render(self) -> str:
        lines = [f"== {self.title}: summary =="]
        lines += [f"  {key}: {value}" for key, value in self.counts.items()]
        for path, n in self.outputs:
            lines.append(f"  wrote {n} records -> {path}")
        if self.dropped:
            lines.append("  dropped:")
            for reason, n in sorted(self.dropped.items(), key=lambda item: (-item[1], item[0])):
                lines.append(f"    {reason} ({self.levels[reason]}s): {n}")
        else:
            lines.append("  dropped: none")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def print(self) -> None:
        print(self.render(), flush=True)


# --------------------------------------------------------------------------- interactions
@dataclass
class InteractionFilters:
    """Length limits in characters (tokenizer-free, so the data step needs no model); 0 = no limit."""

    max_history_messages: int = 5
    max_conversation_chars: int = 40_000
    max_turn_chars: int = 0
    max_prompt_chars: int = 12_000
    max_completion_chars: int = 6_000
    max_user_response_chars: int = 4_000

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "InteractionFilters":
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__})


# The extraction rules of the paper's runs (WildChat and WildFeedback): a conversation is dropped when
# longer than 100k characters or when any of its turns is longer than 4,096; the history is the last 5
# messages, starting with the user; no further per-interaction length limits.
PAPER_FILTERS = {"max_history_messages": 5, "max_conversation_chars": 100_000, "max_turn_chars": 4096,
                 "max_prompt_chars": 0, "max_completion_chars": 0, "max_user_response_chars": 0}


def parse_args_with_presets(parser: argparse.ArgumentParser, argv, paper_defaults: dict | None = None):
    """Parse argv (every preprocessor parses here); with --paper_filters the paper's values replace the
    defaults (flags still win). Then every numeric flag must lie in its range of the project's one table,
    auxiliary/runtime/option_groups.RANGES: DataError (one line naming the flag, exit 2) before anything is
    read or written."""
    if paper_defaults:
        preset, _ = parser.parse_known_args(argv)
        if getattr(preset, "paper_filters", False):
            parser.set_defaults(**paper_defaults)
    args = parser.parse_args(argv)
    # imported after parsing: the table's module imports torch, and --help stays light
    from auxiliary.runtime.option_groups import RANGES
    from sdpo_objective import check_in_range

    for name, value in vars(args).items():
        try:
            check_in_range(name, value, RANGES)
        except ValueError as err:
            raise DataError(str(err)) from None
    return args


def add_interaction_filter_args(parser: argparse.ArgumentParser) -> None:
    defaults = InteractionFilters()
    parser.add_argument("--paper_filters", action="store_true",
                        help="the paper's extraction rules: " + ", ".join(f"{k}={v}" for k, v in PAPER_FILTERS.items())
                             + " (0 = no limit); flags given as well still win")
    group = parser.add_argument_group("filters (lengths in characters, 0 = no limit)")
    group.add_argument("--max_history_messages", type=int, default=defaults.max_history_messages,
                       help="messages of history kept in `prompt` (default: %(default)s)")
    group.add_argument("--max_conversation_chars", type=int, default=defaults.max_conversation_chars,
                       help="drop whole conversations longer than this (default: %(default)s)")
    group.add_argument("--max_turn_chars", type=int, default=defaults.max_turn_chars,
                       help="drop whole conversations with any message longer than this (default: %(default)s)")
    group.add_argument("--max_prompt_chars", type=int, default=defaults.max_prompt_chars,
                       help="drop interactions whose truncated history is longer (default: %(default)s)")
    group.add_argument("--max_completion_chars", type=int, default=defaults.max_completion_chars,
                       help="drop interactions whose assistant reply is longer (default: %(default)s)")
    group.add_argument("--max_user_response_chars", type=int, default=defaults.max_user_response_chars,
                       help="drop interactions whose user follow-up is longer (default: %(default)s)")


def truncate_history(history: list[dict], max_messages: int) -> list[dict]:
    """The last `max_messages` messages, then drop leading assistant messages so the
    prompt starts with a user message (history is alternating and ends with a user)."""
    kept = history[-max_messages:] if max_messages > 0 else []
    while kept and kept[0]["role"] != "user":
        kept = kept[1:]
    return kept


def over_limit(length: int, limit: int) -> bool:
    """A length over a limit of the filters, 0 meaning no limit."""
    return bool(limit) and length > limit


class InteractionBuilder:
    """Conversation -> interaction records, with filters, dedup and a Summary."""

    def __init__(self, filters: InteractionFilters, summary: Summary):
        self.filters = filters
        self.summary = summary
        self.seen: set[str] = set()

    def from_messages(self, messages: list[dict], conversation_id: str) -> list[dict]:
        """All kept interactions of one conversation (already normalised messages).

        System messages are left out (the prompt starts with a user message); back-to-back
        messages of one role are merged first so every reply has one clear follow-up."""
        f = self.filters
        other_roles = {m["role"] for m in messages} - {"user", "assistant", "system"}
        if other_roles:
            self.summary.drop("unsupported_role", "conversation")
            return []
        messages = merge_consecutive_roles([m for m in messages if m["role"] != "system"])
        if over_limit(sum(len(m["content"]) for m in messages), f.max_conversation_chars):
            self.summary.drop("conversation_too_long", "conversation")
            return []
        if any(over_limit(len(m["content"]), f.max_turn_chars) for m in messages):
            self.summary.drop("turn_too_long", "conversation")
            return []
        # after merging, roles alternate: every assistant message but a final one has a follow-up
        reply_positions = [i for i in range(len(messages) - 1) if messages[i]["role"] == "assistant"]
        if not reply_positions:
            self.summary.drop("no_reply_with_follow_up", "conversation")
            return []
        records = [self._interaction(messages, i, conversation_id) for i in reply_positions]
        return [record for record in records if record is not None]

    def _interaction(self, messages: list[dict], i: int, conversation_id: str) -> dict | None:
        f, drop = self.filters, self.summary.drop
        completion, user_response = messages[i]["content"], messages[i + 1]["content"]
        history = truncate_history(messages[:i], f.max_history_messages)
        if not history:
            drop("no_user_message_before_reply", "interaction")
            return None
        if not history[-1]["content"].strip():
            drop("empty_prompt", "interaction")
            return None
        if not completion.strip():
            drop("empty_completion", "interaction")
            return None
        if not user_response.strip():
            drop("empty_user_response", "interaction")
            return None
        prompt_chars = sum(len(m["content"]) for m in history)
        if over_limit(prompt_chars, f.max_prompt_chars):
            drop("prompt_too_long", "interaction")
            return None
        if over_limit(len(completion), f.max_completion_chars):
            drop("completion_too_long", "interaction")
            return None
        if over_limit(len(user_response), f.max_user_response_chars):
            drop("user_response_too_long", "interaction")
            return None
        key = hashlib.sha1(json.dumps([history, completion, user_response], ensure_ascii=False).encode()).hexdigest()
        if key in self.seen:
            drop("duplicate", "interaction")
            return None
        self.seen.add(key)
        return {
            "id": f"{conversation_id}:{i}",
            "conversation_id": conversation_id,
            "assistant_turn": i,  # index of the reply in the merged, system-free conversation
            "prompt": [{"role": m["role"], "content": m["content"]} for m in history],
            "completion": completion,
            "user_response": user_response,
            "prompt_messages": len(history),
            "prompt_chars": prompt_chars,
            "completion_chars": len(completion),
            "user_response_chars": len(user_response),
        }


def record_id(record: dict, fallback: str,
              fields: Sequence[str] = ("id", "conversation_id", "conversation_hash")) -> str:
    for name in fields:
        value = record.get(name)
        if value not in (None, ""):
            return str(value)
    return fallback


def convert_conversations(
    rows: Rows,
    builder: InteractionBuilder,
    *,
    order: Sequence[int] | None = None,
    reject_reason=None,
    max_conversations: int | None = None,
    max_interactions: int | None = None,
    message_fields: Sequence[str] = MESSAGE_LIST_FIELDS,
    desc: str = "conversations",
) -> list[dict]:
    """Interaction records of every conversation in `rows` (visited in `order`).

    `reject_reason(record) -> str | None` is a dataset-specific conversation filter
    (WildChat: language, toxicity). The caps stop the scan early: `max_conversations`
    counts conversations that gave at least one kept interaction."""
    summary = builder.summary
    order = range(len(rows)) if order is None else order
    records: list[dict] = []
    used_conversations = 0
    for index in progress(order, total=len(order), desc=desc):
        if max_interactions is not None and len(records) >= max_interactions:
            summary.notes.append(f"stopped at the cap of {max_interactions} interactions")
            break
        if max_conversations is not None and used_conversations >= max_conversations:
            summary.notes.append(f"stopped at the cap of {max_conversations} conversations")
            break
        where, record = rows.get(index)
        summary.count("conversations read")
        reason = reject_reason(record) if reject_reason else None
        if reason:
            summary.drop(reason, "conversation")
            continue
        messages = conversation_messages(record, where, message_fields)
        conversation_id = record_id(record, fallback=rows.fallback_id(index))
        kept = builder.from_messages(messages, conversation_id)
        if max_interactions is not None:
            room = max_interactions - len(records)
            if len(kept) > room:  # the cap cuts this conversation: its later turns are not used
                summary.drop("over_interaction_cap", "interaction", len(kept) - room)
                kept = kept[:room]
        if kept:
            used_conversations += 1
            records.extend(kept)
    summary.count("conversations used", used_conversations)
    summary.count("interactions kept", len(records))
    return records


# --------------------------------------------------------------------------- outputs
def write_jsonl(path: str | os.PathLike, records: list[dict], summary: Summary) -> None:
    """Atomic write (temporary file + rename): an interrupted run leaves no partial file."""
    n = atomic_write_jsonl(path, records)
    summary.outputs.append((str(path), n))


def write_prompt_splits(out_dir: str | os.PathLike, prompts: dict[str, list[dict]], summary: Summary) -> None:
    """<split>.jsonl for every split of selected prompts (an empty split is written too, with a note)."""
    for split, records in prompts.items():
        if not records:
            summary.notes.append(f"{split}.jsonl is empty: the input had no usable {split} prompts")
        write_jsonl(os.path.join(out_dir, f"{split}.jsonl"), records, summary)


def progress(iterable, total: int | None, desc: str):
    """A tqdm bar on a terminal, silent in logs and tests."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="rec", disable=None, file=sys.stderr)


def run_cli(main_fn, argv=None) -> int:
    """Entry-point wrapper: bad input or an unwritable output ends with one clear line and exit code 2."""
    from auxiliary.runtime.cli import exit_with_error

    try:
        main_fn(argv)
    except DataError as err:
        return exit_with_error(err)
    except OSError as err:  # read-only or full output folder, a file where a folder should be
        return exit_with_error(describe_os_error(err))
    return 0


def normalize_prompt_key(text: str) -> str:
    """Dedup key for prompts: the same words with different spacing are the same prompt."""
    return " ".join(text.split())
