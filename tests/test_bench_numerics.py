"""bench/numerics.py end to end at tiny sizes, and its float64 references."""
import json

import jax
import jax.numpy as jnp
import numpy as np

from helpers import load_bench


def test_numpy_reference_matches_jax_grad_of_quadratic_reference():
  """The hand-written float64 rows reference and its gradients = jax.grad of
  the materialised DESIGN §1.3 reference (pallas_polysketch.ref)."""
  from pallas_polysketch.ref import polysketch_attention_quadratic

  nm = load_bench("numerics")
  t, h, r, b, p = 96, 8, 4, 32, 4
  inputs = nm.make_inputs(t, h, p, r, topics=3, noise=0.5, seed=3)
  rows = np.array([0, 31, 32, 50, 95])
  c = np.random.default_rng(0).standard_normal((len(rows), h))
  out, den, grads = nm.reference_rows(*inputs, rows, c, degree=p, block_size=b)
  with jax.enable_x64(True):
    def loss(*a):
      o = polysketch_attention_quadratic(*(x[None, :, None] for x in a), degree=p,
                                         block_size=b)[0, :, 0]
      return jnp.sum(o[rows] * c), o
    (_, o), g = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(
        *(jnp.asarray(x, jnp.float64) for x in inputs))
    np.testing.assert_allclose(out, np.asarray(o)[rows], rtol=1e-12)
    for name, mine, ref in zip(nm.GRAD_NAMES, (grads[n] for n in nm.GRAD_NAMES), g):
      np.testing.assert_allclose(mine, np.asarray(ref), rtol=1e-10, atol=1e-12, err_msg=name)
  dens = nm.all_denominators(*inputs[:2], *inputs[3:], degree=p, block_size=b)
  np.testing.assert_allclose(dens[rows], den, rtol=1e-12)


def test_numerics_bench_runs_end_to_end(tmp_path):
  nm = load_bench("numerics")
  # T = 512: two blocks of 256 (the sketched prefix and the exact local block
  # both contribute), the block and length of a lowered and libtpu-compiled
  # interpret configuration (test_tpu_compile.py).
  report = nm.main(["--xla-seqs", "512", "--pallas-seqs", "512", "--pallas-long-seq", "0",
                    "--degrees", "4", "--head-dims", "64", "--dtypes", "float32",
                    "--overflow-seq", "512", "--overflow-long-seq", "0",
                    "--out-dir", str(tmp_path), "--tag", "tiny"])
  saved = json.loads((tmp_path / "tiny.json").read_text())
  assert "| xla | 512 | 4 | 64 | float32 |" in (tmp_path / "tiny.md").read_text()
  assert {r["path"] for r in saved["results"]} == {"xla", "pallas"}
  for r in saved["results"]:
    assert r["finite_out"] and r["finite_grads"]
    assert r["out_err_rows"] < 1e-5 and r["grad_err_max"] < 1e-4, r
  for g in saved["groups"]:
    assert g["xla_float64_vs_numpy"]["out_rows"] < 1e-12
    assert max(g["xla_float64_vs_numpy"]["grads"].values()) < 1e-12
  cases = {c["name"]: c for c in report["overflow_cases"]}
  assert set(cases) == {"A_weight_overflow"}   # the B cases need T >= 4096 to overflow
  for run in cases["A_weight_overflow"]["runs"]:  # an infinite weight: NaN rows
    assert run["bands"]["over"]["nan"] == run["bands"]["over"]["rows"] == 512
