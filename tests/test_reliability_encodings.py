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
