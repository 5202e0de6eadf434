"""bench/_results.py: the JSON + PNG every benchmark writes (rendered from the JSON alone)."""

from __future__ import annotations

import json
import os
import sys

import pytest

pytest.importorskip("matplotlib")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))

import _results  # noqa: E402


def result(**panel_overrides):
    return {
        "benchmark": "demo", "params": {"n": 3},
        "headline": [_results.headline("ratio", 1.0412, "", "<= 1.10")],
        "panels": [
            {"kind": "box", "title": "t", "ylabel": "ms", "series": {"a": [1.0, 2.0, 3.0], "b": [2.5]}, "target": 2},
            {"kind": "line", "title": "t", "xlabel": "N", "ylabel": "ms", "x": [100, 1000], "logx": True,
             "series": {"p50": [1.0, 2.0]}},
            {"kind": "bars", "title": "t", "ylabel": "ms", "categories": ["Join", "Leave"],
             "series": {"p50": [1.0, 2.0], "p99": [3.0, 4.0]}, **panel_overrides},
        ],
    }


def test_save_writes_json_and_png_next_to_it(tmp_path):
    path = str(tmp_path / "sub" / "demo.json")
    json_path, png = _results.save(result(), path)
    assert png == str(tmp_path / "sub" / "demo.png")
    assert _results.load(json_path) == json.loads(open(json_path, encoding="utf-8").read()) == result()
    with open(png, "rb") as image:
        assert image.read(8) == b"\x89PNG\r\n\x1a\n"


def test_replot_from_json_alone(tmp_path):
    path = str(tmp_path / "demo.json")
    _results.save(result(), path)
    os.remove(_results.png_path(path))
    _results.render(_results.load(path), _results.png_path(path))
    assert os.path.getsize(_results.png_path(path)) > 1000


def test_headline_rounds_and_keeps_target_only_when_given():
    assert _results.headline("x", 1.23456, "ms") == {"metric": "x", "value": 1.235, "unit": "ms"}
    assert _results.headline("x", 1, "", ">= 0.95")["target"] == ">= 0.95"
    assert _results.ms([0.0123456]) == [12.35]


@pytest.mark.parametrize("overrides, message", [
    ({"kind": "pie"}, "kind 'pie' is not one of box, line, bars"),
    ({"series": {}}, "no series"),
    ({"series": {"p50": [1.0]}}, "series 'p50' has 1 values for 2 points"),
])
def test_bad_panel_is_refused_with_what_is_wrong_and_nothing_written(tmp_path, overrides, message):
    path = tmp_path / "demo.json"
    with pytest.raises(ValueError, match=message):
        _results.save(result(**overrides), str(path))
    assert not path.exists()


def test_result_without_headline_is_refused(tmp_path):
    bad = result()
    del bad["headline"]
    with pytest.raises(ValueError, match="without 'headline'"):
        _results.save(bad, str(tmp_path / "demo.json"))
