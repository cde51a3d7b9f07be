"""The benchmark runs end to end at tiny sizes (no timing assertions)."""
import json

import jax
import numpy as np
from helpers import load_bench


def test_benchmark_runs_end_to_end(tmp_path):
  bench = load_bench("attention")
  bench.main(["--seqs", "128", "256", "--heads", "2", "--block-size", "64",
              "--dtypes", "float32", "--baseline-plain", "--min-reps", "1",
              "--max-reps", "1", "--min-time", "0", "--out-dir", str(tmp_path),
              "--tag", "tiny"])
  report = json.loads((tmp_path / "tiny.json").read_text())
  assert (tmp_path / "tiny.png").stat().st_size > 0
  meta = report["meta"]
  for key in ("jax", "backend", "cpu_count", "platform", "config", "args"):
    assert key in meta
  results = report["results"]
  methods = {r["method"] for r in results}
  assert methods == {"polysketch", "plain", "softmax", "polynomial"}
  assert len(results) == 2 * 4 * 2  # seqs x methods x modes
  for r in results:
    assert r["status"] == "ok", r
    assert r["median_s"] > 0 and r["compile_s"] > 0 and all(t > 0 for t in r["times_s"])
    assert r["memory"]["total"] > 0
  assert set(report["speedup_softmax_over_polysketch"]) == {
      f"float32/{mode}/{seq}" for mode in ("fwd", "fwd+bwd") for seq in (128, 256)}


def test_over_budget_is_recorded_not_run(tmp_path):
  bench = load_bench("attention")
  report = bench.main(["--seqs", "256", "--heads", "2", "--block-size", "64",
                       "--dtypes", "float32", "--methods", "softmax", "--modes", "fwd",
                       "--budget-gib", "1e-6", "--out-dir", str(tmp_path), "--no-plot"])
  (rec,) = report["results"]
  assert rec["status"] == "oom" and "OOM (predicted" in rec["note"]
  assert "times_s" not in rec


def test_plain_baseline_matches_reference():
  bench = load_bench("attention")
  from pallas_polysketch.ref import polysketch_attention_quadratic
  ks = jax.random.split(jax.random.key(0), 5)
  q, k, v = (jax.random.normal(kk, (1, 64, 2, 8)) * 0.5 for kk in ks[:3])
  fq, fk = (jax.random.normal(kk, (1, 64, 2, 4)) * 0.5 for kk in ks[3:])
  out = bench.plain_blocked_attention(q, k, v, fq, fk, degree=4, block_size=16)
  ref = polysketch_attention_quadratic(q, k, v, fq, fk, degree=4, block_size=16)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_einsum_baseline_matches_reference():
  """The official einsum form (causal, non-causal, GQA) computes DESIGN §1.3."""
  bench = load_bench("attention")
  from pallas_polysketch.ref import polysketch_attention_quadratic
  ks = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(ks[0], (1, 64, 4, 8)) * 0.5
  k, v = (jax.random.normal(kk, (1, 64, 2, 8)) * 0.5 for kk in ks[1:3])
  fq = jax.random.normal(ks[3], (1, 64, 4, 4)) * 0.5
  fk = jax.random.normal(ks[4], (1, 64, 2, 4)) * 0.5
  for causal in (True, False):
    out = bench.einsum_form_attention(q, k, v, fq, fk, degree=4, block_size=16, causal=causal)
    ref = polysketch_attention_quadratic(q, k, v, fq, fk, degree=4, block_size=16,
                                         causal=causal)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
