"""The recall benchmark runs end to end at tiny sizes (no accuracy or timing assertions)."""
import json

from helpers import load_bench


def test_recall_benchmark_runs_end_to_end_and_resumes(tmp_path):
  bench = load_bench("recall")
  argv = ["--seqs", "64", "--pairs", "2", "--steps", "3", "--batch-size", "4",
          "--lrs", "1e-3", "3e-3", "--variants", "softmax,local", "--dim", "16",
          "--sketch-dim", "4", "--block-size", "16", "--eval-batches", "1",
          "--out-dir", str(tmp_path), "--tag", "tiny"]
  runs = bench.main(argv)
  assert {(r["variant"], r["lr"]) for r in runs} == {
      (v, lr) for v in ("softmax", "local") for lr in (1e-3, 3e-3)}
  for r in runs:
    assert 0.0 <= r["val_acc"] <= 1.0 and r["steps_per_s"] > 0
  report = json.loads((tmp_path / "recall-tiny.json").read_text())
  assert len(report["runs"]) == 4 and "load_before" in report
  md = (tmp_path / "recall-tiny.md").read_text()
  assert "| softmax |" in md and "| local |" in md
  assert (tmp_path / "recall-tiny.png").stat().st_size > 0
  assert bench.main(argv + ["--resume"]) == report["runs"]     # nothing left to run

  # a second process's runs merge into one table
  other = bench.main(argv[:argv.index("--variants")] + [
      "--variants", "polynomial", "--lrs", "1e-3", "--dim", "16", "--sketch-dim", "4",
      "--block-size", "16", "--eval-batches", "1", "--out-dir", str(tmp_path), "--tag", "other"])
  merged = bench.main(["--merge", str(tmp_path / "recall-tiny.json"),
                       str(tmp_path / "recall-other.json"), "--out-dir", str(tmp_path),
                       "--tag", "both"])
  assert len(merged) == 5 and other[0] in merged
  md = (tmp_path / "recall-both.md").read_text()
  assert "| polynomial |" in md and "| softmax |" in md and " + " in md


def test_recall_curve_and_distinct_queries_at_short_context(tmp_path, capsys):
  """--eval-every records each run's accuracy curve; with --distinct-queries a
  context that fits pairs + min(queries, pairs) queries runs (it was skipped
  when checked against --queries)."""
  bench = load_bench("recall")
  runs = bench.main(["--seqs", "16", "--pairs", "2", "--distinct-queries", "--queries", "16",
                     "--steps", "3", "--eval-every", "2", "--batch-size", "4",
                     "--variants", "softmax", "--dim", "16", "--block-size", "8",
                     "--eval-batches", "1", "--out-dir", str(tmp_path), "--tag", "curve"])
  assert len(runs) == 1
  curve = runs[0]["curve"]
  assert [c["step"] for c in curve] == [2, 3]
  assert curve[-1]["val_acc"] == runs[0]["val_acc"]
  assert "softmax T=16 pairs=2" in capsys.readouterr().out


def test_recall_state_sizes():
  """Softmax's KV cache grows with T; PolySketch keeps r^2 (H + 1) plus one
  block of keys and values; local blocks alone keep just the block."""
  state = load_bench("recall").state_floats
  assert state("softmax", 1024, 32, 16, 64) == 2 * 1024 * 32
  assert state("learned+local", 1024, 32, 16, 64) == state("learned+local", 4096, 32, 16, 64) \
      == 16 ** 2 * 33 + 2 * 64 * 32
  assert state("learned", 1024, 32, 16, 64) == 16 ** 2 * 33
  assert state("local", 1024, 32, 16, 64) == 2 * 64 * 32


def test_merged_runs_of_one_variant_with_other_sketch_dims_or_steps_get_their_own_rows(tmp_path):
  bench = load_bench("recall")
  common = ["--seqs", "16", "--pairs", "2", "--distinct-queries", "--batch-size", "4",
            "--variants", "random+local", "--dim", "16", "--block-size", "8",
            "--eval-batches", "1", "--out-dir", str(tmp_path)]
  a = bench.main(common + ["--steps", "2", "--eval-every", "1", "--sketch-dim", "4", "--tag", "a"])
  b = bench.main(common + ["--steps", "3", "--sketch-dim", "8", "--tag", "b"])
  assert (a[0]["sketch_dim"], a[0]["steps"], b[0]["sketch_dim"], b[0]["steps"]) == (4, 2, 8, 3)
  assert (tmp_path / "recall-a-curve.png").stat().st_size > 0     # --eval-every: the curve plot
  assert not (tmp_path / "recall-b-curve.png").exists()
  merged = bench.main(["--merge", str(tmp_path / "recall-a.json"), str(tmp_path / "recall-b.json"),
                       "--out-dir", str(tmp_path), "--tag", "ab"])
  assert merged == a + b
  md = (tmp_path / "recall-ab.md").read_text()
  assert "| random+local (r = 4, 2 steps) |" in md and "| random+local (r = 8, 3 steps) |" in md
  assert "sketch_dim 4" in md and "sketch_dim 8" in md     # both files' setups
  # one variant, one configuration: the row is the variant's name
  bench.main(["--merge", str(tmp_path / "recall-a.json"), "--out-dir", str(tmp_path), "--tag", "a2"])
  assert "| random+local |" in (tmp_path / "recall-a2.md").read_text()
