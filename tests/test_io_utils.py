"""Result files are strict JSON: non-finite numbers are written as null, never as bare NaN/Infinity."""
import json

import numpy as np
import torch

from auxiliary.runtime.io_utils import append_jsonl, atomic_write_json, atomic_write_jsonl, read_jsonl


def _strict_load(text):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_become_null_everywhere(tmp_path):
    record = {"loss": float("nan"), "grad_norm": float("inf"), "ok": 1.5, "nested": [float("-inf"), {"x": 2.0}],
              "tensor": torch.tensor(float("nan")), "numpy": np.float32("inf"), "pair": (1.0, float("nan"))}
    expected = {"loss": None, "grad_norm": None, "ok": 1.5, "nested": [None, {"x": 2.0}], "tensor": None,
                "numpy": None, "pair": [1.0, None]}
    atomic_write_json(tmp_path / "a.json", record)
    assert _strict_load((tmp_path / "a.json").read_text()) == expected
    atomic_write_jsonl(tmp_path / "b.jsonl", [record, {"step": 2}])
    append_jsonl(tmp_path / "b.jsonl", record)
    lines = (tmp_path / "b.jsonl").read_text().splitlines()
    assert [_strict_load(line) for line in lines] == [expected, {"step": 2}, expected]
    assert read_jsonl(tmp_path / "b.jsonl")[2] == expected
