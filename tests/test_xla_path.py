"""The blocked xla path equals the materialised reference, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_polysketch import polysketch_attention
from pallas_polysketch import _xla
from pallas_polysketch.ref import polysketch_attention_quadratic


def _inputs(seq, heads=2, head_dim=16, sketch_dim=4, batch=2, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  shape = (batch, seq, heads, head_dim)
  q = jax.random.normal(ks[0], shape) / head_dim ** 0.5
  k = jax.random.normal(ks[1], shape) / head_dim ** 0.5 * 2
  v = jax.random.normal(ks[2], shape)
  fq = jax.random.normal(ks[3], (batch, seq, heads, sketch_dim)) * 0.7
  fk = jax.random.normal(ks[4], (batch, seq, heads, sketch_dim)) * 0.7
  return tuple(x.astype(dtype) for x in (q, k, v, fq, fk)), jax.random.normal(ks[5], shape)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = np.max(np.abs(b))
  return np.max(np.abs(a - b)) / scale if scale else np.max(np.abs(a))


CASES = [  # seq, block_size, chunk_tokens, causal, local_exact
    (64, 16, 32, True, True),      # 2 chunks of 2 blocks
    (72, 16, 48, True, True),      # seq not a multiple of the block; padded chunk
    (72, 16, 48, True, False),
    (40, 8, 1 << 20, True, True),  # one chunk
    (40, 8, 8, True, False),       # chunks of two blocks at least (one padded)
    (72, 16, 32, False, True),
    (72, 16, 32, False, False),
]


@pytest.mark.parametrize("seq,block,chunk,causal,local_exact", CASES)
def test_xla_matches_quadratic_reference(monkeypatch, seq, block, chunk, causal, local_exact):
  monkeypatch.setattr(_xla, "CHUNK_TOKENS", chunk)
  args, cot = _inputs(seq)
  kw = dict(degree=4, block_size=block, causal=causal, local_exact=local_exact)

  def run(fn, **extra):
    loss = lambda *a: jnp.sum(fn(*a, **kw, **extra) * cot)
    out = fn(*args, **kw, **extra)
    grads = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*args)
    return out, grads

  jax.clear_caches()  # CHUNK_TOKENS is read at trace time
  out, grads = run(polysketch_attention, implementation="xla")
  ref_out, ref_grads = run(polysketch_attention_quadratic)
  assert _rel(out, ref_out) < 1e-5
  for name, g, rg in zip(("q", "k", "v", "fq", "fk"), grads, ref_grads):
    assert _rel(g, rg) < 1e-5, name


def test_xla_bfloat16_close_to_reference():
  args, cot = _inputs(72, dtype=jnp.bfloat16)
  kw = dict(degree=4, block_size=16)
  out = polysketch_attention(*args, **kw, implementation="xla")
  assert out.dtype == jnp.bfloat16
  ref = polysketch_attention_quadratic(*args, **kw)
  assert _rel(out, ref) < 2e-2
  g = jax.grad(lambda *a: jnp.sum(polysketch_attention(*a, **kw, implementation="xla")
                                  .astype(jnp.float32) * cot), argnums=(0, 3))(*args)
  rg = jax.grad(lambda *a: jnp.sum(polysketch_attention_quadratic(*a, **kw)
                                   .astype(jnp.float32) * cot), argnums=(0, 3))(*args)
  for a, b in zip(g, rg):
    assert a.dtype == jnp.bfloat16
    assert _rel(a, b) < 3e-2


def test_symmetric_features_inner_products_and_gradient():
  f = jax.random.normal(jax.random.key(1), (5, 6))
  g = jax.random.normal(jax.random.key(2), (5, 6))
  psi = _xla.symmetric_features
  assert psi(f).shape == (5, 21)
  np.testing.assert_allclose(jnp.sum(psi(f) * psi(g), -1), jnp.sum(f * g, -1) ** 2, rtol=1e-5, atol=1e-5)
  from pallas_polysketch.sketches import self_tensor
  w = jax.random.normal(jax.random.key(3), (5,))
  loss = lambda fn: lambda f: jnp.sum(w * jnp.sum(fn(f) * fn(g), -1) ** 1.5)
  np.testing.assert_allclose(jax.grad(loss(psi))(f), jax.grad(loss(self_tensor))(f), rtol=1e-4)


@pytest.mark.parametrize("batch,seq,block", [(2, 16, 16), (3, 16, 16), (2, 32, 16)])
def test_one_block_chunk_gradients_under_jit(batch, seq, block):
  """Regression: a one-block chunk with batch > 1 gave garbage df_k under jit
  (XLA folded the constant-zero exclusive prefix; see _exclusive_cumsum)."""
  args, cot = _inputs(seq, batch=batch)
  loss = lambda fn: lambda *a: jnp.sum(fn(*a) * cot)
  fn = lambda *a: polysketch_attention(*a, block_size=block, implementation="xla")
  ref_fn = lambda *a: polysketch_attention_quadratic(*a, block_size=block)
  got = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2, 3, 4)))(*args)
  want = jax.grad(loss(ref_fn), argnums=(0, 1, 2, 3, 4))(*args)
  for g, w in zip(got, want):
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(w)) or 1))
