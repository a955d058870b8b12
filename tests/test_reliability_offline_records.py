"""Offline records: a prompt ending with an assistant turn is refused, a completion or follow-up given as a
message without a role takes the role its field implies, and every error names file, line and field."""
import json

import pytest

from auxiliary.runtime.io_utils import DataError
from offline_sdpo.offline_sdpo_trainer import load_interactions

GOOD = {"prompt": [{"role": "user", "content": "Write a haiku."}], "completion": "Leaves fall.",
        "user_response": "Too short."}


def write(tmp_path, records):
    path = tmp_path / "interactions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_prompt_that_ends_with_an_assistant_turn_is_refused(tmp_path):
    ends_with_reply = {**GOOD, "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    with pytest.raises(DataError, match=r"interactions\.jsonl:2: field 'prompt' ends with an assistant turn"):
        load_interactions(write(tmp_path, [GOOD, ends_with_reply]))


def test_messages_without_a_role_take_the_role_of_their_field(tmp_path):
    record = {**GOOD, "completion": {"content": "Leaves fall."}, "user_response": {"value": "Too short."}}
    records, summary = load_interactions(write(tmp_path, [record]))
    assert records[0]["completion"] == "Leaves fall." and records[0]["user_response"] == "Too short."
    assert summary.kept == 1


@pytest.mark.parametrize("field, value, message", [
    ("completion", {"role": "user", "content": "x"},
     "field 'completion' is a message of role 'user', expected 'assistant'"),
    ("user_response", {"role": "gpt", "content": "x"}, "field 'user_response' is a message of role 'assistant'"),
    ("user_response", {"role": "user"}, "field 'user_response': needs role/content"),
    ("completion", {"role": "wizard", "content": "x"}, "field 'completion': has unknown role 'wizard'"),
])
def test_record_errors_name_file_line_and_field(tmp_path, field, value, message):
    with pytest.raises(DataError, match=rf"interactions\.jsonl:3: {message}"):
        load_interactions(write(tmp_path, [GOOD, GOOD, {**GOOD, field: value}]))
