"""The one JSON Lines reader and writer (``difficulty_router.data.jsonl``), and the one outcome-row parser
read by ``train --update`` (its rows may label a subset of the pool, but pass the same checks)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from difficulty_router.data.jsonl import read_jsonl, write_jsonl
from difficulty_router.training.update import read_label_rows


def test_read_jsonl_numbers_lines_and_skips_blank_ones(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"b": 2}\n')
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (4, {"b": 2})]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"rows\.jsonl, line 2: not valid JSON"),
        ('["a list"]', r"rows\.jsonl, line 2: expected a JSON object, got list"),
    ],
)
def test_read_jsonl_names_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        list(read_jsonl(path))


def test_read_jsonl_options(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text('"text"\n{"a": 1}\n{"cut by a cra\n')
    assert list(read_jsonl(path, skip_malformed=True)) == [(2, {"a": 1})]
    with pytest.raises(ValueError, match="line 3: not valid JSON"):
        list(read_jsonl(path, objects_only=False))


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.jsonl.gz"])
def test_write_jsonl_round_trips_and_leaves_no_temporary_file(tmp_path, name):
    rows = [{"prompt": "déjà vu", "n": 1}, "a bare string"]
    assert write_jsonl(tmp_path / name, rows) == 2
    assert [value for _, value in read_jsonl(tmp_path / name, objects_only=False)] == rows
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"old": True}])

    def rows():
        yield {"new": True}
        raise RuntimeError("the producer failed")

    with pytest.raises(RuntimeError):
        write_jsonl(path, rows())
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_update_rows_label_a_subset_of_the_pool(tmp_path):
    path = write_rows(tmp_path / "new.jsonl", [
        {"prompt": "a", "correct": {"x": True}},
        {"prompt": "b", "scores": {"y": 0.5}, "cost": {"y": 0.1}},
    ])  # fmt: skip
    rows = read_label_rows(path, ["x", "y"])
    assert rows.models == ["x", "y"] and rows.ids == ["1", "2"]
    np.testing.assert_array_equal(rows.scores, [[1.0, np.nan], [np.nan, 0.5]])
    np.testing.assert_array_equal(rows.cost, [[np.nan, np.nan], [np.nan, 0.1]])


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "a", "correct": {"z": True}}, r"line 1: 'correct' names \['z'\], which are not in the router's pool"),
        ({"prompt": "a", "correct": {}}, "line 1: 'correct' must be a non-empty object"),
        ({"prompt": "a", "correct": {"x": 1}, "cost": {"x": -1}}, r"line 1: cost\['x'\] must be a finite non-negative"),
        ({"prompt": "a", "correct": {"x": 1}, "cost": {"q": 1}}, r"line 1: 'cost' names unknown models \['q'\]"),
        ({"prompt": "a", "correct": {"x": 1}, "cost": 3}, "line 1: 'cost' must be an object"),
    ],
)
def test_update_rows_are_checked_like_outcomes(tmp_path, row, message):
    with pytest.raises(ValueError, match=message):
        read_label_rows(write_rows(tmp_path / "new.jsonl", [row]), ["x", "y"])


def test_an_empty_update_file_is_named_not_a_shape_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl holds no rows"):
        read_label_rows(path, ["x", "y"])
