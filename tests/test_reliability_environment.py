"""Environment errors end in one line naming the path and the cause, exit 2, no traceback."""
import errno
from pathlib import Path

import pytest

from auxiliary.runtime import io_utils
from reliability_helpers import main_block, run_like_a_child

REPO = Path(__file__).resolve().parent.parent
CHAT_LOG = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, ' \
           '{"role": "user", "content": "shorter please"}]}\n'


@pytest.mark.parametrize("out", ["/proc/sdpo_no_such_dir/out.jsonl", "{file}/out.jsonl"])
def test_preprocess_chat_logs_with_an_unwritable_output_says_so_in_one_line(tmp_path, out, monkeypatch, capfd):
    source = tmp_path / "chat.jsonl"
    source.write_text(CHAT_LOG)
    out = out.format(file=source)  # a file where a folder should be
    result = run_like_a_child(main_block(REPO / "auxiliary" / "preprocess_chat_logs.py"),
                              ["--input", source, "--out", out], monkeypatch, capfd)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert lines == [lines[-1]] and lines[-1].startswith("error: cannot write /")
    assert "No such file or directory" in lines[-1] or "Not a directory" in lines[-1] or "File exists" in lines[-1]


def test_a_full_disk_is_named(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.json"))

    monkeypatch.setattr(io_utils.tempfile, "mkstemp", full)
    with pytest.raises(OSError) as caught:
        io_utils.atomic_write_json(tmp_path / "x.json", {"a": 1})
    line = io_utils.describe_os_error(caught.value)
    assert line == f"cannot write {tmp_path / 'x.json'}: No space left on device (the disk is full: free space " \
                   "or choose another output folder)"
