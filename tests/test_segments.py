"""Packed segments (issue 12, DESIGN §1.5): `segment_ids` gives every segment the
result, and the gradients, of running it alone.

Tolerance (as tests/test_hardening.py): in float32, (q.k)^p multiplies the
relative error of q.k (at most H * eps for a length-H dot product) by p, so
outputs are good to p * H * eps32 of their scale and gradients, through one
more product of the kind, to 2 p H eps32; both sides carry such an error, so
outputs are compared at 2 p H eps32 and gradients at 4 p H eps32.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_polysketch as ps
from pallas_polysketch import ref
from jax.experimental.pallas import tpu as pltpu
from helpers import BACKENDS, f32_tol, layer_inputs, rel_err

H, R, BLOCK = 32, 8, 16
TOL = 2 * f32_tol(4, H)
GRAD_TOL = 2 * f32_tol(4, H, grad=True)

# Two rows: awkward lengths starting mid-block, single-token segments, ids that
# repeat non-contiguously (row 0 ends ... 3, 3, 0, 0: its last run is a new
# segment), one segment longer than three blocks.
ROW_LENGTHS = ([37, 1, 52, 9, 21], [5, 1, 1, 70, 43])
ROW_IDS = ([0, 1, 2, 3, 0], [4, 0, 4, 5, 6])
SEQ = 120


class Geometry:
  """Per backend: the kernels need blocks of 128 tokens, so the Pallas cases scale
  the same pattern up (kept short: interpret mode is slow). `pieces` are
  (row, start, end) segments also run literally alone: a single token, one
  starting mid-block, the last of a row."""

  def __init__(self, block, lengths, pieces):
    self.block, self.lengths, self.pieces = block, lengths, pieces
    self.seq = sum(lengths[0])
    assert all(sum(row) == self.seq for row in lengths)

  def ids(self):
    rows = [np.repeat(i, n) for i, n in zip(ROW_IDS, self.lengths)]
    return jnp.asarray(np.stack(rows).astype(np.int32))


GEOMETRY = {
    "xla": Geometry(BLOCK, ROW_LENGTHS, [(0, 37, 38), (0, 38, 90), (1, 77, 120)]),
    # 440 tokens: 4 blocks of 128 after padding; row 1's long segment starts at 7
    # and spans three blocks.
    "pallas": Geometry(128, ([150, 1, 200, 20, 69], [5, 1, 1, 280, 153]),
                       [(0, 150, 151), (0, 151, 351), (1, 287, 440)]),
}


def _ids():
  return GEOMETRY["xla"].ids()


def _runs(row):
  """[(start, end)] of the maximal runs of equal ids of one row."""
  row = np.asarray(row)
  cuts = [0] + [i for i in range(1, len(row)) if row[i] != row[i - 1]] + [len(row)]
  return list(zip(cuts[:-1], cuts[1:]))


def _inputs(seq=SEQ, seed=0):
  return layer_inputs(seed, 2, seq, 4, 2, H, R)   # GQA: 4 query heads, 2 kv heads


def _value_and_grads(fn, args, cot):
  """fn(*args) and the gradients of sum(fn(*args) * cot), in one compiled call."""
  @jax.jit
  def run(*a):
    out, vjp = jax.vjp(lambda *x: fn(*x).astype(jnp.float32), *a)
    return out, vjp(cot)
  return run(*args)


def _packed(fn, args, cot, ids, **kw):
  return _value_and_grads(lambda *a: fn(*a, segment_ids=ids, **kw), args, cot)


def _alone(fn, args, cot, ids, **kw):
  """Every segment run alone: each in its own row of one call, from the row's
  start, zero-padded to the longest (exact: a zero key has zero weight, and the
  padded queries are dropped; the op pads the same way). Returns the outputs
  put back in place and the gradients of sum(out * cot)."""
  pieces = [(b, s, e) for b in range(ids.shape[0]) for s, e in _runs(ids[b])]
  longest = max(e - s for _, s, e in pieces)
  idx = np.zeros((len(pieces), longest), np.int32)      # token of each (row, slot)
  valid = np.zeros((len(pieces), longest), bool)
  for n, (b, s, e) in enumerate(pieces):
    idx[n, :e - s] = b * ids.shape[1] + np.arange(s, e)
    valid[n, :e - s] = True

  def outputs(*a):
    flat = [x.reshape(-1, *x.shape[2:]) for x in a]
    rows = [jnp.where(valid[..., None, None], x[idx], 0) for x in flat]
    out = fn(*rows, **kw).astype(jnp.float32)
    put = jnp.zeros_like(flat[0], jnp.float32).at[idx[valid]].set(out[valid])
    return put.reshape(a[0].shape)

  return _value_and_grads(outputs, args, cot)


def _check(got, want):
  (out, grads), (want_out, want_grads) = got, want
  assert rel_err(out, want_out) < TOL
  for name, g, w in zip(("q", "k", "v", "q_features", "k_features"), grads, want_grads):
    assert rel_err(g, w) < GRAD_TOL, name


@pytest.mark.parametrize("backend,causal,local_exact,bias", [
    (backend, *case) if (backend, case) != ("pallas", (True, False, 1.0))
    else pytest.param(backend, *case, marks=pytest.mark.slow)   # CI time: ~11 s interpreted
    for backend in BACKENDS for case in [(True, True, 1.0), (True, False, 1.0), (False, True, 0.5)]])
def test_packed_equals_each_segment_alone(backend, causal, local_exact, bias):
  geo = GEOMETRY[backend]
  args, cot = _inputs(geo.seq)
  kw = dict(block_size=geo.block, causal=causal, local_exact=local_exact,
            normalization_bias=bias, **BACKENDS[backend])
  got = _packed(ps.polysketch_attention, args, cot, geo.ids(), **kw)
  _check(got, _alone(ps.polysketch_attention, args, cot, geo.ids(), **kw))
  # and literally alone, one call per segment
  for b, s, e in geo.pieces:
    alone = ps.polysketch_attention(*(x[b:b + 1, s:e] for x in args), **kw)
    assert rel_err(got[0][b:b + 1, s:e], alone) < TOL, (b, s, e)


@pytest.mark.parametrize("backend", ["xla", pytest.param("pallas", marks=pytest.mark.slow)])
@pytest.mark.parametrize("causal", [True, False])
def test_one_segment_per_row_equals_no_segments(backend, causal):
  """A whole row one segment is the unsegmented op; ids need not be 0."""
  geo = GEOMETRY[backend]
  args, cot = _inputs(geo.seq)
  ids = jnp.full((2, geo.seq), 7, jnp.int32)
  kw = dict(block_size=geo.block, causal=causal, **BACKENDS[backend])
  _check(_packed(ps.polysketch_attention, args, cot, ids, **kw),
         _value_and_grads(lambda *a: ps.polysketch_attention(*a, **kw), args, cot))


@pytest.mark.parametrize("causal", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_pallas_under_tpu_interpreter(causal):
  """The TPU interpreter (fresh NaN scratch, TPU semantics) agrees with the xla
  path, values and gradients; here block -1 is a row's real start."""
  geo = GEOMETRY["pallas"]
  args, cot = _inputs(geo.seq, seed=1)
  kw = dict(block_size=geo.block, causal=causal)
  got = _packed(ps.polysketch_attention, args, cot, geo.ids(), implementation="pallas",
                interpret=pltpu.InterpretParams(), **kw)
  _check(got, _packed(ps.polysketch_attention, args, cot, geo.ids(), implementation="xla",
                      **kw))


@pytest.mark.parametrize("causal", [True, False])
def test_reference_with_segments_equals_each_segment_alone(causal):
  args, cot = _inputs()
  kw = dict(block_size=BLOCK, causal=causal, local_exact=True)
  got = ref.polysketch_attention_quadratic(*args, segment_ids=_ids(), **kw)
  want, _ = _alone(ref.polysketch_attention_quadratic, args, cot, _ids(), **kw)
  assert rel_err(got, want) < TOL
  # and the op against it
  assert rel_err(ps.polysketch_attention(*args, segment_ids=_ids(), **kw), got) < TOL


@pytest.mark.parametrize("causal", [True, False])
def test_polynomial_attention_with_segments_equals_each_segment_alone(causal):
  args, cot = _inputs()
  got = ps.polynomial_attention(*args[:3], causal=causal, segment_ids=_ids())
  want, _ = _alone(lambda q, k, v, fq, fk, **kw: ps.polynomial_attention(q, k, v, **kw),
                   args, cot, _ids(), causal=causal)
  assert rel_err(got, want) < TOL


def test_repeated_ids_are_separate_segments():
  """[0, 0, 1, 1, 0, 0] is three segments: the last two tokens do not see the first two."""
  args = tuple(x[:, :6] for x in _inputs()[0])
  ids = jnp.asarray([[0, 0, 1, 1, 0, 0]] * 2, jnp.int32)
  w = ref.polysketch_weights(*args[:2], *args[3:], block_size=8, segment_ids=ids)
  mask = np.asarray(w[0, 0]) != 0
  np.testing.assert_array_equal(mask, np.kron(np.eye(3, dtype=bool), np.tril(np.ones((2, 2), bool))))
  got = ps.polysketch_attention(*args, block_size=8, segment_ids=ids)
  alone = ps.polysketch_attention(*(x[:, 4:] for x in args), block_size=8)
  assert rel_err(got[:, 4:], alone) < TOL


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("causal", [True, False])
def test_overflow_stays_in_its_segment(backend, causal):
  """An inf in one segment's weights and state never reaches another as 0 * inf."""
  geo = GEOMETRY[backend]
  first, (_, s, e) = geo.lengths[0][0], geo.pieces[1]
  args, _ = _inputs(geo.seq)
  scale = jnp.ones((2, geo.seq, 1, 1)).at[0, :first].set(1e12)   # row 0, its first segment
  args = tuple(x * scale for x in args)
  kw = dict(block_size=geo.block, causal=causal, **BACKENDS[backend])
  got = ps.polysketch_attention(*args, segment_ids=geo.ids(), **kw)
  assert not np.isfinite(np.asarray(got[0, :first])).all()
  assert np.isfinite(np.asarray(got[0, first:])).all() and np.isfinite(np.asarray(got[1])).all()
  alone = ps.polysketch_attention(*(x[:1, s:e] for x in args), **kw)
  assert rel_err(got[:1, s:e], alone) < TOL


def test_traced_segment_ids_under_jit():
  args, _ = _inputs()
  fn = jax.jit(lambda ids, *a: ps.polysketch_attention(*a, block_size=BLOCK, segment_ids=ids))
  want = ps.polysketch_attention(*args, block_size=BLOCK, segment_ids=_ids())
  np.testing.assert_allclose(fn(_ids(), *args), want, rtol=0, atol=1e-6)


# --- errors ---------------------------------------------------------------------

def _small():
  args, _ = layer_inputs(0, 2, 16, 2, 1, 8, 4)
  return args


def test_segment_ids_wrong_shape():
  with pytest.raises(ValueError, match=re.escape("segment_ids must be [batch, seq] = (2, 16)")
                     + r".*got shape \(2, 15\)"):
    ps.polysketch_attention(*_small(), segment_ids=jnp.zeros((2, 15), jnp.int32))
  with pytest.raises(ValueError, match=r"segment_ids .*got shape \(2, 16, 1\)"):
    ps.polysketch_attention(*_small(), segment_ids=jnp.zeros((2, 16, 1), jnp.int32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bool_])
def test_segment_ids_wrong_dtype(dtype):
  with pytest.raises(TypeError, match=rf"segment_ids must have an integer dtype.*got "
                     rf"{jnp.dtype(dtype).name} \(shape \(2, 16\)\)"):
    ps.polysketch_attention(*_small(), segment_ids=jnp.zeros((2, 16), dtype))


def test_segment_ids_with_pallas_needs_a_tileable_block():
  """implementation="pallas" takes segment_ids; the kernels' block rule still holds."""
  args, _ = layer_inputs(0, 2, 256, 2, 1, 8, 4)
  with pytest.raises(ValueError, match="block_size=16 cannot be tiled by the TPU kernel"):
    ps.polysketch_attention(*args, block_size=16, segment_ids=jnp.zeros((2, 256), jnp.int32),
                            implementation="pallas", interpret=True)


def test_segment_ids_numpy_and_int64_accepted():
  ids = np.zeros((2, 16), np.int64)
  ids[:, 9:] = 1
  out = ps.polysketch_attention(*_small(), block_size=8, segment_ids=ids)
  want = ps.polysketch_attention(*_small(), block_size=8, segment_ids=jnp.asarray(ids, jnp.int32))
  np.testing.assert_array_equal(out, want)


def test_segment_ids_beyond_int32_are_not_merged():
  """64-bit host ids (hashes) equal modulo 2^32 are different segments: JAX's
  conversion to int32 (x64 off) truncated them into one, silently."""
  big = np.zeros((2, 16), np.int64)
  big[:, 9:] = 2 ** 32
  want = np.repeat(np.array([[0, 1]], np.int32), [9, 7], axis=1).repeat(2, axis=0)
  for fn in (lambda **kw: ps.polysketch_attention(*_small(), block_size=8, **kw),
             lambda **kw: ps.polynomial_attention(*_small()[:3], **kw)):
    np.testing.assert_array_equal(fn(segment_ids=big), fn(segment_ids=want))
    np.testing.assert_array_equal(fn(segment_ids=big.tolist()), fn(segment_ids=want))


@pytest.mark.parametrize("local_exact,strict", [(True, False), (False, True)])
def test_pallas_walk_state_and_previous_cotangents_match_xla(local_exact, strict):
  """The kernels' VJP against the xla walk's, on a walk that starts mid-segment
  (a real block -1 and incoming state, as under context parallelism): all
  nine cotangents, the state's and block -1's included."""
  from pallas_polysketch import _pallas_segments, _segments, _xla, tpu_config
  b, t = 128, 384
  (q, k, v, fq, fk), _ = layer_inputs(2, 2, t + b, 4, 2, H, R)
  q, fq = q[:, b:], fq[:, b:]
  pk, pv, pfk = (x[:, :b] for x in (k, v, fk))
  k, v, fk = (x[:, b:] for x in (k, v, fk))
  # Labels over one more block before block -1: the segments running into the
  # walk started before it (row 1's at -256), so the incoming state is read
  # and kept.
  lengths = ([188, 1, 200, 251], [428, 5, 207])
  ids = jnp.asarray(np.concatenate([np.repeat(np.arange(len(row)), row)[None]
                                    for row in lengths]))
  starts_all = _segments.segment_starts(ids)
  rel_all = _segments.relative_blocks(starts_all, b)[:, b:] - 2 * b
  starts_all = starts_all[:, b:] - 2 * b
  starts, rel = starts_all[:, b:], rel_all[:, b:]
  previous = _segments.Previous(pk, pv, pfk, starts_all[:, :b], rel_all[:, :b])
  s = jax.random.normal(jax.random.key(5), (2, 2, R * R, H)) * 0.1
  s = (s + s.reshape(2, 2, R, R, H).swapaxes(2, 3).reshape(2, 2, R * R, H)) / 2  # symmetric
  z = jnp.abs(jax.random.normal(jax.random.key(6), (2, 2, R * R)))
  z = (z + z.reshape(2, 2, R, R).swapaxes(2, 3).reshape(2, 2, R * R)) / 2
  from pallas_polysketch import _pallas
  rz = _pallas.to_rz(s, z)
  tiles = tpu_config.resolve_tiles(None, block_size=b, head_dim=H, sketch_dim=R,
                                   dtype=q.dtype, feature_dtype=fq.dtype, group=2)
  cot = jax.random.normal(jax.random.key(7), (2, t, 4, H + 1))

  def pallas(q, k, v, fq, fk, rz, pk, pv, pfk):
    p = previous._replace(k=pk, v=pv, k_features=pfk)
    return _pallas_segments.segment_walk(q, k, v, fq, fk, starts, rel, rz, p,
                                         (4, b, local_exact, strict, tiles, True))

  def xla(q, k, v, fq, fk, rz, pk, pv, pfk):
    p = previous._replace(k=pk, v=pv, k_features=pfk)
    return _segments.segment_walk_xla(q, k, v, fq, fk, starts, rel,
                                      _xla.state_to_psi(rz[..., :H], rz[..., H]), p,
                                      block_size=b, degree=4, local_exact=local_exact,
                                      strict=strict)

  def fold(d):
    """A state cotangent as a function of the symmetric state: (a, c) and (c, a)
    summed onto a <= c (the xla path's psi state sees only those entries)."""
    d = d.reshape(2, 2, R, R, -1)
    a, c = np.triu_indices(R)
    return (d[:, :, a, c] + jnp.where((a != c)[:, None], d[:, :, c, a], 0))

  args = (q, k, v, fq, fk, rz, pk, pv, pfk)
  got, want = (_value_and_grads(f, args, cot) for f in (pallas, xla))
  assert rel_err(got[0], want[0]) < TOL
  assert np.abs(np.asarray(want[1][5])).max() > 0      # the incoming state is used
  got_g, want_g = list(got[1]), list(want[1])
  got_g[5], want_g[5] = fold(got_g[5]), fold(want_g[5])
  for name, g, w in zip(("q", "k", "v", "fq", "fk", "state", "pk", "pv", "pfk"),
                        got_g, want_g):
    assert rel_err(g, w) < GRAD_TOL, (name, rel_err(g, w))
