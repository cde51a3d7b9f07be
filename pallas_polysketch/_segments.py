"""Packed segments (DESIGN §1.5, "Packed segments"), linear in T: the geometry
of a walk over the blocks, and the xla path's walk.

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

The walk over grid blocks t (tokens [tb, (t+1)b)). The queries of block t need

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

Step t reads S(t-1), then advances it over grid block t-1, whose keys it holds
anyway for the window: with L the last token of block t-1,

    S(t) = [s_L < (t-1)b] S(t-1) + sum over j in block t-1 with s_j == s_L of psi_k,j^T [v_j, 1]

(the state keeps running if L's segment started before block t-1, else it
restarts inside it). The masks are applied with `jnp.where`, never as a 0/1
product, so an overflow (inf) in one segment cannot reach another's outputs as
0 * inf. Gradients are not so kept apart: where one segment's weights overflow
(q, k far beyond LayerNorm'd magnitudes, ~1e5), the gradient of a loss over
the other segments is NaN too, as for any `jnp.where` over an overflowed value.

A walk starts from a given S(-1) and a given block -1 (`previous`): zeros and
NO_SEGMENT labels at a sequence's start; the shard before this one's state and
last block under context parallelism (attention.py). Positions are the walk's
own (0 at its first token); a segment that started before the walk has a
negative start.

Non-causal: a forward walk with all-sketched weights gives sum over j <= i of
i's segment; a reverse walk (the sequence flipped) with the window mask j < i
gives the keys after i. Their sum is the whole segment with no key counted
twice and nothing subtracted; the bias is added once, to the sum.

Gradients of the xla walk: autodiff through the scan, with `jax.checkpoint` on
the step. The backward keeps one carried state per grid block, (T / b) (H + 1)
r(r+1)/2 floats per batch row and kv head (per walk), and recomputes the rest
of each step; at r = 32, H = 64, b = 256 and T = 32k that is 16.8 MiB per kv
head and row. The unsegmented path keeps one per ~2048-token chunk instead.

GQA: query-side arrays carry a group axis, [..., K, G, ...]; the state, its
update and the window's keys are per kv head. Every product runs at
`Precision.HIGHEST`, in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_polysketch._xla import einsum, symmetric_features, _with_ones
from pallas_polysketch.polynomial import compute_dtype

# The label of "no token": the starts of a missing block -1, below any real
# (possibly negative) start.
NO_SEGMENT = -(2 ** 30)


class Previous(NamedTuple):
  """Grid block -1 of a walk: k, v [B, b, K, H], k_features [B, b, K, r];
  starts and rel_block int32 [B, b] in the walk's positions."""
  k: jax.Array
  v: jax.Array
  k_features: jax.Array
  starts: jax.Array
  rel_block: jax.Array


def segment_starts(labels):
  """s_i, the first position of i's run of equal labels: int [B, T] -> int32 [B, T]."""
  return starts_from_changes(run_changes(labels))


def run_changes(labels):
  """int [B, T] -> bool [B, T]: True where a run of equal labels starts (always at 0)."""
  return jnp.concatenate(
      [jnp.ones_like(labels[:, :1], bool), labels[:, 1:] != labels[:, :-1]], axis=1)


def starts_from_changes(changes, incoming=None):
  """The start of every token's segment, int32 [B, T], from `run_changes`.

  incoming: None, or int32 [B], the start of the segment running into the
  walk from before it (used until the first change)."""
  pos = jnp.arange(changes.shape[1], dtype=jnp.int32)
  first = jnp.full(changes.shape[:1], NO_SEGMENT, jnp.int32) if incoming is None else incoming
  return jax.lax.cummax(jnp.where(changes, pos, first[:, None]), axis=1)


def relative_blocks(starts, block_size):
  """rb_i = s_i + b floor((i - s_i) / b): int32 [B, T]."""
  pos = jnp.arange(starts.shape[1], dtype=jnp.int32)
  return starts + block_size * ((pos - starts) // block_size)


def no_previous(k, v, k_features, block_size):
  """Block -1 at a sequence's start: zero keys, labels of no segment."""
  zeros = lambda x: jnp.zeros((x.shape[0], block_size) + x.shape[2:], x.dtype)
  labels = jnp.full((k.shape[0], block_size), NO_SEGMENT, jnp.int32)
  return Previous(zeros(k), zeros(v), zeros(k_features), labels, labels)


def _to_blocks(x, block_size, group):
  """[B, T, N, D] -> [nb, B, K, G, b, D] (group=G), or [nb, B, K, b, D] (group=None)."""
  b_, t, n, d = x.shape
  x = jnp.transpose(x.reshape(b_, t // block_size, block_size, n, d), (1, 0, 3, 2, 4))
  if group is None:
    return x
  return x.reshape(t // block_size, b_, n // group, group, block_size, d)


def _label_blocks(x, block_size):
  """int [B, T] -> [nb, B, b]."""
  return jnp.transpose(x.reshape(x.shape[0], -1, block_size), (1, 0, 2))


def _previous(x, first):
  """Along axis 0 (blocks): x[t-1] at t, `first` at t = 0."""
  return jnp.concatenate([first[None], x[:-1]], axis=0)


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


def segment_walk_xla(q, k, v, fq, fk, starts, rel_block, state, previous, *, block_size,
                     degree, local_exact, strict):
  """One causal walk over the grid blocks (module docstring), on the xla path.

  Args:
    q [B, T, N, H], k, v [B, T, K, H], fq [B, T, N, r], fk [B, T, K, r], T a
    multiple of block_size; starts, rel_block int32 [B, T] (walk positions);
    state: S(-1), [B, K, H + 1, r(r+1)/2]; previous: a `Previous`. strict:
    the window takes keys j < i only (the reverse walk of non-causal).
  Returns:
    acc [B, T, N, H + 1] in the compute dtype: the numerator | the sum of weights.
  """
  b = block_size
  dt = compute_dtype(q)
  q, k, v, fq, fk = (x.astype(dt) for x in (q, k, v, fq, fk))
  b_, t, n, h = q.shape
  group = n // k.shape[2]
  kb, vb, fkb = (_to_blocks(x, b, None) for x in (k, v, fk))
  prev = [_to_blocks(x.astype(dt), b, None)[0] for x in previous[:3]]
  s_blk, rb_blk = _label_blocks(starts, b), _label_blocks(rel_block, b)
  xs = (jnp.arange(t // b, dtype=jnp.int32),
        (_to_blocks(q, b, group), kb, vb, _to_blocks(fq, b, group), fkb),
        tuple(_previous(x, p) for x, p in zip((kb, vb, fkb), prev)),
        (s_blk, rb_blk),
        (_previous(s_blk, previous.starts), _previous(rb_blk, previous.rel_block)))
  step = functools.partial(_step, block_size=b, degree=degree, local_exact=local_exact,
                           strict=strict)
  _, acc = jax.lax.scan(jax.checkpoint(step), state.astype(dt), xs)  # [nb, B, K, G, b, H + 1]
  acc = acc.reshape(t // b, b_, n, b, h + 1)
  return jnp.transpose(acc, (1, 0, 3, 2, 4)).reshape(b_, t, n, h + 1)
