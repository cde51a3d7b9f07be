"""Exact polynomial attention (DESIGN §1.1), O(T^2): the quality reference."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_polysketch import _validation


def compute_dtype(x) -> jnp.dtype:
  """float32, or float64 for float64 inputs (with x64 enabled)."""
  return jnp.promote_types(x.dtype, jnp.float32)


# XLA divides by multiplying with the reciprocal, which past 2^126 is subnormal
# and flushed to zero (CPU and TPU): a denominator in (2^126, 2^128) silently
# gave 0 outputs (bench/numerics.py). Scaling numerator and denominator by an
# exact power of two first keeps them right up to float32's max.
_LARGE_DENOMINATOR = 2.0 ** 100
_DENOMINATOR_SCALE = 2.0 ** -64
RECIPROCAL_LIMIT = 2.0 ** 126


@jax.custom_jvp
def divide_by_denominator(num, den):
  """num / den, den > 0 broadcastable to num; exact for den up to float32's max,
  NaN (never a silent 0) where den overflowed to inf. num must be finite: a
  numerator that overflowed (|sum_j w_ij v_j| past float32's max, e.g.
  |q.k| ~ 5e7 at p = 4, far beyond LayerNorm'd inputs) stays +-inf.

  Differentiated as (dnum - out dden) / den (`_divide_jvp`): the derivative of
  a plain division takes 1 / den^2, which is 0 in float32 for den > 2^64 (den
  ~ 1e20 at LayerNorm'd magnitudes), so the gradient through the denominator
  was silently dropped."""
  scale = jnp.where(den > _LARGE_DENOMINATOR, _DENOMINATOR_SCALE, 1.0).astype(den.dtype)
  out = (num * scale) / (den * scale)
  return jnp.where(jnp.isfinite(den), out, jnp.nan)


@divide_by_denominator.defjvp
def _divide_jvp(primals, tangents):
  """d(num / den) = (dnum - out dden) / den, with 1 / den from
  `reciprocal_denominator` (float32: NaN where den >= 2^126, as the custom
  backward passes)."""
  num, den = primals
  dnum, dden = tangents
  out = divide_by_denominator(num, den)
  inv = 1.0 / den if den.dtype == jnp.float64 else reciprocal_denominator(den)
  return out, (dnum - out * dden) * inv


def reciprocal_denominator(den):
  """1 / den for the backward's per-row terms; NaN where 1 / den is not a
  normal float32 (den >= 2^126): those rows' gradients cannot be represented,
  so they are reported rather than flushed to a silent 0."""
  return jnp.where(den < RECIPROCAL_LIMIT, 1.0 / den, jnp.nan)


def repeat_kv(x, num_heads):
  """[B, T, K, D] -> [B, T, N, D]: query head n uses kv head n // (N / K)."""
  return jnp.repeat(x, num_heads // x.shape[2], axis=2)


def normalise_weights(weights, v, out_dtype, normalization_bias=1.0):
  """o_i = sum_j w_ij v_j / (normalization_bias + sum_j w_ij).

  Args:
    weights: [B, N, T, T] non-negative weights w_ij.
    v: [B, T, N, H].
  Returns:
    [B, T, N, H] in out_dtype.
  """
  num = jnp.einsum("bnij,bjnh->binh", weights, v, precision=jax.lax.Precision.HIGHEST)
  den = normalization_bias + jnp.sum(weights, axis=-1)  # [B, N, T]
  return divide_by_denominator(num, jnp.transpose(den, (0, 2, 1))[..., None]).astype(out_dtype)


def same_segment_mask(segment_ids):
  """int [B, T] -> bool [B, 1, T, T]: i and j lie in one segment, a maximal run
  of equal ids ([0, 0, 1, 1, 0, 0] is three segments)."""
  change = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
      axis=1)
  seg = jnp.cumsum(change, axis=1, dtype=jnp.int32)
  return (seg[:, :, None] == seg[:, None, :])[:, None]


@functools.partial(jax.jit, static_argnames=("degree", "causal", "normalization_bias"))
def _polynomial_attention(q, k, v, segment_ids, *, degree, causal, normalization_bias):
  out_dtype, dt = q.dtype, compute_dtype(q)
  q, k, v = (x.astype(dt) for x in (q, k, v))
  k, v = repeat_kv(k, q.shape[2]), repeat_kv(v, q.shape[2])
  s = jnp.einsum("binh,bjnh->bnij", q, k, precision=jax.lax.Precision.HIGHEST) ** degree
  if causal:
    t = q.shape[1]
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, 0.0)
  if segment_ids is not None:
    s = jnp.where(same_segment_mask(segment_ids), s, 0.0)
  return normalise_weights(s, v, out_dtype, normalization_bias)


def polynomial_attention(q, k, v, *, degree=4, causal=True, normalization_bias=1.0,
                         segment_ids=None):
  """Exact polynomial attention: o_i = sum_j s_ij v_j / (bias + sum_j s_ij).

  s_ij = (q_i . k_j)^degree over j <= i (causal) or all j, with no 1/sqrt(H)
  scaling. degree must be even so every s_ij >= 0. Normalise q and k first
  (e.g. LayerNorm) or the power overflows. Computes in float32 (float64 for
  float64 inputs with x64 enabled) and materialises the [B, N, T, T] weights:
  use it as a quality reference and for short sequences.

  Args:
    q: [batch, seq, num_heads, head_dim].
    k, v: [batch, seq, num_kv_heads, head_dim] (num_kv_heads divides
      num_heads: grouped-query attention), one floating dtype with q.
    degree: p, a positive even int.
    causal: attend to j <= i only.
    normalization_bias: the positive constant in the denominator, in
      float32's normal range.
    segment_ids: None or int32 [batch, seq]: packed sequences. s_ij = 0 unless
      i and j lie in one segment (a maximal run of equal ids), so each segment
      gets the result of running it alone.

  Returns:
    [batch, seq, heads, head_dim] in the dtype of q.
  """
  _validation.check_qkv(q, k, v)
  degree = _validation.check_degree(degree)
  bias = _validation.check_normalization_bias(normalization_bias)
  segment_ids = _validation.check_segment_ids(segment_ids, q)
  causal = _validation.check_bool("causal", causal)
  return _polynomial_attention(q, k, v, segment_ids, degree=degree, causal=causal,
                               normalization_bias=bias)
