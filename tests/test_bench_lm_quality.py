"""The LM-quality benchmark runs end to end at tiny sizes over seeds and resumes
(no loss or timing assertions: those belong to bench/LM_QUALITY.md)."""
import json

import pytest

from helpers import load_bench

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))


def test_lm_quality_runs_over_seeds_and_resumes(tmp_path):
  bench = load_bench("lm_quality")
  data = tmp_path / "text.txt"
  data.write_text(TEXT)
  argv = ["--data", str(data), "--context", "32", "--steps", "3", "--batch-size", "2",
          "--layers", "1", "--heads", "2", "--dim", "16", "--wide-dim", "24",
          "--sketch-dim", "4", "--block-size", "16", "--eval-every", "3", "--eval-batches", "1",
          "--seeds", "0", "1", "--variants", "softmax,softmax-wide",
          "--out-dir", str(tmp_path), "--tag", "tiny"]
  runs = bench.main(argv)
  assert [(r["variant"], r["seed"]) for r in runs] == [
      (v, s) for s in (0, 1) for v in ("softmax", "softmax-wide")]
  report = json.loads((tmp_path / "tiny.json").read_text())
  summary = {r["variant"]: r for r in report["summary"]}
  assert all(summary[v]["n"] == 2 and summary[v]["seeds"] == [0, 1] for v in summary)
  assert summary["softmax-wide"]["embed_dim"] == 24
  assert summary["softmax-wide"]["params"] > summary["softmax"]["params"]
  # Different seeds are different runs (initial key and data order).
  assert runs[0]["val_loss"] != runs[2]["val_loss"]
  md = (tmp_path / "tiny.md").read_text()
  assert "| softmax-wide | softmax |" in md and "+0.00%" in md and "Command: `" in md
  assert (tmp_path / "tiny.png").stat().st_size > 0
  assert bench.main(argv + ["--resume"]) == report["results"]   # nothing left to run


def test_lm_quality_rejects_bad_variants(tmp_path):
  bench = load_bench("lm_quality")
  with pytest.raises(SystemExit):
    bench.main(["--variants", "softmax,nope", "--out-dir", str(tmp_path)])
  with pytest.raises(SystemExit):
    bench.main(["--variants", "softmax-wide", "--out-dir", str(tmp_path)])


def test_lm_quality_skips_without_data(tmp_path, capsys):
  bench = load_bench("lm_quality")
  assert bench.main(["--data", str(tmp_path / "absent.txt"), "--out-dir", str(tmp_path)]) == []
  assert "skipped: no data" in capsys.readouterr().out
