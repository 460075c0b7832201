"""benchmarks/runs.py's paired differences: per seed, only seeds both rows have, the paired t."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import runs  # noqa: E402


def _record(row, seed, miou):
    return {"row": row, "seed": seed, "scores": {runs.REAL: {"miou": miou}}}


def test_paired_table_pairs_by_seed_and_gives_the_paired_t():
    records = [_record("base", 0, 10.0), _record("base", 1, 12.0), _record("base", 2, 11.0),
               _record("new", 2, 13.0), _record("new", 0, 11.0), _record("new", 1, 16.0),
               _record("lonely", 5, 1.0)]
    table = runs.paired_table(runs.by_row(records), [("new", "base"), ("lonely", "base"),
                                                     ("new", "absent")])
    lines = table.splitlines()
    assert len(lines) == 3  # header, rule, one comparison: no shared seed / no row -> left out
    # new - base per seed (in new's order 2, 0, 1): +2, +1, +4; mean 2.33, std 1.53, t 2.6
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells == ["new - base", "2,0,1", "2.33 ± 1.53", "+2.00 / +1.00 / +4.00", "2.6"]


def test_paired_table_has_no_t_for_one_seed():
    rows = runs.by_row([_record("a", 0, 3.0), _record("b", 0, 1.0)])
    assert runs.paired_table(rows, [("a", "b")]).splitlines()[2].rstrip().endswith("| - |")
    with pytest.raises(KeyError):  # a record without the split is a bug in the caller
        runs.paired_table(rows, [("a", "b")], split="absent")
