"""`polysketch-compare` runs and prints one row per length with sensible numbers."""
import math
import re

import pytest

from pallas_polysketch import compare as demo

SMALL = ["--lengths", "48", "96", "--heads", "2", "--head-dim", "16", "--sketch-dim", "8",
         "--block-size", "16", "--repeats", "1"]


def _table(text):
  lines = text.strip().splitlines()
  header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["seq"])
  assert lines[header].split() == " ".join(demo.COLUMNS).split()
  rows = [line.split() for line in lines[header + 1:]]
  assert all(len(r) == len(demo.COLUMNS) for r in rows), rows
  return [dict(zip(("seq", "err_poly", "err_soft", "poly_soft", "t_sketch", "t_poly", "t_soft"),
                   (int(r[0]), *map(float, r[1:])))) for r in rows]


def test_demo_prints_table(capsys):
  assert demo.main(SMALL + ["--degree", "4"]) == 0
  rows = _table(capsys.readouterr().out)
  assert [r["seq"] for r in rows] == [48, 96]
  for r in rows:
    # The random sketch approximates: some error, far from total.
    assert 1e-4 < r["err_poly"] < 1.0, r
    assert math.isfinite(r["err_soft"]) and r["err_soft"] > 0, r
    assert all(r[t] > 0 for t in ("t_sketch", "t_poly", "t_soft")), r


def test_demo_exact_features_match_polynomial(capsys):
  """Degree 2 makes the sketch the identity: PolySketch is then exact, so the
  printed error against polynomial attention must vanish (and the softmax
  columns must agree with each other)."""
  assert demo.main(SMALL + ["--degree", "2"]) == 0
  rows = _table(capsys.readouterr().out)
  for r in rows:
    assert r["err_poly"] < 1e-4, r
    assert r["err_soft"] == pytest.approx(r["poly_soft"], abs=2e-4), r


@pytest.mark.parametrize("argv, match", [
    (["--lengths", "-5"], r"--lengths must be positive ints, got \[-5\]"),
    (["--degree", "6"], r"--degree must be a power of two \(2, 4, 8, \.\.\.\), got 6"),
    (["--block-size", "12"], r"--block-size must be a positive multiple of 8, got 12"),
    (["--heads", "0"], r"--heads must be a positive int, got 0"),
    (["--repeats", "-1"], r"--repeats must be a positive int, got -1"),   # was taken as 1
])
def test_demo_rejects_bad_flags_before_any_work(argv, match, capsys):
  with pytest.raises(SystemExit):
    demo.main(argv)
  captured = capsys.readouterr()
  assert re.search(match, captured.err) and captured.out == ""
