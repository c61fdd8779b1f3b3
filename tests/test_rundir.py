"""rundir.read_jsonl: a torn last line of metrics.jsonl is a killed run's; any other bad line is an error."""

from __future__ import annotations

import json

import pytest

from torch_agd.errors import UsageError
from torch_agd.train import rundir

ROWS = [{"epoch": 1, "test_acc": 0.5}, {"epoch": 2, "test_acc": 0.6}, {"epoch": 3, "test_acc": 0.7}]


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def test_every_row_comes_back_in_order(tmp_path):
    path = tmp_path / rundir.METRICS
    rundir.write_jsonl(path, ROWS)
    assert rundir.read_jsonl(path) == ROWS
    path.write_text("")
    assert rundir.read_jsonl(path) == []


@pytest.mark.parametrize("torn", ['{"epoch": 4, "test_a', "{"])
def test_a_torn_last_line_is_dropped_and_the_rows_before_it_kept(tmp_path, torn):
    path = tmp_path / rundir.METRICS
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS) + torn)  # killed mid-write: no newline
    assert rundir.read_jsonl(path) == ROWS
    _write(path, [json.dumps(ROWS[0]), "not json"])  # a whole line of damage, last: dropped as well
    assert rundir.read_jsonl(path) == ROWS[:1]


@pytest.mark.parametrize("bad", ['{"epoch": 2, "test_a', "", "garbage"])
@pytest.mark.parametrize("number", [1, 2])
def test_a_bad_line_before_the_last_is_a_one_line_error_naming_the_file_and_line(tmp_path, bad, number):
    path = tmp_path / "run" / rundir.METRICS
    path.parent.mkdir()
    lines = [json.dumps(row) for row in ROWS]
    lines[number - 1] = bad
    _write(path, lines)
    with pytest.raises(UsageError) as err:
        rundir.read_jsonl(path)
    message = str(err.value)
    assert message.startswith(f"{path}: line {number} of 3 is not JSON") and "\n" not in message
    assert f"agd train --out {path.parent} --resume" in message  # what to do
