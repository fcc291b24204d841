"""Everything the package writes as JSON is strict JSON: a value not measured yet is null, never NaN."""

import pytest

from tests.helpers import strict_json
from tlt_jax.bench.common import write_json
from tlt_jax.core.jsonio import json_line


def test_json_line_is_strict_json():
    line = json_line({"step": 1, "loss": float("nan"), "x": [1.5, float("inf")], "arms": {"a": -float("inf")}})
    assert line.endswith("\n") and line.count("\n") == 1
    assert strict_json(line) == {"step": 1, "loss": None, "x": [1.5, None], "arms": {"a": None}}
    with pytest.raises(ValueError):
        strict_json('{"loss": NaN}')


def test_bench_json_is_strict(tmp_path, capsys):
    path = tmp_path / "sub" / "bench.json"
    write_json(str(path), {"rows": [{"strategy": "plain", "accept_len": float("nan"), "tok_s": 25.5,
                                     "verify": (1, float("-inf"))}], "summary": {"speedup": float("nan")}})
    assert strict_json(path.read_text()) == {"rows": [{"strategy": "plain", "accept_len": None, "tok_s": 25.5,
                                                       "verify": [1, None]}], "summary": {"speedup": None}}
    assert f"wrote {path}" in capsys.readouterr().out
