"""Reference PolySketch attention (DESIGN §1.3): materialised and block by block.

Each function computes in float32 (float64 when given float64 inputs with x64
enabled) and returns the dtype of q.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_polysketch.polynomial import compute_dtype, normalise_weights, repeat_kv
from pallas_polysketch.sketches import self_tensor


def segment_blocks(segment_ids, block_size):
  """(segment, block), each int [B, T], for segment_ids int [B, T]: the
  segment of each token (a segment is a maximal run of equal ids, numbered
  from 1) and its block counted from the segment's start, (i - start_i) //
  block_size."""
  ids = jnp.asarray(segment_ids)
  pos = jnp.arange(ids.shape[1])[None, :]
  change = jnp.concatenate([jnp.ones_like(ids[:, :1], bool), ids[:, 1:] != ids[:, :-1]], axis=1)
  start = jax.lax.cummax(jnp.where(change, pos, 0), axis=1)   # first token of i's segment
  return jnp.cumsum(change, axis=1), (pos - start) // block_size


def _segment_masks(segment_ids, block_size):
  """(same, same_block), each bool [B, 1, T, T], for segment_ids int [B, T]:
  the same segment, and the same segment and block (`segment_blocks`)."""
  seg, rel = segment_blocks(segment_ids, block_size)
  same = seg[:, :, None] == seg[:, None, :]                 # [B, T, T]
  same_block = same & (rel[:, :, None] == rel[:, None, :])
  return same[:, None], same_block[:, None]


def pair_weights(q, k, q_features, k_features, *, degree=4):
  """(exact, sketched), each [B, N, Tq, Tk] in the compute dtype: the exact
  weights (q_i . k_j)^degree and the sketched ones (f_q,i . f_k,j)^2 of every
  pair, before any mask. k and k_features may have fewer (kv) heads, repeated
  for the query heads."""
  dt = compute_dtype(q)
  k, k_features = repeat_kv(k, q.shape[2]), repeat_kv(k_features, q.shape[2])
  exact = jnp.einsum("binh,bjnh->bnij", q.astype(dt), k.astype(dt)) ** degree
  sketched = jnp.einsum("binr,bjnr->bnij", q_features.astype(dt),
                        k_features.astype(dt)) ** 2
  return exact, sketched


def polysketch_weights(q, k, q_features, k_features, *, degree=4, block_size=256,
                       causal=True, local_exact=True, segment_ids=None):
  """The full T x T weight matrix w of DESIGN §1.3, built explicitly.

  k and k_features may have fewer (kv) heads, repeated for the query heads.
  segment_ids: None or int [B, T] (DESIGN §1.5, packed segments): a segment is
  a maximal run of equal ids; w_ij = 0 unless i and j are in one segment, and
  blocks are counted from each segment's start, so every segment gets the
  weights it would get alone.
  Returns w [B, N, T, T] in the compute dtype.
  """
  exact, sketched = pair_weights(q, k, q_features, k_features, degree=degree)
  t = q.shape[1]
  i = jnp.arange(t)[:, None]
  j = jnp.arange(t)[None, :]
  if segment_ids is None:
    if not causal:
      return sketched
    same, same_block = True, (i // block_size) == (j // block_size)
  else:
    same, same_block = _segment_masks(segment_ids, block_size)
    if not causal:
      return jnp.where(same, sketched, 0.0)
  w = jnp.where(same_block & local_exact, exact, sketched)
  return jnp.where((j <= i) & same, w, 0.0)


def polysketch_attention_quadratic(q, k, v, q_features, k_features, *, degree=4,
                                   block_size=256, causal=True, local_exact=True,
                                   normalization_bias=1.0, segment_ids=None):
  """DESIGN §1.3 from the materialised weight matrix. [B, T, N, H] -> [B, T, N, H].

  segment_ids: None or int [B, T], packed segments (see `polysketch_weights`)."""
  w = polysketch_weights(q, k, q_features, k_features, degree=degree,
                         block_size=block_size, causal=causal,
                         local_exact=local_exact, segment_ids=segment_ids)
  v = repeat_kv(v, q.shape[2])
  return normalise_weights(w, v.astype(w.dtype), q.dtype, normalization_bias)


def polysketch_attention_blocked(q, k, v, q_features, k_features, *, degree=4,
                                 block_size=256, causal=True, local_exact=True,
                                 normalization_bias=1.0):
  """DESIGN §1.3 block by block, carrying the prefix state S_t and normaliser z_t.

  A Python loop over blocks (the last one may be short), per (batch, head) via
  einsum over the leading axes. [B, T, N, H] -> [B, T, N, H].
  """
  out_dtype, dt = q.dtype, compute_dtype(q)
  k, v, k_features = (repeat_kv(x, q.shape[2]) for x in (k, v, k_features))
  q, k, v, fq, fk = (x.astype(dt) for x in (q, k, v, q_features, k_features))
  if not causal:
    phi_q, phi_k = self_tensor(fq), self_tensor(fk)
    s = jnp.einsum("btnc,btnh->bnch", phi_k, v)
    z = jnp.sum(phi_k, axis=1)  # [B, N, r^2]
    num = jnp.einsum("btnc,bnch->btnh", phi_q, s)
    den = normalization_bias + jnp.einsum("btnc,bnc->btn", phi_q, z)
    return (num / den[..., None]).astype(out_dtype)
  b_, t, n, h = q.shape
  r2 = fq.shape[-1] ** 2
  state = jnp.zeros((b_, n, r2, h), dt)   # S_t = sum_{s<t} Phi_k_s^T V_s
  norm = jnp.zeros((b_, n, r2), dt)       # z_t = sum_{s<t} Phi_k_s^T 1
  outs = []
  for start in range(0, t, block_size):
    blk = slice(start, min(start + block_size, t))
    qb, kb, vb = q[:, blk], k[:, blk], v[:, blk]
    phi_q, phi_k = self_tensor(fq[:, blk]), self_tensor(fk[:, blk])
    if local_exact:
      local = jnp.einsum("binh,bjnh->bnij", qb, kb) ** degree
    else:
      local = jnp.einsum("binr,bjnr->bnij", fq[:, blk], fk[:, blk]) ** 2
    local = jnp.tril(local)
    num = jnp.einsum("bnij,bjnh->binh", local, vb) + jnp.einsum("binc,bnch->binh", phi_q, state)
    den = normalization_bias + jnp.sum(local, axis=-1).transpose(0, 2, 1) + jnp.einsum("binc,bnc->bin", phi_q, norm)
    outs.append(num / den[..., None])
    state = state + jnp.einsum("bjnc,bjnh->bnch", phi_k, vb)
    norm = norm + jnp.sum(phi_k, axis=1)
  return jnp.concatenate(outs, axis=1).astype(out_dtype)
