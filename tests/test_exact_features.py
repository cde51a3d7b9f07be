"""Exact features turn PolySketch attention into exact polynomial attention.

With f(x) = x (the degree-2 "random" sketch is the identity) the sketched
weight (f_q . f_k)^2 is (q . k)^2; with f(x) = x (x) x it is (q . k)^4. The
blocked op must then equal `polynomial_attention` whatever the block size: an
end-to-end check of the prefix-state bookkeeping (which blocks enter S_t, z_t,
the causal mask inside the diagonal block, the padding).
"""
import jax
import numpy as np
import pytest

import pallas_polysketch as ps

SEQ = 40  # not a multiple of 16 or 24: the last block is padded


def _assert_close(actual, expected):
  expected = np.asarray(expected, np.float64)
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=1e-5,
                             atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("block_size", [8, 16, 24, 64])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("local_exact", [True, False])
def test_degree2_identity_features(make_qkv, block_size, causal, local_exact):
  q, k, v = make_qkv(block_size, 2, SEQ, 2, 8)
  params = ps.random_sketch_init(jax.random.key(0), head_dim=8, degree=2)
  fq, fk = ps.random_sketch_features(params, q), ps.random_sketch_features(params, k)
  out = ps.polysketch_attention(q, k, v, fq, fk, degree=2, block_size=block_size,
                                causal=causal, local_exact=local_exact)
  _assert_close(out, ps.polynomial_attention(q, k, v, degree=2, causal=causal))


@pytest.mark.parametrize("block_size", [8, 16, 24])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("local_exact", [True, False])
def test_degree4_self_tensor_features(make_qkv, block_size, causal, local_exact):
  head_dim = 4  # features of size 16, states of size 256 x 4
  q, k, v = make_qkv(100 + block_size, 1, SEQ, 2, head_dim)
  fq, fk = ps.self_tensor(q), ps.self_tensor(k)
  assert fq.shape == (1, SEQ, 2, head_dim ** 2)
  out = ps.polysketch_attention(q, k, v, fq, fk, degree=4, block_size=block_size,
                                causal=causal, local_exact=local_exact)
  _assert_close(out, ps.polynomial_attention(q, k, v, degree=4, causal=causal))


def test_sketched_weights_do_matter(make_qkv):
  """Guard for the tests above: with features that are not exact, the blocked
  op must differ from polynomial attention (so the match above is not vacuous)."""
  q, k, v = make_qkv(1, 1, SEQ, 1, 4)
  fq, fk = ps.self_tensor(q), ps.self_tensor(k) * 1.1
  out = ps.polysketch_attention(q, k, v, fq, fk, degree=4, block_size=8)
  exact = ps.polynomial_attention(q, k, v, degree=4)
  assert np.abs(np.asarray(out - exact)).max() > 1e-3
  # ... but the first block is exact (local_exact) and sees no prefix.
  np.testing.assert_allclose(out[:, :8], exact[:, :8], rtol=1e-5, atol=1e-6)
