"""Gradients of the `xla` path: finite differences, the quadratic reference,
and the learned sketch's parameters."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import pallas_polysketch as ps
from pallas_polysketch import ref

CONFIGS = [  # (causal, local_exact)
    (True, True),
    (True, False),
    (False, True),
]


@pytest.mark.parametrize("causal,local_exact", CONFIGS)
def test_xla_grads_match_finite_differences(make_inputs, causal, local_exact):
  """Reverse mode against central differences, in float64, at tiny shapes.

  seq 12 with block 8: two blocks, the second padded.
  """
  inputs = make_inputs(1, 1, 12, 2, 4, 4)
  with jax.enable_x64(True):
    args = tuple(jnp.asarray(np.asarray(x), jnp.float64) for x in inputs)

    def f(*args):
      return ps.polysketch_attention(*args, degree=4, block_size=8, causal=causal,
                                     local_exact=local_exact, implementation="xla")

    check_grads(f, args, order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("causal,local_exact,seq,block_size", [
    (True, True, 32, 8),
    (True, True, 27, 16),  # padded last block
    (True, False, 27, 16),
    (False, True, 27, 16),
])
def test_xla_grads_match_quadratic_reference(make_inputs, causal, local_exact, seq,
                                             block_size):
  q, k, v, fq, fk = make_inputs(seq, 2, seq, 2, 8, 4)
  cotangent = jnp.asarray(np.random.default_rng(0).standard_normal(q.shape), jnp.float32)
  kw = dict(degree=4, block_size=block_size, causal=causal, local_exact=local_exact)

  def loss(fn):
    return lambda *args: jnp.sum(fn(*args, **kw) * cotangent)

  argnums = (0, 1, 2, 3, 4)
  xla = lambda *a, **kw: ps.polysketch_attention(*a, implementation="xla", **kw)
  got = jax.jit(jax.grad(loss(xla), argnums))(q, k, v, fq, fk)
  want = jax.jit(jax.grad(loss(ref.polysketch_attention_quadratic), argnums))(q, k, v, fq, fk)
  # q and k enter only through the exact local weights.
  q_k_matter = causal and local_exact
  for name, g, w in zip(("q", "k", "v", "q_features", "k_features"), got, want):
    w = np.asarray(w, np.float64)
    assert g.shape == w.shape, name
    if name in ("q", "k") and not q_k_matter:
      np.testing.assert_array_equal(g, 0.0, err_msg=name)
      continue
    assert np.abs(w).max() > 0, name
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=1e-4,
                               atol=1e-5 * np.abs(w).max(), err_msg=name)


def test_learned_sketch_params_get_gradients(make_qkv):
  """Every parameter of the learned sketch receives a finite, non-zero gradient
  through the op, equal to the one through the quadratic reference."""
  r = 4
  q, k, v = make_qkv(0, 1, 32, 2, 8)
  params = ps.learned_sketch_init(jax.random.key(0), 8, sketch_dim=r)
  kw = dict(degree=4, block_size=8)  # 4 blocks: the sketched prefix is used

  def loss(params, attention):
    fq = ps.learned_sketch_features(params, q)
    fk = ps.learned_sketch_features(params, k)
    return jnp.sum(attention(q, k, v, fq, fk, **kw) ** 2)

  grads = jax.jit(jax.grad(loss), static_argnums=1)(params, ps.polysketch_attention)
  want = jax.jit(jax.grad(loss), static_argnums=1)(params, ref.polysketch_attention_quadratic)
  leaves = jax.tree_util.tree_leaves_with_path(grads)
  assert len(leaves) == 16  # 2 branches x 2 blocks x (ln_scale, ln_bias, w_in, w_out)
  for path, g in leaves:
    name = jax.tree_util.keystr(path)
    assert bool(jnp.all(jnp.isfinite(g))), name
    assert float(jnp.max(jnp.abs(g))) > 0, name
  for g, w in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want)):
    w = np.asarray(w, np.float64)
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=1e-3,
                               atol=1e-4 * np.abs(w).max())
