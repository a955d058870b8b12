"""A gzip, parquet or latin-1 file given as JSONL fails with one line that says what the file looks like."""
import gzip

import pytest

from auxiliary.runtime.io_utils import DataError, read_jsonl


def test_a_gzip_file_is_named_as_gzip(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(gzip.compress(b'{"prompt": "hi"}\n'))
    with pytest.raises(DataError, match=r"prompts\.jsonl: looks like a gzip file, not JSONL text; decompress"):
        read_jsonl(path)


def test_a_latin1_file_names_the_line_and_the_encoding(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes('{"prompt": "ok"}\n{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"prompts\.jsonl:2: not UTF-8 text \(byte 0xe9; a latin-1"):
        read_jsonl(path)


def test_utf8_text_still_reads(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "caf\u00e9"}\n\n{"prompt": "\u00fcber"}\n', encoding="utf-8")
    assert [r["prompt"] for r in read_jsonl(path)] == ["caf\u00e9", "\u00fcber"]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_a_prompt_nested_200000_levels_deep_is_a_file_line_error(tmp_path):
    deep = '{"prompt": ' + "[" * 200_000 + "]" * 200_000 + "}"
    path = write_lines(tmp_path / "deep.jsonl", ['{"prompt": "fine"}', deep])
    with pytest.raises(DataError, match=rf"^{path}:2: JSON nested too deeply"):
        read_jsonl(path)
    middling = '{"prompt": ' + "[" * 100 + '"x"' + "]" * 100 + "}"  # parses, but no prompt is this deep
    write_lines(path, [middling])
    with pytest.raises(DataError, match=rf"^{path}:1: field 'prompt' is nested more than 64 levels deep"):
        read_jsonl(path)


def test_a_number_of_5000_digits_is_a_file_line_error_online_and_offline(tmp_path):
    from auxiliary.evals.evaluation_helpers import load_prompts
    from offline_sdpo.offline_sdpo_trainer import load_interactions

    path = write_lines(tmp_path / "huge.jsonl", ['{"prompt": "p", "completion": "c", "user_response": "u"}',
                                                   '{"prompt": "hi", "id": ' + "9" * 5000 + "}"])
    for read in (read_jsonl, load_prompts, load_interactions):
        with pytest.raises(DataError, match=rf"^{path}:2: unreadable JSON \(Exceeds the limit \(4300 digits\)"):
            read(path)


def test_a_lone_surrogate_is_a_file_line_error_naming_the_field(tmp_path):
    path = write_lines(tmp_path / "surrogate.jsonl", ['{"prompt": "ok"}', '{"prompt": [{"role": "user", '
                                                      '"content": "bad \\ud800 text"}]}'])
    with pytest.raises(DataError, match=rf"^{path}:2: field 'prompt' holds a lone surrogate"):
        read_jsonl(path)
    write_lines(path, ['{"prompt": "a pair is fine: \\ud83d\\ude00"}'])
    assert read_jsonl(path) == [{"prompt": "a pair is fine: \U0001F600"}]


@pytest.mark.parametrize("content", ["5", "[\"a\", \"b\"]", "{\"text\": \"hi\"}", "true"])
def test_message_content_that_is_not_text_is_a_file_line_error(tmp_path, content):
    from auxiliary.evals.evaluation_helpers import load_prompts
    from offline_sdpo.offline_sdpo_trainer import load_interactions

    prompts = write_lines(tmp_path / "prompts.jsonl", [f'{{"prompt": [{{"role": "user", "content": {content}}}]}}'])
    with pytest.raises(DataError, match=rf"^{prompts}:1: field 'prompt': message 0 content must be text"):
        load_prompts(prompts)
    interactions = write_lines(tmp_path / "interactions.jsonl", [
        f'{{"prompt": [{{"role": "user", "content": {content}}}], "completion": "c", "user_response": "o"}}'])
    with pytest.raises(DataError, match=rf"{interactions}:1: .*message 0 content must be text"):
        load_interactions(interactions)


def test_a_utf16_file_is_named_as_utf16(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "hi"}\n', encoding="utf-16")  # with its byte order mark, as Windows tools write it
    with pytest.raises(DataError, match=rf"^{path}: UTF-16 text, not UTF-8; convert it with iconv"):
        read_jsonl(path)
