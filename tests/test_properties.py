"""Property-based tests (hypothesis): both paths against the float64 reference.

Every draw: shapes (seq mostly not a multiple of the block), degree, block,
flags and dtype; q, k LayerNorm'd as in the model, so (q.k)^p reaches H^p and
denominators are >> 1; features from the random sketch of that degree (degree
2: the features are q, k themselves). `polysketch_attention` on the "xla" and
the "pallas" (interpret) paths must equal `ref.polysketch_attention_quadratic`
computed in float64 on the same inputs within the rounding-error bound
`error_bound` derives below, be finite, and give exactly zero wherever the
values it averages are all zero.

Profiles (tests/conftest.py): the default "ci" draws 20 derandomised examples
per test; HYPOTHESIS_PROFILE=slow draws 200, and `pytest -m slow` runs the
`*_many` variants, which use the slow profile.
"""
import dataclasses
import math
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

import pallas_polysketch as ps  # noqa: E402
from pallas_polysketch import ref  # noqa: E402

MAX_SEQ = 300
# The Pallas kernel tiles its diagonal block in 128-wide tiles: its block must
# be 128 (or 256: two tiles), or cover the whole sequence. A covering block of
# round_up(seq, 8) in 136..248 is not a multiple of the tile and is rejected:
# a known bug (test_covering_block_between_128_and_256 below).
PALLAS_BLOCKS = (128, 256)


def _covering_block_is_broken(seq, block):
  return block >= seq and 128 < seq <= 248


@dataclasses.dataclass(frozen=True)
class Problem:
  batch: int
  seq: int
  heads: int
  head_dim: int
  sketch_dim: int
  degree: int
  block_size: int
  causal: bool
  local_exact: bool
  dtype: str
  seed: int
  zero_column: int    # v[..., zero_column] = 0 everywhere
  zero_prefix: int    # v[0, :zero_prefix] = 0


@st.composite
def problems(draw, path):
  heads = draw(st.integers(1, 3))
  head_dim = draw(st.integers(1, 8)) * 8
  degree = draw(st.sampled_from([2, 4, 8]))
  sketch_dim = head_dim if degree == 2 else draw(st.integers(4, 32))
  seq = draw(st.integers(1, MAX_SEQ))
  if path == "xla":
    block_size = draw(st.integers(1, 8)) * 8
  else:
    block_size = draw(st.sampled_from(PALLAS_BLOCKS))
    if _covering_block_is_broken(seq, block_size):
      block_size = 128
  return Problem(
      batch=draw(st.integers(1, 2)), seq=seq, heads=heads, head_dim=head_dim,
      sketch_dim=sketch_dim, degree=degree, block_size=block_size,
      causal=draw(st.booleans()), local_exact=draw(st.booleans()),
      dtype=draw(st.sampled_from(["float32", "bfloat16"])),
      seed=draw(st.integers(0, 2**31 - 1)),
      zero_column=draw(st.integers(0, head_dim - 1)),
      zero_prefix=draw(st.integers(0, seq)))


def _layer_norm(x):
  """Zero mean, unit variance over the last axis (each head vector)."""
  x = x - x.mean(-1, keepdims=True)
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True))


def make_inputs(p: Problem):
  """(q, k, v, q_features, k_features) in p.dtype, with the zeros of p in v."""
  rng = np.random.default_rng(p.seed)
  shape = (p.batch, p.seq, p.heads, p.head_dim)
  dtype = jnp.dtype(p.dtype)
  q, k = (jnp.asarray(_layer_norm(rng.standard_normal(shape)), dtype) for _ in range(2))
  v = rng.standard_normal(shape)
  v[..., p.zero_column] = 0.0
  v[0, :p.zero_prefix] = 0.0
  if p.heads > 1:
    v[:, :, -1] = 0.0
  sketch = ps.random_sketch_init(jax.random.key(p.seed), p.head_dim, p.sketch_dim,
                                 degree=p.degree)
  # Features of the q, k the op sees (after rounding to dtype), as a model
  # computes them, then rounded to dtype themselves.
  fq, fk = (ps.random_sketch_features(sketch, x.astype(jnp.float32)).astype(dtype)
            for x in (q, k))
  return q, k, jnp.asarray(v, dtype), fq, fk


def reference_f64(p: Problem, args):
  """ref.polysketch_attention_quadratic in float64 on float64 copies of args."""
  with jax.enable_x64(True):
    args64 = [jnp.asarray(np.asarray(x, np.float64)) for x in args]
    out = ref.polysketch_attention_quadratic(
        *args64, degree=p.degree, block_size=p.block_size, causal=p.causal,
        local_exact=p.local_exact)
    return np.asarray(out, np.float64)


F32_U = 2.0 ** -24    # unit roundoff u of float32 (half an ulp at 1)
BF16_U = 2.0 ** -8    # ... of bfloat16 (8 significant bits)
# A length-n sum of rounded terms is off by <= LAMBDA sqrt(n) u times the sum
# of their absolute values with probability >= 1 - 2 exp(-LAMBDA^2 / 2)
# (Higham & Mary, "A new approach to probabilistic rounding error analysis",
# SIAM J. Sci. Comput. 2019): 0.9993 for LAMBDA = 4, per sum.
LAMBDA = 4.0


def error_bound(p: Problem, path: str | None, args, want):
  """Per entry, the most |op - exact| rounding can explain on p: [B, T, N, H].

  Derivation (first order in the unit roundoffs, all in float64 from the
  inputs). The weights are >= 0 (p even, squares) and o_i = num_i / den_i with
  num_i = sum_j w_ij v_j, den_i = 1 + sum_j w_ij, so errors dw_ij in the
  weights move o_i by at most sum_j dw_ij (|v_j| + |o_i|) / den_i. A dot
  product of length n is off by <= LAMBDA sqrt(n) u |x|.|y| (|x| elementwise;
  see LAMBDA), which gives dw_ij in float32 arithmetic (both paths, for bf16
  inputs too):
    exact (q.k)^p:     p |q.k|^(p-1) LAMBDA sqrt(H) u |q|.|k|  (+ p u w: the power)
    sketched (f.f)^2:  LAMBDA (r + sqrt(T)) u (|f_q|.|f_k|)^2   (phi_q . S is a
                       dot of r^2 terms of phi = f (x) f, S a sum over <= T keys)
  The sketched bound is absolute, not relative to w: with f_q . f_k near 0
  (q, k almost orthogonal) and all weights small, the "1 +" dominates den
  and such errors show in full (a seq=1 draw found this). Summing num and den
  over <= T keys adds LAMBDA sqrt(T) u (sum_j w_ij (|v_j| + |o_i|)) / den_i,
  the float32 division and the cast of o to its dtype (u + u_out) |o_i|
  (worst case, as are the bf16 terms). The Pallas kernel with bf16 inputs also
  rounds its MXU operands to bf16 (f32 accumulation): the local weights once
  (u_bf16 w) and, on a sketched weight's path, phi_q, phi_k and the state read
  back (3 u_bf16 (|f_q|.|f_k|)^2). The reference is exact on the very same
  (rounded) inputs, so input rounding does not count.

  Measured over 120 draws, the largest error / bound: 0.1 in float32 (either
  path), 0.65 for bf16 on the Pallas path, 0.98 for bf16 on the xla path,
  where the bound is all but the half-ulp of the final cast (a worst case that
  is reached when o lies just above a power of two).
  """
  q, k, v, fq, fk = (np.asarray(x, np.float64) for x in args)
  t, h, r = p.seq, p.head_dim, p.sketch_dim
  dots = lambda a, b: np.einsum("binh,bjnh->bnij", a, b)
  qk, aqk = dots(q, k), dots(np.abs(q), np.abs(k))
  ff, aff = dots(fq, fk), dots(np.abs(fq), np.abs(fk))
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  if p.causal:
    exact = (j <= i) & (i // p.block_size == j // p.block_size) & p.local_exact
    sketched = (j <= i) & ~exact
  else:
    exact, sketched = np.zeros((t, t), bool), np.ones((t, t), bool)
  w = np.where(exact, qk ** p.degree, 0.0) + np.where(sketched, ff ** 2, 0.0)
  dw = F32_U * (np.where(exact, p.degree * np.abs(qk) ** (p.degree - 1) * aqk
                         * LAMBDA * math.sqrt(h) + p.degree * w, 0.0)
                + np.where(sketched, LAMBDA * (r + math.sqrt(t)) * aff ** 2, 0.0))
  if path != "xla" and p.dtype == "bfloat16":
    dw += BF16_U * (np.where(exact, w, 0.0) + np.where(sketched, 3 * aff ** 2, 0.0))
  dw += F32_U * LAMBDA * math.sqrt(t) * w
  row = lambda x: np.transpose(x, (0, 2, 1))[..., None]   # [B, N, T] -> [B, T, N, 1]
  abs_v, abs_o = np.abs(v), np.abs(want)
  den = row(1.0 + w.sum(-1))
  u_out = F32_U if p.dtype == "float32" else BF16_U
  return (np.einsum("bnij,bjnh->binh", dw, abs_v) + row(dw.sum(-1)) * abs_o) / den \
      + (F32_U + u_out) * abs_o


def check_against_reference(p: Problem, path: str | None):
  """path: the op's implementation (None: held to the pallas bound)."""
  args = make_inputs(p)
  got = ps.polysketch_attention(
      *args, degree=p.degree, block_size=p.block_size, causal=p.causal,
      local_exact=p.local_exact, implementation=path, interpret=path == "pallas")
  assert got.shape == args[0].shape and got.dtype == jnp.dtype(p.dtype)
  got = np.asarray(got, np.float64)
  assert np.isfinite(got).all(), f"non-finite outputs at {np.argwhere(~np.isfinite(got))[:5]}"

  want = reference_f64(p, args)
  bound = error_bound(p, path, args, want)
  err = np.abs(got - want)
  worst = np.unravel_index(np.argmax(err - bound), err.shape)
  assert np.all(err <= bound), (
      f"{path} off the float64 reference by {err[worst]:.3g} at {worst}, over the "
      f"rounding bound {bound[worst]:.3g}, for {p}")

  # Zero values give exactly zero outputs: a zero column of v, a whole head
  # with v = 0, and (causal) queries that only see keys with v = 0.
  assert np.all(got[..., p.zero_column] == 0.0)
  if p.heads > 1:
    assert np.all(got[:, :, -1] == 0.0)
  if p.causal:
    assert np.all(got[0, :p.zero_prefix] == 0.0)


@given(problems("xla"))
def test_xla_matches_reference(p):
  check_against_reference(p, "xla")


@given(problems("pallas"))
def test_pallas_interpret_matches_reference(p):
  check_against_reference(p, "pallas")


@pytest.mark.slow
@settings(settings.get_profile("slow"))
@given(problems("xla"))
def test_xla_matches_reference_many(p):
  check_against_reference(p, "xla")


@pytest.mark.slow
@settings(settings.get_profile("slow"))
@given(problems("pallas"))
def test_pallas_interpret_matches_reference_many(p):
  check_against_reference(p, "pallas")


# Regression (issue 11): with a block that covers a sequence of 129..248 tokens,
# the block is clamped to round_up(seq, 8), which the default 128-wide local
# tile does not divide: seq=129 with the default block_size=256 used to raise
# "TileConfig.local_tile=128 must divide block_size=136" on the pallas path and
# on implementation=None (which resolved tiles even when it ran XLA).
@pytest.mark.parametrize("implementation", [None, "pallas"])
def test_covering_block_between_128_and_256(implementation):
  p = Problem(batch=1, seq=129, heads=1, head_dim=8, sketch_dim=8, degree=2,
              block_size=256, causal=True, local_exact=True, dtype="float32",
              seed=0, zero_column=0, zero_prefix=0)
  check_against_reference(p, implementation)


# Regression, found while testing find_nonfinite: on the xla path an overflow in
# one block's state update reached every query of the chunk, including the
# queries before it, which never read it: the exclusive prefix sum over blocks
# was a matmul with a 0/1 matrix, and 0 * inf = nan. Finite inputs; the last
# block's update phi_k v = 4 * 3e38 overflows.
@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_overflow_in_a_later_block_does_not_reach_earlier_queries(implementation):
  q = jnp.ones((1, 129, 1, 1), jnp.float32)
  f = 2.0 * q
  v = jnp.zeros_like(q).at[0, 128].set(3e38)
  got = np.asarray(ps.polysketch_attention(q, q, v, f, f, block_size=128,
                                           implementation=implementation,
                                           interpret=True))
  want = np.asarray(ref.polysketch_attention_quadratic(q, q, v, f, f, block_size=128))
  assert np.isfinite(want).all()
  np.testing.assert_array_equal(got[0, :128], 0.0)
  np.testing.assert_allclose(got, want, rtol=1e-6)
