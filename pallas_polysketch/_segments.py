"""Packed segments on the xla path (DESIGN §1.5, "Packed segments"), linear in T.

With segment ids, a segment is a maximal run of equal ids in a row. Token i of
a segment starting at s_i lies in the segment-relative block starting at

    rb_i = s_i + b * floor((i - s_i) / b)

and for j <= i (causal):

    w_ij = (q_i . k_j)^p          if j is in i's segment, local_exact and rb_j == rb_i
    w_ij = (f_q,i . f_k,j)^2      if j is in i's segment otherwise
    w_ij = 0                      if j is in another segment
    o_i  = sum_j w_ij v_j / (bias + sum_j w_ij)

which is every segment run alone (blocks counted from its start); the zero
padding to a multiple of b is one more segment. Non-causal: w_ij = (f_q,i .
f_k,j)^2 for every j of i's segment.

Causal mechanism: a `lax.scan` over the grid blocks t (tokens [tb, (t+1)b)).
The queries of block t need

  (a) the keys of the window [(t-1)b, (t+1)b) (grid blocks t-1 and t), with
      the pairwise rule above, from b x 2b exact and sketched scores masked by
      segment, causality and relative block;
  (b) the keys j < (t-1)b of their own segment, all sketched, through the
      segment-running state S(t-1) = sum over j < (t-1)b with s_j ==
      s_{(t-1)b-1} of psi(f_k,j)^T [v_j, 1], read by query i iff s_i < (t-1)b.
      Then token (t-1)b - 1 lies between s_i and i, so it is in i's segment
      and S(t-1) holds exactly i's keys before (t-1)b; otherwise i has no keys
      before (t-1)b.

Keys j < (t-1)b are never exact, so (a) and (b) never disagree: for i in
block t, rb_i > i - b >= (t-1)b (the relative block holding i starts less than
b before it) while rb_j <= j < (t-1)b, so rb_j < rb_i.

The carry is the single state S(t-1), [B, K, H + 1, r(r+1)/2] per kv head
(the xla path's [S | z]^T over the symmetric features psi). Step t reads it,
then advances it over grid block t-1, whose keys it holds anyway for the
window: with L the last token of block t-1,

    S(t) = [s_L < (t-1)b] S(t-1) + sum over j in block t-1 with s_j == s_L of psi_k,j^T [v_j, 1]

(the state keeps running if L's segment started before block t-1, else it
restarts inside it). The masks are applied with `jnp.where`, never as a 0/1
product, so an overflow (inf) in one segment cannot reach another as 0 * inf.

Non-causal: a forward walk of the causal scan with all-sketched weights gives
sum over j <= i of i's segment; a reverse walk (the sequence flipped, segments
recomputed on the flipped ids) with the window mask j < i gives the keys
after i. Their sum is the whole segment with no key counted twice and
nothing subtracted; the bias is added once, to the sum.

Gradients: autodiff through the scan, with `jax.checkpoint` on the step. The
backward keeps one carried state per grid block, (T / b) (H + 1) r(r+1)/2
floats per batch row and kv head (per walk), and recomputes the rest of each
step; at r = 32, H = 64, b = 256 and T = 32k that is 16.8 MiB per kv head and
row. The unsegmented path keeps one per ~2048-token chunk instead.

GQA: query-side arrays carry a group axis, [..., K, G, ...]; the state, its
update and the window's keys are per kv head. Every product runs at
`Precision.HIGHEST`, in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_polysketch._xla import einsum, symmetric_features, _with_ones
from pallas_polysketch.polynomial import compute_dtype, divide_by_denominator


def segment_starts(labels):
  """s_i, the first position of i's run of equal labels: int32 [B, T] -> [B, T]."""
  t = labels.shape[1]
  first = jnp.concatenate(
      [jnp.ones_like(labels[:, :1], bool), labels[:, 1:] != labels[:, :-1]], axis=1)
  pos = jnp.arange(t, dtype=jnp.int32)
  return jax.lax.cummax(jnp.where(first, pos, 0), axis=1)


def segment_index(segment_ids, padded_len):
  """Segment ids [B, T] -> a running segment number [B, padded_len] (int32).

  A new segment starts wherever the id changes and at T (the padding), so the
  result has runs exactly where the segments are, and a flipped copy has the
  runs of the flipped sequence (unlike the ids, which may repeat)."""
  b_, t = segment_ids.shape
  change = jnp.concatenate(
      [jnp.ones((b_, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1],
       jnp.ones((b_, padded_len - t), bool)], axis=1)
  return jnp.cumsum(change, axis=1, dtype=jnp.int32)


def _to_blocks(x, block_size, group):
  """[B, T, N, D] -> [nb, B, K, G, b, D] (group=G), or [nb, B, K, b, D] (group=None)."""
  b_, t, n, d = x.shape
  x = jnp.transpose(x.reshape(b_, t // block_size, block_size, n, d), (1, 0, 3, 2, 4))
  if group is None:
    return x
  return x.reshape(t // block_size, b_, n // group, group, block_size, d)


def _previous(x, fill):
  """Along axis 0 (blocks): x[t-1] at t, `fill` at t = 0."""
  return jnp.concatenate([jnp.full_like(x[:1], fill), x[:-1]], axis=0)


def _step(state, xs, *, block_size, degree, local_exact, strict):
  """One grid block t. state: S(t-1) [B, K, H + 1, d].

  Returns (S(t), acc [B, K, G, b, H + 1]): the numerator and the sum of the
  weights (the denominator less the bias)."""
  t, (q, k, v, fq, fk), (kp, vp, fkp), (s, rb), (sp, rbp) = xs
  b = block_size
  i_pos = t * b + jnp.arange(b)
  j_pos = (t - 1) * b + jnp.arange(2 * b)
  kw = jnp.concatenate([kp, k], axis=-2)                       # [B, K, 2b, H]
  v1w = _with_ones(jnp.concatenate([vp, v], axis=-2))          # [B, K, 2b, H + 1]
  fkw = jnp.concatenate([fkp, fk], axis=-2)
  sw = jnp.concatenate([sp, s], axis=-1)                       # [B, 2b]
  rbw = jnp.concatenate([rbp, rb], axis=-1)

  # (a) the window: exact or sketched pairwise weights.
  before = (j_pos[None, :] < i_pos[:, None]) if strict else (j_pos[None, :] <= i_pos[:, None])
  allowed = (s[:, :, None] == sw[:, None, :]) & before          # [B, b, 2b]
  w = einsum("bnqir,bnjr->bnqij", fq, fkw) ** 2
  if local_exact:
    exact = einsum("bnqih,bnjh->bnqij", q, kw) ** degree
    same_block = rb[:, :, None] == rbw[:, None, :]
    w = jnp.where(same_block[:, None, None], exact, w)
  w = jnp.where(allowed[:, None, None], w, 0.0)
  acc = einsum("bnqij,bnjh->bnqih", w, v1w)

  # (b) the segment's keys before the window, through S(t-1).
  read = einsum("bnqic,bnhc->bnqih", symmetric_features(fq), state)
  use = s < (t - 1) * b                                         # [B, b]
  acc = acc + jnp.where(use[:, None, None, :, None], read, 0.0)

  # Advance the state over block t-1: S(t) from S(t-1).
  s_last = sp[:, -1]                                            # [B]
  keep = (s_last < (t - 1) * b)[:, None, None, None]
  in_last = (sp == s_last[:, None])[:, None, :, None]           # [B, 1, b, 1]
  upd = einsum("bnjh,bnjc->bnhc", jnp.where(in_last, _with_ones(vp), 0.0),
               jnp.where(in_last, symmetric_features(fkp), 0.0))
  return jnp.where(keep, state, 0.0) + upd, acc


def _walk(q, k, v, fq, fk, labels, *, block_size, degree, local_exact, strict):
  """One causal walk over grid blocks. Inputs padded, T a multiple of block_size,
  in the compute dtype; labels [B, T] int32 with runs exactly at the segments.

  Returns acc [B, T, N, H + 1] (numerator | sum of weights)."""
  b = block_size
  b_, t, n, h = q.shape
  kv, r = k.shape[2], fk.shape[-1]
  group = n // kv
  starts = segment_starts(labels)
  rel_block = starts + b * ((jnp.arange(t, dtype=jnp.int32) - starts) // b)
  to_blocks = lambda x: jnp.transpose(x.reshape(b_, t // b, b), (1, 0, 2))
  s_blk, rb_blk = to_blocks(starts), to_blocks(rel_block)
  kb, vb, fkb = (_to_blocks(x, b, None) for x in (k, v, fk))
  xs = (jnp.arange(t // b, dtype=jnp.int32),
        (_to_blocks(q, b, group), kb, vb, _to_blocks(fq, b, group), fkb),
        tuple(_previous(x, 0.0) for x in (kb, vb, fkb)),
        (s_blk, rb_blk),
        (_previous(s_blk, -1), _previous(rb_blk, -1)))
  step = functools.partial(_step, block_size=b, degree=degree, local_exact=local_exact,
                           strict=strict)
  init = jnp.zeros((b_, kv, h + 1, r * (r + 1) // 2), q.dtype)
  _, acc = jax.lax.scan(jax.checkpoint(step), init, xs)   # [nb, B, K, G, b, H + 1]
  acc = acc.reshape(t // b, b_, n, b, h + 1)
  return jnp.transpose(acc, (1, 0, 3, 2, 4)).reshape(b_, t, n, h + 1)


def segmented_attention(q, k, v, q_features, k_features, segment_ids, *, degree,
                        block_size, local_exact, bias, causal):
  """PolySketch attention with packed segments (module docstring).

  Args:
    q [B, T, N, H], k, v [B, T, K, H], q_features [B, T, N, r],
    k_features [B, T, K, r], segment_ids int [B, T]; any T (zero-padded here to
    a multiple of block_size, the padding one more segment).
  Returns:
    [B, T, N, H] in q's dtype.
  """
  out_dtype, dt = q.dtype, compute_dtype(q)
  b_, t = segment_ids.shape
  padded = -(-t // block_size) * block_size
  pad = lambda x: jnp.pad(x.astype(dt), ((0, 0), (0, padded - t), (0, 0), (0, 0)))
  args = tuple(pad(x) for x in (q, k, v, q_features, k_features))
  labels = segment_index(segment_ids, padded)
  walk = functools.partial(_walk, block_size=block_size, degree=degree)
  if causal:
    acc = walk(*args, labels, local_exact=local_exact, strict=False)
  else:
    flip = lambda x: jnp.flip(x, axis=1)
    acc = (walk(*args, labels, local_exact=False, strict=False)
           + flip(walk(*map(flip, args), flip(labels), local_exact=False, strict=True)))
  den = bias + acc[..., -1]
  return divide_by_denominator(acc[..., :-1], den[..., None])[:, :t].astype(out_dtype)
