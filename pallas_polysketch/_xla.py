"""The blocked pure-JAX path of PolySketch attention (DESIGN §1.3), linear in T.

A `lax.scan` over blocks carries the prefix state S [B, N, r^2, H] and the
normaliser z [B, N, r^2] in float32. The scan body is rematerialised in the
backward pass, so autodiff saves one state per block (r^2 H floats per block
and head) and never a T x T matrix or an r^2-wide tensor for every token.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_polysketch.polynomial import compute_dtype
from pallas_polysketch.sketches import self_tensor


def _to_blocks(x, num_blocks, block_size):
  """[B, T, N, D] (T = num_blocks * block_size) -> [num_blocks, B, N, b, D]."""
  b_, _, n, d = x.shape
  x = x.reshape(b_, num_blocks, block_size, n, d)
  return jnp.transpose(x, (1, 0, 3, 2, 4))


def _from_blocks(x):
  """[num_blocks, B, N, b, D] -> [B, num_blocks * b, N, D]."""
  nb, b_, n, blk, d = x.shape
  return jnp.transpose(x, (1, 0, 3, 2, 4)).reshape(b_, nb * blk, n, d)


def local_weights(qb, kb, fqb, fkb, *, degree, local_exact):
  """Causal weights inside one diagonal block: [..., b, b], lower triangular."""
  if local_exact:
    s = jnp.einsum("...ih,...jh->...ij", qb, kb) ** degree
  else:
    s = jnp.einsum("...ir,...jr->...ij", fqb, fkb) ** 2
  blk = s.shape[-1]
  return jnp.where(jnp.tril(jnp.ones((blk, blk), bool)), s, 0.0)


def polysketch_xla(q, k, v, q_features, k_features, *, degree, block_size,
                   causal, local_exact):
  """Inputs already validated; T is a multiple of block_size. Returns [B, T, N, H]."""
  out_dtype, dt = q.dtype, compute_dtype(q)
  q, k, v, fq, fk = (x.astype(dt) for x in (q, k, v, q_features, k_features))
  if not causal:
    phi_k = self_tensor(fk)
    state = jnp.einsum("btnc,btnh->bnch", phi_k, v)
    norm = jnp.sum(phi_k, axis=1)
    phi_q = self_tensor(fq)
    num = jnp.einsum("btnc,bnch->btnh", phi_q, state)
    den = 1.0 + jnp.einsum("btnc,bnc->btn", phi_q, norm)
    return (num / den[..., None]).astype(out_dtype)

  b_, t, n, h = q.shape
  r = fq.shape[-1]
  num_blocks = t // block_size
  blocks = tuple(_to_blocks(x, num_blocks, block_size) for x in (q, k, v, fq, fk))

  @jax.checkpoint
  def step(carry, xs):
    state, norm = carry  # [B, N, r^2, H], [B, N, r^2]
    qb, kb, vb, fqb, fkb = xs
    local = local_weights(qb, kb, fqb, fkb, degree=degree, local_exact=local_exact)
    phi_q, phi_k = self_tensor(fqb), self_tensor(fkb)
    num = local @ vb + phi_q @ state
    den = 1.0 + jnp.sum(local, axis=-1) + jnp.einsum("bnic,bnc->bni", phi_q, norm)
    out = num / den[..., None]
    state = state + jnp.einsum("bnjc,bnjh->bnch", phi_k, vb)
    norm = norm + jnp.sum(phi_k, axis=-2)
    return (state, norm), out

  init = (jnp.zeros((b_, n, r * r, h), dt), jnp.zeros((b_, n, r * r), dt))
  _, out = jax.lax.scan(step, init, blocks)
  return _from_blocks(out).astype(out_dtype)
