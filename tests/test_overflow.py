"""Denominators near float32's limit: right answers or NaN, never a silent 0.

XLA divides by multiplying with 1/den, which past 2^126 is subnormal and
flushed to zero: before the fix, rows with den in (2^126, 2^128) came back as
exact, finite zeros (bench/numerics.py found 192 such rows in a LayerNorm'd
degree-16 model at T = 128k).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_polysketch as ps
from helpers import BACKENDS


def _aligned(seq, weight, head_dim=8):
  """Every q = k = one direction scaled so (q.k)^4 = weight; v = 1 + small."""
  x = jnp.zeros((1, seq, 1, head_dim)).at[..., 0].set(weight ** 0.125)
  v = 1.0 + 0.01 * jax.random.normal(jax.random.key(0), (1, seq, 1, head_dim))
  return x, x, v, ps.self_tensor(x)[..., :4] * 0, ps.self_tensor(x)[..., :4] * 0


@pytest.mark.parametrize("name,kw", list(BACKENDS.items()))
def test_denominator_past_two_to_126_still_divides(name, kw):
  # 256 keys of weight 1e36: den = 2.6e38 < 3.4e38 but > 2^126 = 8.5e37.
  q, k, v, fq, fk = _aligned(256, 1e36)
  out = ps.polysketch_attention(q, k, v, fq, fk, block_size=256, **kw)
  want = np.cumsum(np.asarray(v[0, :, 0], np.float64), axis=0) / np.arange(1, 257)[:, None]
  got = np.asarray(out[0, :, 0], np.float64)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, rtol=1e-5)   # not 0 for the last rows


@pytest.mark.parametrize("name,kw", list(BACKENDS.items()))
def test_overflowed_denominator_is_nan_not_zero(name, kw):
  q, k, v, fq, fk = _aligned(256, 3e36)       # den reaches 7.7e38: inf
  out = np.asarray(ps.polysketch_attention(q, k, v, fq, fk, block_size=256, **kw)[0, :, 0])
  assert np.all(np.isfinite(out[:100]))      # den = 3e38 at row 99
  assert np.all(np.isnan(out[120:]))         # past float32's max: reported


def test_gradients_past_the_reciprocal_limit_are_nan():
  q, k, v, fq, fk = _aligned(256, 1e36)
  grad = jax.grad(lambda q: jnp.sum(ps.polysketch_attention(q, k, v, fq, fk, block_size=256,
                                                            implementation="xla")))(q)
  assert np.isnan(np.asarray(grad)).any()    # rows with den >= 2^126 cannot be represented


@pytest.mark.parametrize("h", [64, 128])
@pytest.mark.parametrize("name,kw", list(BACKENDS.items()))
def test_gradients_with_a_state_near_float32s_max(name, kw, h):
  """den = 2^125 from the sketched prefix, whose state S is about 2^120: the
  dq kernel's S dO^T alone would reach 2^128 (inf); it scales dO's rows by a
  power of two first (`_pallas_backward._row_terms`), or at H = 128 on v5e's
  tiles (`normaliser_apart`) S by the block's smallest. Against float64."""
  from pallas_polysketch.ref import polysketch_attention_quadratic
  t, r = 256, 8
  half = (jnp.arange(t) % 128 >= 64)[None, :, None, None]
  q = jnp.zeros((1, t, 1, h))
  v = jnp.where(half, 2.0, 1.0) + 0.01 * jax.random.normal(jax.random.key(0), (1, t, 1, h))
  fq = jnp.zeros((1, t, 1, r)).at[..., :2].set(4.0)
  big = jnp.float32(2.0 ** 57)      # two key directions, phi_k = 2^114, z = 2^120 each
  fk = jnp.zeros((1, t, 1, r)).at[..., 0].set(jnp.where(half[..., 0], 0.0, big))
  fk = fk.at[..., 1].set(jnp.where(half[..., 0], big, 0.0))
  g = 4.0 + 0.1 * jax.random.normal(jax.random.key(1), (1, t, 1, h))
  got = jax.grad(lambda fq: jnp.sum(ps.polysketch_attention(
      q, q, v, fq, fk, block_size=128, **kw) * g))(fq)
  with jax.enable_x64(True):
    f64 = lambda x: jnp.asarray(x, jnp.float64)
    want = jax.grad(lambda fq: jnp.sum(polysketch_attention_quadratic(
        f64(q), f64(q), f64(v), fq, f64(fk), block_size=128) * f64(g)))(f64(fq))
    assert np.all(np.isfinite(np.asarray(got)))
    assert float(jnp.max(jnp.abs(f64(got) - want)) / jnp.max(jnp.abs(want))) < 1e-5


@pytest.mark.parametrize("generation", ["v5e", "v6e"])
def test_gradients_with_large_and_small_dens_in_one_block(generation):
  """One block holds tokens with den = 2^125 (a prefix state near 2^120) and
  tokens with den near 1 (features of 2^-20), over two query heads of one kv
  head: they all meet the same S, so the dq kernel's power of two is one per
  block (`_row_terms`); per token, S dO^T was inf for the small ones. v5e's
  tiles scale S (H = 128, `normaliser_apart`), v6e's scale dO. Against
  float64, per query head."""
  from pallas_polysketch import tpu_config
  from pallas_polysketch.ref import polysketch_attention_quadratic
  t, r, h, block = 256, 8, 128, 128
  half = (jnp.arange(t) % 128 >= 64)[None, :, None, None]
  q = 0.01 * jax.random.normal(jax.random.key(5), (1, t, 2, h))
  k = 0.01 * jax.random.normal(jax.random.key(6), (1, t, 1, h))
  v = jnp.where(half, 2.0, 1.0) + 0.01 * jax.random.normal(jax.random.key(0), (1, t, 1, h))
  alternate = (jnp.arange(t) % 2 == 0)[None, :, None, None]
  fq0 = jnp.where(alternate, 4.0, 2.0 ** -20) * jnp.zeros((1, t, 1, r)).at[..., :2].set(1.0)
  fq1 = jnp.zeros((1, t, 1, r)).at[..., :2].set(2.0 ** -20).at[..., 3].set(1.0)
  fq = jnp.concatenate([fq0, fq1], axis=2)
  big = jnp.float32(2.0 ** 57)
  fk = jnp.zeros((1, t, 1, r)).at[..., 0].set(jnp.where(half[..., 0], 0.0, big))
  fk = fk.at[..., 1].set(jnp.where(half[..., 0], big, 0.0)).at[..., 3].set(1.0)
  g = 4.0 + 0.1 * jax.random.normal(jax.random.key(1), (1, t, 2, h))
  config = tpu_config.TileConfig(generation=generation)
  got = jax.grad(lambda v, fq: jnp.sum(ps.polysketch_attention(
      q, k, v, fq, fk, block_size=block, implementation="pallas", interpret=True,
      tile_config=config) * g), argnums=(0, 1))(v, fq)
  with jax.enable_x64(True):
    f64 = lambda x: jnp.asarray(x, jnp.float64)
    rep = lambda x: jnp.repeat(f64(x), 2, axis=2)
    want = jax.grad(lambda v, fq: jnp.sum(polysketch_attention_quadratic(
        f64(q), rep(k), jnp.repeat(v, 2, axis=2), fq, rep(fk), block_size=block) * f64(g)),
        argnums=(0, 1))(f64(v), f64(fq))
  for name, a, w in zip(("v", "fq"), got, want):
    a, w = np.asarray(a, np.float64), np.asarray(w)
    assert np.all(np.isfinite(a)), name
    for head in range(a.shape[2] if name == "fq" else 1):
      err = np.max(np.abs(a[:, :, head] - w[:, :, head])) / np.max(np.abs(w[:, :, head]))
      assert err < 1e-5, (name, head, err)


def _large_den_inputs(h, seq=256):
  """LayerNorm'd q, k scaled by 100: |q.k| up to ~1e4 and denominators past 2^64
  (~1e20), far inside float32's range, where d(1 / den) = -1 / den^2 is 0."""
  from helpers import layer_inputs
  (q, k, v, fq, fk), cot = layer_inputs(0, 1, seq, 2, 1, h, 8)
  sketch = ps.random_sketch_init(jax.random.key(3), h, 8, 4)
  q, k = 100.0 * q, 100.0 * k
  return (q, k, v, ps.random_sketch_features(sketch, q),
          ps.random_sketch_features(sketch, k)), cot


_LARGE_DEN_IDS = jnp.asarray(np.repeat([0, 1, 2], [100, 128, 28])[None].astype(np.int32))
_LARGE_DEN_CASES = {
    # The paths whose final division was differentiated by autodiff.
    "polynomial": None,
    "segments_xla": dict(segment_ids=_LARGE_DEN_IDS, implementation="xla"),
    "segments_pallas": dict(segment_ids=_LARGE_DEN_IDS, implementation="pallas",
                            interpret=True),
    "non_causal_xla": dict(causal=False, implementation="xla"),
}


@pytest.mark.parametrize("case", list(_LARGE_DEN_CASES))
def test_gradients_with_denominators_past_two_to_64(case):
  """den ~ 1e20 (finite, 1 / den normal): the gradients through the final
  division were silently wrong (the denominator's term dropped, dq and dk 2.5-3.2
  off) on the paths that differentiate it by autodiff. Against float64."""
  from helpers import f32_tol, rel_err
  from pallas_polysketch import ref
  h = 128 if case == "segments_pallas" else 64
  args, cot = _large_den_inputs(h)
  spec = _LARGE_DEN_CASES[case]
  if spec is None:   # in float64 with x64 the reference is the function itself
    fn = want_fn = lambda q, k, v: ps.polynomial_attention(q, k, v, segment_ids=_LARGE_DEN_IDS)
    args = args[:3]
  else:
    kw = dict(spec, block_size=128)
    fn = lambda *a: ps.polysketch_attention(*a, **kw)
    want_fn = lambda *a: ref.polysketch_attention_quadratic(
        *a, block_size=128, causal=kw.get("causal", True), segment_ids=kw.get("segment_ids"))
  got = jax.grad(lambda *a: jnp.sum(fn(*a) * cot), argnums=tuple(range(len(args))))(*args)
  with jax.enable_x64(True):
    f64 = lambda x: jnp.asarray(x, jnp.float64)
    want = jax.grad(lambda *a: jnp.sum(want_fn(*a) * f64(cot)),
                    argnums=tuple(range(len(args))))(*(f64(x) for x in args))
  for i, (a, w) in enumerate(zip(got, want)):
    assert rel_err(a, w) < 2 * f32_tol(4, h, grad=True), (case, i, rel_err(a, w))


def test_prefill_and_decode_gradients_with_denominators_past_two_to_64():
  """As above for the xla prefill (its scan differentiated by autodiff) of 135
  tokens then one `decode_step`: dq was 1.7 off (relative)."""
  from helpers import f32_tol, rel_err
  from pallas_polysketch import ref
  (q, k, v, fq, fk), cot = _large_den_inputs(64, seq=136)

  def loss(q, k):
    args = (q, k, v, fq, fk)
    o1, state = ps.prefill(*(x[:, :135] for x in args), block_size=128, implementation="xla")
    o2, _ = ps.decode_step(state, *(x[:, 135:] for x in args))
    return jnp.sum(jnp.concatenate([o1, o2], axis=1) * cot)

  got = jax.grad(loss, argnums=(0, 1))(q, k)
  with jax.enable_x64(True):
    f64 = lambda x: jnp.asarray(x, jnp.float64)
    want = jax.grad(lambda q, k: jnp.sum(ref.polysketch_attention_quadratic(
        q, k, f64(v), f64(fq), f64(fk), block_size=128) * f64(cot)), argnums=(0, 1))(f64(q), f64(k))
  for i, (a, w) in enumerate(zip(got, want)):
    assert rel_err(a, w) < 2 * f32_tol(4, 64, grad=True), (i, rel_err(a, w))
