"""The blocked pure-JAX path of PolySketch attention (DESIGN §1.3), linear in T.

Causal attention walks the sequence in chunks of `chunk_blocks` blocks with a
`lax.scan` that carries the prefix state S (as S^T [B, N, H, r^2]) and the normaliser
z [B, N, r^2] in float32. Inside a chunk every block is computed at once as
batched matmuls: the block updates U_t = Phi_k_t^T V_t, their exclusive prefix
sum over the chunk's blocks (plus the carried state) gives every block's S_t,
then the reads Phi_q_t S_t and the exact local blocks. Chunks bound the
memory: only one chunk's r^2-wide features exist at a time, so memory is
linear in T with a small constant, and the matmuls stay large.

The backward is a `jax.custom_vjp` following DESIGN §1.4: residuals are the
inputs, the output O, the denominator and the state at each chunk start (r^2 H
floats per chunk and head, never per block). One reverse scan over chunks
recomputes each chunk's block states from its start state, and carries
R = sum over later blocks of Phi_q^T dnum (and rho for the normaliser) for the
gradients of V and Phi_k; Phi gradients fold back into the r-dim features
through df = (M + M^T) f.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from pallas_polysketch.polynomial import compute_dtype
from pallas_polysketch.sketches import self_tensor

# Tokens per chunk of the causal scan: large enough for large batched matmuls,
# small enough that a chunk's r^2-wide features stay small (at r = 32 and 12
# heads one chunk's Phi is 2048 * 12 * 1024 floats = 96 MiB).
CHUNK_TOKENS = int(os.environ.get("POLYSKETCH_XLA_CHUNK_TOKENS", 2048))


def local_weights(qb, kb, fqb, fkb, *, degree, local_exact):
  """Causal weights inside one diagonal block: [..., b, b], lower triangular."""
  if local_exact:
    s = jnp.einsum("...ih,...jh->...ij", qb, kb) ** degree
  else:
    s = jnp.einsum("...ir,...jr->...ij", fqb, fkb) ** 2
  blk = s.shape[-1]
  return jnp.where(jnp.tril(jnp.ones((blk, blk), bool)), s, 0.0)


def _to_chunks(x, num_chunks, chunk_blocks, block_size):
  """[B, T, N, D] -> [num_chunks, B, N, chunk_blocks, b, D]."""
  b_, _, n, d = x.shape
  x = x.reshape(b_, num_chunks, chunk_blocks, block_size, n, d)
  return jnp.transpose(x, (1, 0, 4, 2, 3, 5))


def _from_chunks(x):
  """[num_chunks, B, N, chunk_blocks, b, D] -> [B, T, N, D]."""
  nc, b_, n, cb, blk, d = x.shape
  return jnp.transpose(x, (1, 0, 3, 4, 2, 5)).reshape(b_, nc * cb * blk, n, d)


def _strict_lower(n, dtype):
  """[n, n] with ones where row > column: x_excl[t] = sum_{s<t} x[s]."""
  return jnp.tril(jnp.ones((n, n), dtype), -1)


def _chunk_states(state, norm, phi_k, vc):
  """Per-block prefix states of one chunk, from the state at its start.

  The state is kept transposed, S^T [B, N, H, r^2]: then the update V^T Phi_k
  and every other product below are matmuls whose operands need no r^2-sized
  transpose (on CPU, Phi_k^T V with the contraction on Phi_k's rows ran 2.5x
  slower than V^T Phi_k).

  Args: state [B, N, H, r^2], norm [B, N, r^2], phi_k [B, N, cb, b, r^2],
    vc [B, N, cb, b, H].
  Returns: (S_t^T [B, N, cb, H, r^2], z_t [B, N, cb, r^2], the state and norm
    after the chunk).
  """
  upd = jnp.einsum("gnsjh,gnsjc->gnshc", vc, phi_k)
  upd_z = jnp.sum(phi_k, axis=-2)
  excl = _strict_lower(phi_k.shape[2], phi_k.dtype)
  s_t = state[:, :, None] + jnp.einsum("ts,gnshc->gnthc", excl, upd)
  z_t = norm[:, :, None] + jnp.einsum("ts,gnsc->gntc", excl, upd_z)
  return s_t, z_t, s_t[:, :, -1] + upd[:, :, -1], z_t[:, :, -1] + upd_z[:, :, -1]


def _chunk_forward(carry, xs, *, degree, local_exact, dt):
  state, norm = carry
  qc, kc, vc, fqc, fkc = (x.astype(dt) for x in xs)
  local = local_weights(qc, kc, fqc, fkc, degree=degree, local_exact=local_exact)
  phi_q, phi_k = self_tensor(fqc), self_tensor(fkc)
  s_t, z_t, state, norm = _chunk_states(state, norm, phi_k, vc)
  num = (jnp.einsum("gntij,gntjh->gntih", local, vc)
         + jnp.einsum("gntic,gnthc->gntih", phi_q, s_t))
  den = (1.0 + jnp.sum(local, axis=-1)
         + jnp.einsum("gntic,gntc->gnti", phi_q, z_t))
  return (state, norm), (num / den[..., None], den)


def _self_tensor_grad(dphi, f):
  """Cotangent of f for phi = f (x) f: df = (M + M^T) f with M = dphi as r x r."""
  r = f.shape[-1]
  m = dphi.reshape(*dphi.shape[:-1], r, r)
  return jnp.einsum("...ac,...c->...a", m, f) + jnp.einsum("...ca,...c->...a", m, f)


def _chunk_backward(carry, xs, *, degree, local_exact, dt):
  r_state, r_norm = carry  # sums over later blocks of Phi_q^T dnum, Phi_q^T dden
  (qc, kc, vc, fqc, fkc), out, den, state, norm, g = xs
  qc, kc, vc, fqc, fkc = (x.astype(dt) for x in (qc, kc, vc, fqc, fkc))
  g = g.astype(dt)
  dnum = g / den[..., None]
  dden = -jnp.sum(g * out, axis=-1) / den

  # Local block: w = tril(s^p) with s = q k^T (or f_q f_k^T, p = 2).
  if local_exact:
    s = jnp.einsum("gntih,gntjh->gntij", qc, kc)
    p = degree
  else:
    s = jnp.einsum("gntir,gntjr->gntij", fqc, fkc)
    p = 2
  blk = s.shape[-1]
  mask = jnp.tril(jnp.ones((blk, blk), bool))
  w = jnp.where(mask, s ** p, 0.0)
  dv = jnp.einsum("gntij,gntih->gntjh", w, dnum)
  dw = jnp.einsum("gntih,gntjh->gntij", dnum, vc) + dden[..., None]
  ds = jnp.where(mask, dw * (p * s ** (p - 1)), 0.0)

  # Prefix reads and updates.
  phi_q, phi_k = self_tensor(fqc), self_tensor(fkc)
  s_t, z_t, _, _ = _chunk_states(state, norm, phi_k, vc)
  dphi_q = (jnp.einsum("gntih,gnthc->gntic", dnum, s_t)
            + dden[..., None] * z_t[:, :, :, None, :])
  ds_t = jnp.einsum("gntih,gntic->gnthc", dnum, phi_q)
  dz_t = jnp.einsum("gntic,gnti->gntc", phi_q, dden)
  later = _strict_lower(ds_t.shape[2], dt)  # later[s, t] = 1 where s > t
  r_t = r_state[:, :, None] + jnp.einsum("st,gnshc->gnthc", later, ds_t)
  rho_t = r_norm[:, :, None] + jnp.einsum("st,gnsc->gntc", later, dz_t)
  dv = dv + jnp.einsum("gntjc,gnthc->gntjh", phi_k, r_t)
  dphi_k = (jnp.einsum("gntjh,gnthc->gntjc", vc, r_t)
            + rho_t[:, :, :, None, :])
  dfq = _self_tensor_grad(dphi_q, fqc)
  dfk = _self_tensor_grad(dphi_k, fkc)
  if local_exact:
    dq = jnp.einsum("gntij,gntjh->gntih", ds, kc)
    dk = jnp.einsum("gntij,gntih->gntjh", ds, qc)
  else:
    dq, dk = jnp.zeros_like(qc), jnp.zeros_like(kc)
    dfq = dfq + jnp.einsum("gntij,gntjr->gntir", ds, fkc)
    dfk = dfk + jnp.einsum("gntij,gntir->gntjr", ds, fqc)
  carry = (r_t[:, :, 0] + ds_t[:, :, 0], rho_t[:, :, 0] + dz_t[:, :, 0])
  return carry, (dq, dk, dv, dfq, dfk)


def _init_state(x, r, h, dt):
  b_, n = x.shape[1], x.shape[2]
  return jnp.zeros((b_, n, h, r * r), dt), jnp.zeros((b_, n, r * r), dt)


def _scan_forward(xs, degree, local_exact, save_states):
  qc, _, vc, fqc, _ = xs
  dt = compute_dtype(qc)
  body = functools.partial(_chunk_forward, degree=degree, local_exact=local_exact, dt=dt)

  def step(carry, chunk):
    new_carry, (out, den) = body(carry, chunk)
    return new_carry, ((out, den, *carry) if save_states else out)

  init = _init_state(qc, fqc.shape[-1], vc.shape[-1], dt)
  return jax.lax.scan(step, init, xs)[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _causal_chunks(xs, degree, local_exact):
  """xs: 5 arrays [num_chunks, B, N, cb, b, D]. Returns O (compute dtype)."""
  return _scan_forward(xs, degree, local_exact, save_states=False)


def _causal_chunks_fwd(xs, degree, local_exact):
  out, den, states, norms = _scan_forward(xs, degree, local_exact, save_states=True)
  return out, (xs, out, den, states, norms)


def _causal_chunks_bwd(degree, local_exact, residuals, g):
  xs, out, den, states, norms = residuals
  qc, _, vc, fqc, _ = xs
  dt = compute_dtype(qc)
  body = functools.partial(_chunk_backward, degree=degree, local_exact=local_exact, dt=dt)
  init = _init_state(qc, fqc.shape[-1], vc.shape[-1], dt)
  _, grads = jax.lax.scan(body, init, (xs, out, den, states, norms, g), reverse=True)
  return (tuple(d.astype(x.dtype) for d, x in zip(grads, xs)),)


_causal_chunks.defvjp(_causal_chunks_fwd, _causal_chunks_bwd)


def _chunking(num_blocks, block_size, chunk_tokens):
  """(num_chunks, chunk_blocks) with chunks of about chunk_tokens, balanced."""
  target = max(1, chunk_tokens // block_size)
  num_chunks = -(-num_blocks // target)
  chunk_blocks = -(-num_blocks // num_chunks)
  return num_chunks, chunk_blocks


def polysketch_xla(q, k, v, q_features, k_features, *, degree, block_size,
                   causal, local_exact, chunk_tokens=None):
  """Inputs already validated; T is a multiple of block_size. Returns [B, T, N, H]."""
  out_dtype, dt = q.dtype, compute_dtype(q)
  if not causal:
    q, v, fq, fk = (x.astype(dt) for x in (q, v, q_features, k_features))
    phi_k = self_tensor(fk)
    state = jnp.einsum("btnc,btnh->bnch", phi_k, v)
    norm = jnp.sum(phi_k, axis=1)
    phi_q = self_tensor(fq)
    num = jnp.einsum("btnc,bnch->btnh", phi_q, state)
    den = 1.0 + jnp.einsum("btnc,bnc->btn", phi_q, norm)
    return (num / den[..., None]).astype(out_dtype)

  t = q.shape[1]
  num_blocks = t // block_size
  num_chunks, chunk_blocks = _chunking(num_blocks, block_size,
                                       chunk_tokens or CHUNK_TOKENS)
  padded = num_chunks * chunk_blocks * block_size
  # Zero blocks at the end are exact: causal queries never see later keys, and
  # the padded queries are sliced off.
  xs = tuple(
      _to_chunks(jnp.pad(x, ((0, 0), (0, padded - t), (0, 0), (0, 0))),
                 num_chunks, chunk_blocks, block_size)
      for x in (q, k, v, q_features, k_features))
  out = _causal_chunks(xs, degree, local_exact)
  return _from_chunks(out)[:, :t].astype(out_dtype)
