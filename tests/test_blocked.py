"""The blocked `xla` path against the materialised definition (DESIGN §1.3)."""
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_polysketch as ps
from pallas_polysketch import ref

# (batch, seq, heads, block_size): seq a multiple of block_size, not a
# multiple (the op pads), shorter than one block (the block is clamped), and a
# final block of a single row.
SHAPES = [
    (1, 64, 1, 16),
    (2, 40, 3, 16),
    (1, 20, 2, 64),
    (2, 33, 2, 8),
]
H, R = 8, 8


def _assert_close(actual, expected, rtol, atol_scale):
  """Elementwise |a - e| <= rtol |e| + atol_scale * max|e|."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  np.testing.assert_allclose(actual, expected, rtol=rtol,
                             atol=atol_scale * np.abs(expected).max())


@pytest.mark.parametrize("batch,seq,heads,block_size", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("local_exact", [True, False])
def test_xla_matches_quadratic_f32(make_inputs, batch, seq, heads, block_size,
                                   causal, local_exact):
  q, k, v, fq, fk = make_inputs(seq + block_size, batch, seq, heads, H, R)
  kw = dict(degree=4, block_size=block_size, causal=causal, local_exact=local_exact)
  out = ps.polysketch_attention(q, k, v, fq, fk, implementation="xla", **kw)
  expected = ref.polysketch_attention_quadratic(q, k, v, fq, fk, **kw)
  assert out.shape == q.shape and out.dtype == jnp.float32
  _assert_close(out, expected, rtol=1e-5, atol_scale=1e-6)
  # The per-block reference walks the same recurrence in a Python loop.
  blocked = ref.polysketch_attention_blocked(q, k, v, fq, fk, **kw)
  _assert_close(out, blocked, rtol=1e-5, atol_scale=1e-6)


@pytest.mark.parametrize("causal,local_exact", [(True, True), (True, False), (False, True)])
def test_xla_matches_quadratic_bf16(make_inputs, causal, local_exact):
  q, k, v, fq, fk = make_inputs(7, 2, 40, 2, H, R, dtype=jnp.bfloat16)
  kw = dict(degree=4, block_size=16, causal=causal, local_exact=local_exact)
  out = ps.polysketch_attention(q, k, v, fq, fk, implementation="xla", **kw)
  assert out.dtype == jnp.bfloat16
  # Reference: the same bf16 inputs, upcast, in f32. The op also computes in
  # f32 and only rounds its output to bf16 (8 significant bits), so the error
  # is half a bf16 ulp, 2^-9 relative, plus f32 noise: 2^-8 leaves a margin.
  expected = ref.polysketch_attention_quadratic(
      *(x.astype(jnp.float32) for x in (q, k, v, fq, fk)), **kw)
  _assert_close(out, expected, rtol=2.0 ** -8, atol_scale=1e-6)


def test_default_implementation_is_xla_off_tpu(make_inputs):
  q, k, v, fq, fk = make_inputs(3, 1, 24, 1, H, R)
  kw = dict(degree=4, block_size=8)
  np.testing.assert_array_equal(
      ps.polysketch_attention(q, k, v, fq, fk, **kw),
      ps.polysketch_attention(q, k, v, fq, fk, implementation="xla", **kw))


def test_block_size_larger_than_seq_is_one_block(make_inputs):
  """A block longer than seq means every weight is exact (local_exact)."""
  q, k, v, fq, fk = make_inputs(4, 1, 20, 2, H, R)
  out = ps.polysketch_attention(q, k, v, fq, fk, degree=4, block_size=256)
  _assert_close(out, ps.polynomial_attention(q, k, v, degree=4), rtol=1e-5, atol_scale=1e-6)


def test_ref_blocked_matches_quadratic(make_inputs):
  """The two references agree with each other, including a short last block."""
  q, k, v, fq, fk = make_inputs(5, 2, 37, 2, H, R)
  for causal, local_exact in [(True, True), (True, False), (False, False)]:
    kw = dict(degree=4, block_size=16, causal=causal, local_exact=local_exact)
    _assert_close(ref.polysketch_attention_blocked(q, k, v, fq, fk, **kw),
                  ref.polysketch_attention_quadratic(q, k, v, fq, fk, **kw),
                  rtol=1e-5, atol_scale=1e-6)


def test_quadratic_weights_follow_definition(make_inputs):
  """Spot-check the materialised w of §1.3 entry by entry."""
  q, k, _, fq, fk = make_inputs(6, 1, 24, 1, H, R)
  b = 8
  w = np.asarray(ref.polysketch_weights(q, k, fq, fk, degree=4, block_size=b))
  qn, kn, fqn, fkn = (np.asarray(x, np.float64)[0, :, 0] for x in (q, k, fq, fk))
  for i in range(24):
    for j in range(24):
      if j > i:
        want = 0.0
      elif i // b == j // b:
        want = (qn[i] @ kn[j]) ** 4
      else:
        want = (fqn[i] @ fkn[j]) ** 2
      assert w[0, 0, i, j] == pytest.approx(want, rel=1e-4, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_xla_matches_quadratic_large(make_inputs, causal):
  """Realistic sizes: head_dim 64, sketch 16 (states 256 x 64), 9 blocks, padded."""
  q, k, v, fq, fk = make_inputs(9, 2, 1100, 2, 64, 16)
  kw = dict(degree=4, block_size=128, causal=causal)
  out = ps.polysketch_attention(q, k, v, fq, fk, implementation="xla", **kw)
  expected = ref.polysketch_attention_quadratic(q, k, v, fq, fk, **kw)
  # f32 sums over ~1000 weights in a different order: allow 10x the small cases.
  _assert_close(out, expected, rtol=1e-4, atol_scale=1e-5)
