"""Exact polynomial attention (DESIGN §1.1) against a float64 NumPy loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_polysketch as ps


def numpy_polynomial_attention(q, k, v, degree, causal):
  """o_i = sum_j (q_i . k_j)^p v_j / (1 + sum_j (q_i . k_j)^p), one (b, n, i) at a time."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, seq, heads, _ = q.shape
  out = np.zeros(v.shape)
  for b in range(batch):
    for n in range(heads):
      for i in range(seq):
        num = np.zeros(v.shape[-1])
        den = 1.0
        for j in range(i + 1 if causal else seq):
          s = float(np.dot(q[b, i, n], k[b, j, n])) ** degree
          num += s * v[b, j, n]
          den += s
        out[b, i, n] = num / den
  return out


@pytest.mark.parametrize("degree", [2, 4, 6])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_numpy_loop_f32(make_qkv, degree, causal):
  q, k, v = make_qkv(degree, 2, 13, 3, 8)
  out = ps.polynomial_attention(q, k, v, degree=degree, causal=causal)
  assert out.shape == q.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, numpy_polynomial_attention(q, k, v, degree, causal),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_matches_numpy_loop_f64(make_qkv, causal):
  """With x64 the op computes in float64 and agrees to rounding."""
  q, k, v = make_qkv(11, 1, 9, 2, 4)
  with jax.enable_x64(True):
    q64, k64, v64 = (jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v))
    out = ps.polynomial_attention(q64, k64, v64, degree=4, causal=causal)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(out, numpy_polynomial_attention(q, k, v, 4, causal),
                               rtol=1e-12, atol=1e-13)


def test_bf16_inputs_return_bf16(make_qkv):
  q, k, v = make_qkv(12, 1, 16, 2, 8, dtype=jnp.bfloat16)
  out = ps.polynomial_attention(q, k, v, degree=4)
  assert out.dtype == jnp.bfloat16
  # Computed in f32 from the bf16 values, rounded once: half a bf16 ulp (2^-9).
  np.testing.assert_allclose(np.asarray(out, np.float64),
                             numpy_polynomial_attention(q, k, v, 4, True),
                             rtol=2.0 ** -8, atol=1e-6)
