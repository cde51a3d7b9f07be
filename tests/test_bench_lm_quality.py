"""The LM-quality benchmark runs end to end at tiny sizes over seeds and resumes
(no loss or timing assertions: those belong to bench/LM_QUALITY.md)."""
import json
import re

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


def _calibration(step_s, compile_s=10.0, startup_s=5.0, eval_s=0.05, variant="v"):
  return dict(variant=variant, seed=0, step_s=step_s, compile_s=compile_s,
              startup_s=startup_s, eval_s=eval_s)


def test_fit_steps_fits_the_slowest_job_with_its_fixed_costs():
  bench = load_bench("lm_quality")
  calib = [_calibration(0.1, variant="fast"),
           _calibration(0.2, compile_s=40.0, eval_s=0.1, variant="slow")]
  # slow: 0.9 * 300 = 270 s; fixed 5 + 40 + 10 evals * 4 batches * 0.1 = 49 s -> 221 / 0.2 = 1105 steps
  assert bench.fit_steps(calib, 300, max_steps=10_000, num_evals=10, eval_batches=4) == 1100
  assert bench.fit_steps(calib, 300, max_steps=10_000, num_evals=10, eval_batches=4,
                         multiple=100) == 1100
  assert bench.fit_steps(calib, 300, max_steps=10_000, num_evals=10, eval_batches=4,
                         multiple=1) == 1105
  assert bench.fit_steps(calib, 300, max_steps=700, num_evals=10, eval_batches=4) == 700
  with pytest.raises(ValueError, match="fits fewer than 50 steps.*slow"):
    bench.fit_steps(calib, 60, max_steps=10_000, num_evals=10, eval_batches=4)


def test_lm_quality_parallel_with_time_budget(tmp_path):
  """Two jobs as processes: calibration at a barrier, --steps capped by the
  budget, results merged with each job's calibration."""
  bench = load_bench("lm_quality")
  data = tmp_path / "text.txt"
  data.write_text(TEXT)
  argv = ["--data", str(data), "--context", "32", "--steps", "20", "--batch-size", "2",
          "--layers", "1", "--heads", "2", "--dim", "16", "--sketch-dim", "4",
          "--block-size", "16", "--num-evals", "2", "--eval-batches", "1", "--seeds", "0",
          "--variants", "softmax,random+local", "--parallel", "--time-budget", "600",
          "--calibrate-steps", "2", "--out-dir", str(tmp_path), "--tag", "par"]
  runs = bench.main(argv)
  assert sorted(r["variant"] for r in runs) == ["random+local", "softmax"]
  report = json.loads((tmp_path / "par.json").read_text())
  assert report["args"]["steps"] == 20   # the budget fits more: --steps is the cap
  for r in report["results"]:
    assert r["history"]["val_step"] == [10, 20]
    c = r["calibration"]
    assert (c["variant"], c["seed"], c["calibrate_steps"]) == (r["variant"], 0, 2)
    assert c["step_s"] > 0 and c["compile_s"] > 0
  md = (tmp_path / "par.md").read_text()
  assert "| softmax | softmax |" in md and "| random+local | polysketch | random |" in md
  assert re.search(r"Devices: \d+ x cpu", md)
  assert sorted(p.name for p in (tmp_path / "par_parts").glob("*.json")) == [
      "random+local_s0.json", "softmax_s0.json"]


@pytest.mark.parametrize("extra, message", [
    (["--time-budget", "100"], "--time-budget needs --parallel"),
    (["--parallel", "--time-budget", "0"], "--time-budget must be positive"),
    (["--parallel", "--resume"], "--resume does not combine with --parallel"),
    (["--num-evals", "0"], "--num-evals must be >= 1"),
])
def test_lm_quality_rejects_bad_parallel_flags(tmp_path, capsys, extra, message):
  bench = load_bench("lm_quality")
  with pytest.raises(SystemExit):
    bench.main(["--out-dir", str(tmp_path)] + extra)
  assert message in capsys.readouterr().err
