"""The custom VJP and the two backward kernels in interpret mode (DESIGN §1.4)."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.test_util import check_grads

import pallas_polysketch as ps
from pallas_polysketch import ref, tpu_config

# f32: the kernels and jax.grad of the materialised reference sum the same
# terms in different orders; 1e-4 of each gradient's scale is far above that
# rounding and far below any missing or mis-scaled term.
F32_RTOL = 1e-4
# bf16 inputs: MXU operands (weights, states, dnum, phi) are rounded to bf16
# and gradients come back in bf16 (dq, dk, dv): several 2^-8 roundings.
BF16_RTOL = 5e-2
ARGNAMES = ("q", "k", "v", "q_features", "k_features")


def _inputs(key, b, t, n, h, r, dtype=jnp.float32):
  ks = jax.random.split(key, 6)
  q, k = (jax.random.normal(ks[i], (b, t, n, h)) / np.sqrt(h) for i in range(2))
  v = jax.random.normal(ks[2], (b, t, n, h))
  fq, fk = (jax.random.normal(ks[3 + i], (b, t, n, r)) / np.sqrt(r) for i in range(2))
  cotangent = jax.random.normal(ks[5], (b, t, n, h))
  return tuple(x.astype(dtype) for x in (q, k, v, fq, fk)), cotangent


def _grads(fn, args, cotangent):
  loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cotangent)
  return jax.grad(loss, argnums=tuple(range(5)))(*args)


def _rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)


CASES = [
    # (causal, local_exact, degree, h, r, t, block, local_tile, dtype, interpret)
    (True, True, 4, 64, 16, 300, 128, None, jnp.float32, True),
    pytest.param(True, True, 2, 64, 16, 256, 256, 128, jnp.float32, "tpu", marks=pytest.mark.slow),
    pytest.param(True, True, 8, 128, 32, 200, 128, None, jnp.float32, True, marks=pytest.mark.slow),
    pytest.param(True, False, 4, 64, 16, 300, 128, None, jnp.float32, True, marks=pytest.mark.slow),
    (True, False, 4, 64, 16, 256, 256, 128, jnp.float32, "tpu"),
    pytest.param(False, True, 4, 64, 16, 300, 128, None, jnp.float32, True, marks=pytest.mark.slow),
    (False, False, 4, 128, 32, 130, 128, None, jnp.float32, "tpu"),
    (True, True, 4, 64, 32, 300, 128, None, jnp.bfloat16, True),
    # Separate tiles: the forward in one 256 tile, the backward's diagonal block (dkv) in 128.
    (True, True, 4, 64, 16, 512, 256, {"local_tile": 256, "dkv_local_tile": 128},
     jnp.float32, True),
    pytest.param(False, True, 4, 64, 16, 256, 128, None, jnp.bfloat16, True, marks=pytest.mark.slow),
    # H = 128: q, k, v, dO, dq, dk, dv tokens on rows (H = 64 above: on lanes).
    (True, True, 4, 128, 16, 256, 256, 128, jnp.bfloat16, True),
]


def _tile_config(local_tile):
  """local_tile: None, an int (every kernel), or a dict of TileConfig tile fields."""
  if isinstance(local_tile, dict):
    return tpu_config.TileConfig(**local_tile)
  return tpu_config.TileConfig(local_tile=local_tile)


@pytest.mark.parametrize("causal,local_exact,degree,h,r,t,block,local_tile,dtype,interpret", CASES)
def test_gradients_match_quadratic_reference(causal, local_exact, degree, h, r, t, block,
                                             local_tile, dtype, interpret):
  args, cotangent = _inputs(jax.random.PRNGKey(t + r), 1, t, 2, h, r, dtype)
  kw = dict(degree=degree, block_size=block, causal=causal, local_exact=local_exact)
  interpret = pltpu.InterpretParams() if interpret == "tpu" else interpret
  got = _grads(lambda *a: ps.polysketch_attention(
      *a, implementation="pallas", interpret=interpret,
      tile_config=_tile_config(local_tile), **kw), args, cotangent)
  want = _grads(lambda *a: ref.polysketch_attention_quadratic(
      *(x.astype(jnp.float32) for x in a), **kw), args, cotangent)
  tol = F32_RTOL if dtype == jnp.float32 else BF16_RTOL
  for name, g, w, x in zip(ARGNAMES, got, want, args):
    assert g.shape == x.shape and g.dtype == x.dtype, name
    if not causal and name in ("q", "k"):
      # Non-causal attention sees q and k only through their features.
      np.testing.assert_array_equal(g, 0.0)
      continue
    assert _rel_err(g, w) < tol, (name, _rel_err(g, w))


def test_gqa_sketched_diagonal_h128_two_tiles():
  """The dkv kernel's diagonal block with everything at once: two query heads
  per kv head (dQ per head, dK and dV summed over the group), a sketched
  diagonal (df_q, df_k from it, added to the prefix's), H = 128 (tokens on
  rows) and two local tiles per block; against the xla path."""
  b, t, n, kv, h, r = 1, 512, 2, 1, 128, 16
  ks = jax.random.split(jax.random.PRNGKey(5), 6)
  q = jax.random.normal(ks[0], (b, t, n, h)) / np.sqrt(h)
  k = jax.random.normal(ks[1], (b, t, kv, h)) / np.sqrt(h)
  v = jax.random.normal(ks[2], (b, t, kv, h))
  fq = jax.random.normal(ks[3], (b, t, n, r)) / np.sqrt(r)
  fk = jax.random.normal(ks[4], (b, t, kv, r)) / np.sqrt(r)
  cotangent = jax.random.normal(ks[5], (b, t, n, h))
  kw = dict(block_size=256, local_exact=False)
  got = _grads(lambda *a: ps.polysketch_attention(
      *a, implementation="pallas", interpret=True,
      tile_config=tpu_config.TileConfig(local_tile=128), **kw), (q, k, v, fq, fk), cotangent)
  want = _grads(lambda *a: ps.polysketch_attention(*a, implementation="xla", **kw),
                (q, k, v, fq, fk), cotangent)
  for name, g, w in zip(ARGNAMES, got, want):
    if name in ("q", "k"):   # a sketched diagonal sees q and k only through the features
      np.testing.assert_array_equal(g, 0.0)
      continue
    assert _rel_err(g, w) < F32_RTOL, (name, _rel_err(g, w))


def test_check_grads_in_interpret_mode():
  args, _ = _inputs(jax.random.PRNGKey(11), 1, 136, 1, 64, 8)
  fn = lambda *a: ps.polysketch_attention(*a, block_size=128, implementation="pallas",
                                          interpret=True)
  check_grads(fn, args, order=1, modes=["rev"], atol=1e-2, rtol=1e-2, eps=1e-3)


def test_residuals_hold_no_per_block_state():
  """At T = 32k the VJP saves inputs, O and den: nothing of size (T/b) r^2 H."""
  b, t, n, h, r, block = 1, 32768, 2, 64, 32, 256
  shapes = [jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16)] * 3 + [
      jax.ShapeDtypeStruct((b, t, n, r), jnp.bfloat16)] * 2
  fn = lambda *a: ps.polysketch_attention(*a, block_size=block, implementation="pallas",
                                          interpret=True)
  residuals = jax.tree.leaves(jax.eval_shape(lambda *a: jax.vjp(fn, *a)[1], *shapes))
  per_block_states = b * n * (t // block) * r * r * h
  assert residuals, "the VJP closed over nothing?"
  # Every residual is at most the size of q ([B, T, N, H]); per-block states
  # would be (r^2 / b) = 4x larger still.
  assert max(x.size for x in residuals) <= b * t * n * h < per_block_states // 2
  residual_bytes = sum(x.size * x.dtype.itemsize for x in residuals)
  input_bytes = sum(x.size * x.dtype.itemsize for x in shapes)
  # q, k, v, features, O (bf16) and den (f32): 2*(4H + 2r) + 4 bytes a token-head,
  # plus the padded copies jit may keep: at most twice that.
  per_token_head = residual_bytes / (b * t * n)
  assert per_token_head <= 2 * (2 * (4 * h + 2 * r) + 4)
  assert residual_bytes >= input_bytes


def test_training_through_kernel_matches_quadratic_reference():
  """A few AdamW steps of a tiny attention model: the same losses step for step."""
  key = jax.random.PRNGKey(0)
  b, t, d, n, h, r = 2, 160, 32, 2, 64, 8
  ks = jax.random.split(key, 6)
  x = jax.random.normal(ks[0], (b, t, d))
  target = jax.random.normal(ks[1], (b, t, d))
  params = {name: jax.random.normal(k_, shape) * 0.2 for name, k_, shape in (
      ("wq", ks[2], (d, n * h)), ("wk", ks[3], (d, n * h)), ("wv", ks[4], (d, n * h)),
      ("wo", ks[5], (n * h, d)))}
  sketch = ps.random_sketch_init(jax.random.PRNGKey(1), h, r, degree=4)

  def model(params, attention):
    def heads(w):
      y = (x @ w).reshape(b, t, n, h)
      return y / jnp.linalg.norm(y, axis=-1, keepdims=True)  # keep (q.k)^4 tame
    q, k, v = heads(params["wq"]), heads(params["wk"]), heads(params["wv"])
    fq, fk = ps.random_sketch_features(sketch, q), ps.random_sketch_features(sketch, k)
    o = attention(q, k, v, fq, fk)
    return jnp.mean((o.reshape(b, t, n * h) @ params["wo"] - target) ** 2)

  def train(attention):
    opt = optax.adamw(3e-2)
    state = opt.init(params)
    p, losses = params, []
    for _ in range(4):
      loss, grads = jax.value_and_grad(model)(p, attention)
      updates, state = opt.update(grads, state, p)
      p = optax.apply_updates(p, updates)
      losses.append(float(loss))
    return np.array(losses)

  kw = dict(block_size=128)
  kernel = train(lambda *a: ps.polysketch_attention(*a, implementation="pallas",
                                                    interpret=True, **kw))
  reference = train(lambda *a: ref.polysketch_attention_quadratic(*a, **kw))
  assert reference[-1] < reference[0]  # it does train
  np.testing.assert_allclose(kernel, reference, rtol=1e-4)


def test_split_dot_keeps_float32_operands_to_2_pow_minus_16():
  """The backward's cancelling products in bf16 kernels: float32 operands as
  bf16 hi + lo pairs, three bf16 passes, carry about 16 bits, where one bf16
  rounding keeps 8; an exactly-bf16 operand (V) is not split."""
  from pallas_polysketch._pallas_common import NN_DIMS, split_dot, split_operand
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (64, 80), jnp.float32)
  b = jax.random.normal(kb, (80, 128), jnp.float32)
  exact = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
  scale = np.abs(np.asarray(a, np.float64)) @ np.abs(np.asarray(b, np.float64))
  err = lambda got: float(np.max(np.abs(np.asarray(got, np.float64) - exact) / scale))
  assert err(split_dot(split_operand(a, True), split_operand(b, True), NN_DIMS)) < 2 ** -15
  assert err(split_dot(split_operand(a, "exact"), split_operand(b, "exact"), NN_DIMS)) > 2 ** -10
  assert err(split_dot(split_operand(a, False), split_operand(b, False), NN_DIMS)) < 2 ** -20
  b16 = b.astype(jnp.bfloat16).astype(jnp.float32)
  exact = np.asarray(a, np.float64) @ np.asarray(b16, np.float64)
  parts = split_operand(b16, "exact")
  assert len(parts) == 1 and parts[0].dtype == jnp.bfloat16
  assert err(split_dot(split_operand(a, True), parts, NN_DIMS)) < 2 ** -15
