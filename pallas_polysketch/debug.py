"""Where PolySketch attention first goes non-finite (inf or NaN).

`find_nonfinite` walks the computation of DESIGN §1.3 in order: the inputs,
the exact local weights (q_i . k_j)^p, the sketched weights
(f_q,i . f_k,j)^2, the denominator normalization_bias + sum_j w_ij and the
op's output, and reports the first tensor with a non-finite entry and where
it is. Only the
weights the op uses count (j <= i when causal; exact ones inside the diagonal
block with local_exact, sketched ones elsewhere).

The weights come from the reference (`ref.attention.pair_weights`, masked
here as the op uses them, segments included) in the op's float32
arithmetic, one block of queries at a time (memory O(batch * heads *
block_size * seq)); the output is the op's own, run with the arguments
given.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_polysketch import _validation
from pallas_polysketch.attention import polysketch_attention, resolve_config, round_up

INPUTS = ("q", "k", "v", "q_features", "k_features")
_DESCRIPTIONS = {
    "q": "input q",
    "k": "input k",
    "v": "input v",
    "q_features": "input q_features",
    "k_features": "input k_features",
    "exact_weights": "exact local weight (q_i . k_j)^p",
    "sketched_weights": "sketched weight (f_q,i . f_k,j)^2",
    "denominator": "denominator normalization_bias + sum_j w_ij",
    "output": "output",
}


@dataclasses.dataclass(frozen=True)
class NonFinite:
  """The first non-finite tensor `find_nonfinite` found, and where.

  Attributes:
    tensor: an input ("q", "k", "v", "q_features", "k_features") or an
      intermediate, in the order they are computed: "exact_weights",
      "sketched_weights", "denominator", "output".
    batch, seq, head: the first non-finite position in [batch, seq, head]
      order; for weights and the denominator seq is the query position i.
    index: the last axis: the head_dim or sketch_dim entry for inputs and the
      output, the key position j for weights, None for the denominator.
    value: the non-finite value (nan, inf or -inf).
  """
  tensor: str
  batch: int
  seq: int
  head: int
  index: int | None
  value: float

  def __str__(self) -> str:
    where = f"[batch {self.batch}, seq {self.seq}, head {self.head}]"
    if self.tensor in ("exact_weights", "sketched_weights"):
      where += f", key seq {self.index}"
    elif self.index is not None:
      where += f", entry {self.index}"
    return f"{_DESCRIPTIONS[self.tensor]} is {self.value} at {where}"


def _first_bad(bad):
  """Row-major first True of a numpy bool array, or None."""
  flat = bad.reshape(-1)
  first = int(np.argmax(flat))
  if not flat[first]:
    return None
  return tuple(int(i) for i in np.unravel_index(first, bad.shape))


def _first_nonfinite_entry(name, x):
  """NonFinite for a [batch, seq, heads, dim] array, or None."""
  pos = _first_bad(~np.asarray(jnp.isfinite(x)))
  if pos is None:
    return None
  return NonFinite(name, *pos[:3], index=pos[3], value=float(x[pos]))


@functools.partial(jax.jit, static_argnames=("degree", "block_size", "causal", "local_exact",
                                             "normalization_bias"))
def _weight_checks(q, k, q_features, k_features, segment, rel_block, *, degree, block_size,
                   causal, local_exact, normalization_bias):
  """Per query: the first used weight that is non-finite, and the denominator.

  segment, rel_block [B, T]: each token's segment and its block counted from
  the segment's start (`ref.attention.segment_blocks`; without segments one
  segment, blocks from 0). Returns, each [B, N, T]: for the exact and the
  sketched weights the first key position j with a non-finite used weight (-1:
  none) and that weight; then the denominator bias + sum_j w_ij in the
  compute dtype.
  """
  from pallas_polysketch.ref import attention as ref  # the materialised weights

  t = q.shape[1]
  padded = round_up(t, block_size)
  pad = ((0, 0), (0, padded - t), (0, 0), (0, 0))
  q, k, fq, fk = (jnp.pad(x, pad) for x in (q, k, q_features, k_features))
  segment, rel_block = (jnp.pad(x, ((0, 0), (0, padded - t))) for x in (segment, rel_block))
  key_pos = jnp.arange(padded)
  local = jnp.arange(block_size)

  def first_bad(w, used):
    bad = used & ~jnp.isfinite(w)
    j = jnp.argmax(bad, axis=-1)
    value = jnp.take_along_axis(w, j[..., None], axis=-1)[..., 0]
    return jnp.where(jnp.any(bad, axis=-1), j, -1), value

  def query_block(start):
    qb, fqb, seg_q, rel_q = (jax.lax.dynamic_slice_in_dim(x, start, block_size, axis=1)
                             for x in (q, fq, segment, rel_block))
    # Both weights of this block's queries against every key [B, N, b, T'].
    exact, sketched = ref.pair_weights(qb, k, fqb, fk, degree=degree)
    # Which the op uses, [B, 1, b, T']: keys of the query's own segment (and
    # not padding), earlier ones when causal; with local_exact the exact
    # weights inside the query's block of its segment, sketched ones before it.
    same = (seg_q[:, :, None] == segment[:, None, :]) & (key_pos < t)
    if causal:
      same = same & (key_pos[None, :] <= start + local[:, None])
    if causal and local_exact:
      ex_used = same & (rel_q[:, :, None] == rel_block[:, None, :])
      sk_used = same & ~ex_used
    else:
      ex_used, sk_used = jnp.zeros_like(same), same
    ex_used, sk_used = (jnp.broadcast_to(m[:, None], exact.shape) for m in (ex_used, sk_used))
    ex_first, ex_value = first_bad(exact, ex_used)
    sk_first, sk_value = first_bad(sketched, sk_used)
    den = (normalization_bias + jnp.sum(jnp.where(sk_used, sketched, 0.0), axis=-1)
           + jnp.sum(jnp.where(ex_used, exact, 0.0), axis=-1))
    return ex_first, ex_value, sk_first, sk_value, den

  outs = jax.lax.map(query_block, jnp.arange(0, padded, block_size))
  # [num_blocks, B, N, b] -> [B, N, T]
  return tuple(jnp.moveaxis(x, 0, 2).reshape(*x.shape[1:3], padded)[..., :t]
               for x in outs)


def find_nonfinite(q, k, v, q_features, k_features, *, degree=4, block_size=256,
                   causal=True, local_exact=True, normalization_bias=1.0,
                   segment_ids=None, implementation=None, interpret=False,
                   tile_config=None) -> NonFinite | None:
  """The first input or intermediate of `polysketch_attention` that is not finite.

  Checks, in this order, and returns at the first non-finite entry:
    1. the inputs q, k, v, q_features, k_features;
    2. the exact local weights (q_i . k_j)^degree (causal with local_exact:
       j <= i in the same block);
    3. the sketched weights (f_q,i . f_k,j)^2 the op uses (earlier blocks,
       or all j <= i without local_exact, or all j when not causal);
    4. the denominator normalization_bias + sum_j w_ij;
    5. the output of `polysketch_attention(q, k, v, q_features, k_features,
       **kwargs)` itself (e.g. an overflowing numerator or prefix state).
  Within a tensor "first" is the [batch, seq, head] order (then the last
  axis). Weights and the denominator are computed like the op does: in float32
  (float64 for float64 inputs with x64 enabled).

  A debugging aid: it runs eagerly and returns a Python value, so call it
  outside `jax.jit`, e.g. when a loss turns NaN, on the offending batch.
  It checks the forward only: a finite output still has NaN gradients on
  rows whose denominator is at least 2^126, where 1/den is not a normal
  float32 (reported as NaN rather than flushed to a silent 0).

  Args:
    q [batch, seq, num_heads, head_dim], k, v [batch, seq, num_kv_heads,
      head_dim], q_features, k_features [batch, seq, num_heads | num_kv_heads,
      sketch_dim]: as for `polysketch_attention`.
    degree, block_size, causal, local_exact, normalization_bias,
      segment_ids, implementation, interpret, tile_config: as for
      `polysketch_attention` (with segment_ids only the weights inside a
      segment count, blocks counted from its start, as the op uses them).

  Returns:
    None when everything is finite, else a `NonFinite` naming the tensor and
    its first non-finite [batch, seq, head] position; str() of it is a
    one-line message, e.g. "exact local weight (q_i . k_j)^p is inf at
    [batch 0, seq 5, head 1], key seq 3".
  """
  _validation.check_attention_inputs(q, k, v, q_features, k_features)
  _validation.check_nonempty("q", q, "[batch, seq, num_heads, head_dim]")
  bias = _validation.check_normalization_bias(normalization_bias)
  degree = _validation.check_degree(degree)
  block_size = _validation.check_block_size(block_size)
  causal = _validation.check_bool("causal", causal)
  local_exact = _validation.check_bool("local_exact", local_exact)
  segment_ids = _validation.check_segment_ids(segment_ids, q)
  # The op's own arguments too, before any result: a bad implementation,
  # interpret or tile_config must not hide behind a non-finite input.
  resolve_config(q, k, q_features, degree=degree, block_size=block_size,
                 local_exact=local_exact, normalization_bias=bias,
                 implementation=implementation, interpret=interpret,
                 tile_config=tile_config, symmetric=causal and segment_ids is None)
  inputs = (q, k, v, q_features, k_features)
  for name, x in zip(INPUTS, inputs):
    found = _first_nonfinite_entry(name, x)
    if found is not None:
      return found

  # A block longer than the sequence is one block, as in the op.
  block = min(block_size, round_up(q.shape[1], 8))
  # Without segments the sequence is one segment.
  from pallas_polysketch.ref.attention import segment_blocks
  segment, rel_block = segment_blocks(
      jnp.zeros(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids, block)
  ex_first, ex_value, sk_first, sk_value, den = (
      np.asarray(x) for x in _weight_checks(
          q, k, q_features, k_features, segment, rel_block, degree=degree, block_size=block,
          causal=causal, local_exact=local_exact, normalization_bias=bias))
  for name, first, value in (("exact_weights", ex_first, ex_value),
                             ("sketched_weights", sk_first, sk_value)):
    pos = _first_bad(np.transpose(first >= 0, (0, 2, 1)))  # [B, T, N]
    if pos is not None:
      b, i, n = pos
      return NonFinite(name, b, i, n, index=int(first[b, n, i]),
                       value=float(value[b, n, i]))
  pos = _first_bad(np.transpose(~np.isfinite(den), (0, 2, 1)))
  if pos is not None:
    b, i, n = pos
    return NonFinite("denominator", b, i, n, index=None, value=float(den[b, n, i]))

  out = polysketch_attention(
      q, k, v, q_features, k_features, degree=degree, block_size=block_size,
      causal=causal, local_exact=local_exact, normalization_bias=bias,
      segment_ids=segment_ids, implementation=implementation, interpret=interpret,
      tile_config=tile_config)
  return _first_nonfinite_entry("output", out)
