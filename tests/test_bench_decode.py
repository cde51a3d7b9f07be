"""The decode benchmark runs end to end at tiny sizes (no timing assertions)."""
import json
from helpers import load_bench


TINY = ["--shapes", "tiny:4:2:16:8:32", "--min-reps", "1", "--max-reps", "1",
        "--min-time", "0", "--prefill-reps", "1"]


def test_decode_benchmark_runs_end_to_end(tmp_path):
  bench = load_bench("decode")
  contexts = [64, 128, 256]
  bench.main(["--contexts", *map(str, contexts), "--prefill-seqs", "40", *TINY,
              "--out-dir", str(tmp_path), "--tag", "tiny"])
  report = json.loads((tmp_path / "decode-tiny.json").read_text())
  assert (tmp_path / "decode-tiny.png").stat().st_size > 0
  md = (tmp_path / "decode-tiny.md").read_text()
  assert "| context |" in md and "| seq |" in md
  meta = report["meta"]
  for key in ("jax", "backend", "cpu_model", "cpu_count", "loadavg_start", "loadavg_end",
              "command", "args", "state_source", "dtype"):
    assert key in meta, key
  (shape,) = report["shapes"]
  assert shape["shape"] == {"name": "tiny", "heads": 4, "kv_heads": 2, "head_dim": 16,
                            "sketch_dim": 8, "block_size": 32}
  rows = shape["decode"]
  assert [r["context"] for r in rows] == contexts
  variants = ("softmax", "softmax_head_major")
  for r in rows:
    p = r["polysketch"]
    for key in ("latency_s", "step_s", "fold_s"):
      assert p[key] > 0, key
    assert p["fills"] == {"step": r["context"] % 32, "fold": 31}
    assert (p["compile_s"] > 0) == (r is rows[0])    # one executable for every context
    for v in variants:
      assert r[v]["latency_s"] > 0 and len(r[v]["times_s"]) == 1
  # State bytes: the exact constant r^2 H + r^2 + b (2H + r) float32 numbers
  # per kv head plus the int32 fill; the KV cache: 2 L K H float32, linear in L.
  state = {r["polysketch"]["state_bytes_per_seq"] for r in rows}
  assert state == {4 * 2 * (64 * 16 + 64 + 32 * (2 * 16 + 8)) + 4}
  for v in variants:
    assert [r[v]["kv_bytes_per_seq"] for r in rows] == [2 * c * 2 * 16 * 4 for c in contexts]
  a = shape["analysis"]
  assert a["state_bytes_constant"] and a["kv_bytes_linear"]
  assert a["kv_bytes_per_token"] == 2 * 2 * 16 * 4
  state_bytes = state.pop()
  assert a["break_even_context"] == state_bytes // 256 + 1       # 75
  assert a["state_smaller_from_context"] == 128
  assert set(a) >= {"polysketch", *variants}
  (pre,) = shape["prefill"]
  assert pre["seq"] == 40 and pre["tokens_per_s"] > 0
  assert pre["state_bytes_per_seq"] == state_bytes
  assert pre["decode_from_prefill"]["fills"] == {"step": 8, "fold": 31}


def test_prefilled_state_matches_standin_shapes(tmp_path):
  bench = load_bench("decode")
  report = bench.main(["--contexts", "48", "--state", "prefill", "--prefill-seqs",
                       "--softmax", "softmax", *TINY, "--out-dir", str(tmp_path),
                       "--tag", "pre", "--no-plot"])
  (shape,) = report["shapes"]
  (row,) = shape["decode"]
  assert "prefill" in report["meta"]["state_source"]
  assert row["polysketch"]["fills"] == {"step": 16, "fold": 31}
  assert "softmax_head_major" not in row and shape["prefill"] == []
  assert not (tmp_path / "decode-pre.png").exists()


def test_shape_presets_and_overrides():
  bench = load_bench("decode")
  opts = bench.parse_args(["--sketch-dim", "16"])
  assert [(s.name, s.heads, s.kv_heads, s.head_dim, s.sketch_dim, s.block_size)
          for s in opts.shapes] == [("gpt2", 12, 12, 64, 16, 256), ("gqa", 32, 8, 128, 16, 256)]
  assert opts.contexts == [1024 * 2 ** i for i in range(8)]


def test_head_major_baseline_equals_dot_product_attention():
  import jax
  import jax.numpy as jnp
  import numpy as np
  bench = load_bench("decode")
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (2, 1, 6, 16))
  k, v = (jax.random.normal(kk, (2, 40, 3, 16)) for kk in ks[1:])
  want = jax.nn.dot_product_attention(q, k, v)
  got = bench.softmax_head_major_step(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
