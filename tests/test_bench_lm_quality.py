"""The LM-quality benchmark runs end to end at tiny sizes over seeds and resumes
(no loss or timing assertions: those belong to bench/LM_QUALITY.md)."""
import argparse
import json
import re
import time

import numpy as np

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
  return dict(variant=variant, seeds=[0], step_s=step_s, compile_s=compile_s,
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
  # The job that binds is the one with the least time left for steps, not the
  # slowest step: a long compile can outweigh a faster step.
  calib = [_calibration(0.2, compile_s=5.0, variant="slow-step"),
           _calibration(0.15, compile_s=150.0, variant="long-compile")]
  # slow-step: (270 - 10.2) / 0.2 = 1299 steps; long-compile: (270 - 155.2) / 0.15 = 765
  assert bench.fit_steps(calib, 300, max_steps=10_000, num_evals=1, eval_batches=4) == 750
  with pytest.raises(ValueError, match="long-compile"):
    bench.fit_steps(calib, 180, max_steps=10_000, num_evals=1, eval_batches=4)


def test_lm_quality_parallel_with_time_budget(tmp_path):
  """Two jobs as processes: calibration at a barrier, --steps capped by the
  budget, results merged with each job's calibration."""
  bench = load_bench("lm_quality")
  data = tmp_path / "text.txt"
  data.write_text(TEXT)
  run_argv = ["--data", str(data), "--context", "32", "--steps", "20", "--batch-size", "2",
              "--layers", "1", "--heads", "2", "--dim", "16", "--sketch-dim", "4",
              "--block-size", "16", "--num-evals", "2", "--eval-batches", "1", "--seeds", "0", "1",
              "--variants", "softmax", "--lr", "0.002", "--warmup", "3",
              "--out-dir", str(tmp_path)]
  runs = bench.main(run_argv + ["--parallel", "--time-budget", "600", "--calibrate-steps", "2",
                                "--tag", "par"])
  assert sorted((r["variant"], r["seed"]) for r in runs) == [("softmax", 0), ("softmax", 1)]
  report = json.loads((tmp_path / "par.json").read_text())
  assert report["args"]["steps"] == 20   # the budget fits more: --steps is the cap
  for r in report["results"]:
    assert r["history"]["val_step"] == [10, 20]
    c = r["calibration"]
    assert (c["variant"], c["seeds"], c["calibrate_steps"]) == (r["variant"], [r["seed"]], 2)
    assert c["step_s"] > 0 and c["compile_s"] > 0
  md = (tmp_path / "par.md").read_text()
  assert "| softmax | softmax |" in md and "| softmax | 1 |" in md
  assert re.search(r"Devices: \d+ x cpu", md)
  assert sorted(p.name for p in (tmp_path / "par_parts").glob("*.json")) == [
      "softmax_s0.json", "softmax_s1.json"]
  assert report["fitted"]["steps_cap"] == 20 and report["fitted"]["steps"] == 20
  assert report["not_finished"] == []
  # Every run flag reaches the jobs: each equals the same run made in this process.
  serial = bench.main(run_argv + ["--tag", "serial"])
  by_run = {(r["variant"], r["seed"]): r for r in runs}
  assert len(serial) == 2
  for r in serial:
    p = by_run[(r["variant"], r["seed"])]
    assert p["params"] == r["params"]
    np.testing.assert_allclose(p["history"]["val_loss"], r["history"]["val_loss"], rtol=1e-5)


def test_lm_quality_run_jobs_kills_at_the_deadline(tmp_path):
  bench = load_bench("lm_quality")
  args = argparse.Namespace(**{name: None for name in bench.RUN_FLAGS})
  t0 = time.time()
  codes = bench.run_jobs([("softmax", (0,)), ("softmax", (1,))], str(tmp_path), [], args,
                         deadline=time.time(), poll_s=0.05)
  assert all(c is None or c < 0 for c in codes)
  # A job of several seeds trains them stacked.
  argv = bench.job_argv(args, "softmax", (0, 1), "softmax_s0-1", str(tmp_path))
  assert argv[-8:-1] == ["--seeds", "0", "1", "--stack-seeds", "--tag", "softmax_s0-1", "--out-dir"]
  assert time.time() - t0 < 30
  assert sorted(p.name for p in tmp_path.glob("*.log")) == ["softmax_s0.log", "softmax_s1.log"]


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


def _tiny_argv(tmp_path, *extra):
  data = tmp_path / "text.txt"
  data.write_text(TEXT)
  return ["--data", str(data), "--context", "32", "--steps", "6", "--batch-size", "2",
          "--layers", "1", "--heads", "2", "--dim", "16", "--sketch-dim", "4",
          "--block-size", "16", "--eval-every", "3", "--eval-batches", "2", "--lr", "0.003",
          "--warmup", "2", "--out-dir", str(tmp_path), *extra]


def test_lm_quality_stacked_seeds_equal_separate_runs(tmp_path):
  """--stack-seeds trains a variant's seeds vmapped in one program: each seed's
  losses equal its own train() run (the random sketch's fixed features too)."""
  bench = load_bench("lm_quality")
  argv = _tiny_argv(tmp_path, "--seeds", "0", "1", "--variants", "random+local")
  serial = bench.main(argv + ["--tag", "serial"])
  stacked = bench.main(argv + ["--tag", "stacked", "--stack-seeds"])
  assert [(r["variant"], r["seed"]) for r in stacked] == [("random+local", 0), ("random+local", 1)]
  by_run = {(r["variant"], r["seed"]): r for r in serial}
  for r in stacked:
    s = by_run[(r["variant"], r["seed"])]
    assert r["params"] == s["params"] and r["stacked_seeds"] == 2
    assert r["history"]["step"] == s["history"]["step"]
    assert r["history"]["val_step"] == s["history"]["val_step"] == [3, 6]
    np.testing.assert_allclose(r["history"]["train_loss"], s["history"]["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(r["history"]["val_loss"], s["history"]["val_loss"], rtol=1e-5)
    np.testing.assert_allclose(r["history"]["val_acc"], s["history"]["val_acc"], atol=1e-6)
  # The seeds are different runs, not one run copied.
  assert stacked[0]["history"]["val_loss"] != stacked[1]["history"]["val_loss"]
  report = json.loads((tmp_path / "stacked.json").read_text())
  assert [r["n"] for r in report["summary"]] == [2]
  # --resume skips the seeds already run; a new seed runs alone.
  more = bench.main(argv + ["--tag", "stacked", "--stack-seeds", "--resume", "--seeds", "0", "1", "2"])
  assert [r["seed"] for r in more] == [0, 1, 2] and more[2]["stacked_seeds"] == 1


# The benchmark's bookkeeping for one kind of rerun (rows, model names, merges):
# slow, to keep the default suite near 15 minutes.
@pytest.mark.slow
def test_lm_quality_polynomial_warmup_rows_and_merge(tmp_path, capsys):
  """--polynomial-warmup 0 2 gives a PolySketch variant a row per value (softmax
  one), the warm-up run's first evaluation in the exact mode; --merge joins
  reports of the same settings and refuses others."""
  bench = load_bench("lm_quality")
  argv = _tiny_argv(tmp_path, "--steps", "4", "--eval-every", "2", "--seeds", "0")
  soft = bench.main(argv + ["--variants", "softmax", "--tag", "a"])
  runs = bench.main(argv + ["--variants", "softmax,learned+local", "--polynomial-warmup", "0", "2",
                            "--tag", "b"])
  assert [bench.run_key(r) for r in runs] == [
      ("softmax", 0, 0, None), ("learned+local", 0, 0, None), ("learned+local", 0, 2, None)]
  scratch, warm = runs[1], runs[2]
  assert [e["exact_polynomial"] for e in scratch["evals"]] == [False, False]
  assert [e["exact_polynomial"] for e in warm["evals"]] == [True, False]
  assert warm["history"]["val_loss"] != scratch["history"]["val_loss"]
  report = json.loads((tmp_path / "b.json").read_text())
  assert [r["variant"] for r in report["summary"]] == [
      "softmax", "learned+local", "learned+local, polynomial warm-up 2"]
  assert report["train"]["polynomial_warmup_steps"] == "*"
  md = (tmp_path / "b.md").read_text()
  assert "| learned+local, polynomial warm-up 2 | polysketch |" in md
  assert "with polynomial warm-ups of [0, 2] steps" in md
  assert bench.main(argv + ["--variants", "softmax,learned+local", "--polynomial-warmup", "0",
                            "2", "--tag", "b", "--resume"]) == report["results"]

  merged = bench.main(["--merge", str(tmp_path / "b.json"), str(tmp_path / "a.json"),
                       "--out-dir", str(tmp_path), "--tag", "ab"])
  assert [bench.run_key(r) for r in merged] == [bench.run_key(r) for r in runs]
  # The later report's run of the same key.
  assert merged[0] == json.loads((tmp_path / "a.json").read_text())["results"][0]
  assert merged[0]["val_loss"] == soft[0]["val_loss"]
  out = json.loads((tmp_path / "ab.json").read_text())
  assert [r["n"] for r in out["summary"]] == [1, 1, 1]
  assert out["args"]["polynomial_warmup"] == [0, 2] and (tmp_path / "ab.png").stat().st_size > 0

  # a run another report supplies is no longer "not finished"; the others stay, once
  a = json.loads((tmp_path / "a.json").read_text())
  a["not_finished"] = ["softmax seed 0", "softmax seed 9", "softmax seed 9"]
  (tmp_path / "a2.json").write_text(json.dumps(a))
  bench.main(["--merge", str(tmp_path / "a2.json"), str(tmp_path / "b.json"),
              "--out-dir", str(tmp_path), "--tag", "ab2"])
  assert json.loads((tmp_path / "ab2.json").read_text())["not_finished"] == ["softmax seed 9"]
  # settings are compared both ways, the devices too
  for edit, named in ((lambda r: r["model"].update(extra_field=1), "model.extra_field"),
                      (lambda r: r.update(devices="1 x gpu"), "devices")):
    other = json.loads((tmp_path / "a.json").read_text())
    edit(other)
    (tmp_path / "a3.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit):
      bench.main(["--merge", str(tmp_path / "b.json"), str(tmp_path / "a3.json"),
                  "--out-dir", str(tmp_path)])
    assert f"['{named}']" in capsys.readouterr().err

  bench.main(_tiny_argv(tmp_path, "--steps", "4", "--context", "16", "--variants", "softmax",
                        "--tag", "c"))
  with pytest.raises(SystemExit):
    bench.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "c.json"),
                "--out-dir", str(tmp_path)])
  err = capsys.readouterr().err
  assert "c.json differs from" in err and "['--context', '--eval-every', 'train.context', 'train.eval_every']" in err


# The benchmark's bookkeeping for one kind of rerun (rows, model names, merges):
# slow, to keep the default suite near 15 minutes.
@pytest.mark.slow
def test_lm_quality_narrower_sketch_gets_its_own_row_and_merges(tmp_path):
  """--sketch-hidden: the learned variants' model is built with it (fewer
  parameters), their runs record it (softmax's do not), and --merge joins it
  with a report of the default width, a row each; a report whose runs predate
  the per-run record takes its flag's width."""
  bench = load_bench("lm_quality")
  argv = _tiny_argv(tmp_path, "--steps", "2", "--eval-every", "2", "--seeds", "0")
  wide = bench.main(argv + ["--variants", "softmax,learned+local", "--tag", "wide"])
  narrow = bench.main(argv + ["--variants", "softmax,learned+local", "--sketch-hidden", "8",
                              "--tag", "narrow"])
  assert [r.get("sketch_hidden") for r in narrow] == [None, 8]
  assert narrow[0]["val_loss"] == wide[0]["val_loss"]     # softmax: the same model and run
  assert narrow[1]["params"] < wide[1]["params"]
  report = json.loads((tmp_path / "narrow.json").read_text())
  assert report["model"]["sketch_hidden_dim"] == 8
  for run in report["results"]:
    run.pop("sketch_hidden", None)
  (tmp_path / "old.json").write_text(json.dumps(report))
  merged = bench.main(["--merge", str(tmp_path / "wide.json"), str(tmp_path / "old.json"),
                       "--out-dir", str(tmp_path), "--tag", "both"])
  assert sorted(map(str, map(bench.run_key, merged))) == sorted(map(str, [
      ("softmax", 0, 0, None), ("learned+local", 0, 0, None), ("learned+local", 0, 0, 8)]))
  out = json.loads((tmp_path / "both.json").read_text())
  assert [r["variant"] for r in out["summary"]] == [
      "softmax", "learned+local", "learned+local, sketch hidden width 8"]
  assert "| learned+local, sketch hidden width 8 | polysketch |" in (tmp_path / "both.md").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--polynomial-warmup", "6"], "--polynomial-warmup must be in [0, --steps = 6), got [6]"),
    (["--polynomial-warmup", "-1"], "got [-1]"),
    (["--polynomial-warmup", "2", "2"], "repeated values [2, 2]"),
    (["--polynomial-warmup", "2", "--stack-seeds"], "does not combine with --stack-seeds"),
    (["--polynomial-warmup", "2", "--parallel"], "does not combine with --stack-seeds or --parallel"),
    (["--merge", "/nonexistent/x.json"], "--merge: no report at /nonexistent/x.json"),
    (["--merge", "x.json", "--resume"], "--merge trains nothing"),
    (["--variants", "softmax", "--polynomial-warmup", "2"],
     "--polynomial-warmup applies to PolySketch variants, and --variants softmax has none"),
], ids=["at-steps", "negative", "repeated", "stacked", "parallel", "merge-missing", "merge-resume",
        "no-polysketch"])
def test_lm_quality_rejects_bad_warmup_and_merge(tmp_path, capsys, extra, message):
  bench = load_bench("lm_quality")
  with pytest.raises(SystemExit):
    bench.main(_tiny_argv(tmp_path, *extra))
  assert message in capsys.readouterr().err
