"""The blocked pure-JAX path of PolySketch attention (DESIGN §1.3), linear in T.

Causal attention walks the sequence in chunks of about CHUNK_TOKENS tokens with
a `lax.scan` whose carry is the float32 prefix state. Inside a chunk every block
is computed at once as batched matmuls: the block updates, their exclusive
prefix sum over the chunk's blocks (plus the carried state) gives every
block's state, then the reads and the exact local blocks. Only one chunk's
wide features exist at a time, so memory is linear in T with a small constant,
and the matmuls stay large. Three exact rewrites of §1.3 make it cheaper:

- symmetric features: phi = f (x) f has r(r+1)/2 distinct entries, so
  psi = (f_a f_c, a <= c, off-diagonal scaled by sqrt 2) has the same inner
  products, (f . g)^2, at 528 instead of 1024 numbers for r = 32; the state
  and its reads and updates halve;
- a ones column appended to V, so the normaliser z is the state's last row and
  one matmul gives numerator and denominator (in the kernel z stays separate:
  H + 1 lanes break the TPU tiling; on CPU it saves passes over psi);
- the state is stored transposed, [S | z]^T [B, N, H + 1, d], so no product
  needs a d-sized transpose.

The backward is a `jax.custom_vjp` following DESIGN §1.4: residuals are the
inputs, O, the denominator and the state at each chunk start (d (H + 1) floats
per chunk and head, never per block). One reverse scan over chunks recomputes
each chunk's block states from its start state and carries
R = sum over later blocks of Psi_q^T [dnum | dden] for the gradients of V and
the key features.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_polysketch.polynomial import compute_dtype

# Tokens per chunk of the causal scan: large enough for large batched matmuls,
# small enough that a chunk's wide features stay small (at r = 32 and 12 heads
# one chunk's psi is 2048 * 12 * 528 floats = 50 MiB). On CPU, 256 to 4096 ran
# within noise of each other at 8k tokens; memory grows with the chunk.
CHUNK_TOKENS = 2048


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


def _pairs(r):
  """Index maps of psi: its entries (a, c), a <= c, and, for each (a, c) of the
  full r x r product, the position of its pair in psi."""
  ia, ic = np.triu_indices(r)
  pos = np.zeros((r, r), np.int32)
  pos[ia, ic] = pos[ic, ia] = np.arange(ia.size)
  return ia, ic, pos.reshape(-1)


@jax.custom_vjp
def symmetric_features(f):
  """psi(f) [..., r(r+1)/2] with psi(f) . psi(g) = (f . g)^2 = phi(f) . phi(g).

  phi = f (x) f is symmetric, so its r^2 entries hold r(r+1)/2 distinct
  products: psi = (f_a f_c for a <= c), the off-diagonal ones scaled by sqrt 2.
  The prefix states then hold r(r+1)/2 x H numbers instead of r^2 x H, which
  halves the state reads and updates (the bulk of the work) exactly, up to
  float rounding. Built by a gather with constant indices (on CPU 3x faster
  than concatenating r slices); the custom VJP avoids a scatter-add.
  """
  ia, ic, _ = _pairs(f.shape[-1])
  coef = np.where(ia == ic, 1.0, np.sqrt(2.0)).astype(f.dtype)
  return jnp.take(f, ia, axis=-1) * jnp.take(f, ic, axis=-1) * coef


def _symmetric_features_fwd(f):
  return symmetric_features(f), f


def _symmetric_features_bwd(f, dpsi):
  # df_a = sum_c D_ac f_c with D_ac = sqrt2 dpsi_(a,c) off the diagonal and
  # 2 dpsi_(a,a) on it: gather dpsi into the full symmetric r x r matrix.
  r = f.shape[-1]
  ia, ic, pos = _pairs(r)
  coef = np.where(ia == ic, 2.0, np.sqrt(2.0)).astype(f.dtype)
  d = jnp.take(dpsi * coef, pos, axis=-1).reshape(*f.shape, r)
  return (jnp.sum(d * f[..., None, :], axis=-1),)


symmetric_features.defvjp(_symmetric_features_fwd, _symmetric_features_bwd)


def _features_grad(x, state, f):
  """Cotangent of f for the product x @ state^T . psi(f), per token.

  The gradient of psi(f) . X with respect to f is D f, D the symmetric r x r
  matrix of X (sqrt2 X off the diagonal, 2 X on it). Expanding the small
  per-block state to that r^2 form first turns the whole thing into one matmul
  and a contiguous multiply-reduce; gathering the per-token psi cotangent into
  r x r instead ran 4x slower on CPU.

  Args: x [..., b, H + 1], state [..., H + 1, d], f [..., b, r].
  """
  r = f.shape[-1]
  ia, ic, pos = _pairs(r)
  coef = np.where(ia == ic, 2.0, np.sqrt(2.0)).astype(f.dtype)
  full = jnp.take(state * coef, pos, axis=-1)  # [..., H + 1, r^2]
  d = jnp.einsum("...ih,...hc->...ic", x, full).reshape(*f.shape, r)
  return jnp.sum(d * f[..., None, :], axis=-1)


def _with_ones(v):
  """[..., H] -> [..., H + 1]: the ones column turns the normaliser z into the
  last row of the state, so one matmul serves numerator and denominator."""
  return jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), v.dtype)], axis=-1)


def _chunk_states(state, psi_k, v1):
  """Per-block prefix states of one chunk, from the state at its start.

  The state is kept transposed and augmented, [S | z]^T [B, N, H + 1, d] with
  d = r(r+1)/2: then the update V1^T Psi_k and every other product below are
  matmuls whose operands need no d-sized transpose (on CPU, Phi_k^T V with the
  contraction on Phi_k's rows ran 2.5x slower than V^T Phi_k).

  Args: state [B, N, H + 1, d], psi_k [B, N, cb, b, d], v1 [B, N, cb, b, H + 1].
  Returns: (per-block states [B, N, cb, H + 1, d], the state after the chunk).
  """
  upd = jnp.einsum("gnsjh,gnsjc->gnshc", v1, psi_k)
  excl = _strict_lower(psi_k.shape[2], psi_k.dtype)
  s_t = state[:, :, None] + jnp.einsum("ts,gnshc->gnthc", excl, upd)
  return s_t, s_t[:, :, -1] + upd[:, :, -1]


def _chunk_forward(state, xs, *, degree, local_exact, dt):
  qc, kc, vc, fqc, fkc = (x.astype(dt) for x in xs)
  v1 = _with_ones(vc)
  local = local_weights(qc, kc, fqc, fkc, degree=degree, local_exact=local_exact)
  psi_q, psi_k = symmetric_features(fqc), symmetric_features(fkc)
  s_t, state = _chunk_states(state, psi_k, v1)
  acc = (jnp.einsum("gntij,gntjh->gntih", local, v1)
         + jnp.einsum("gntic,gnthc->gntih", psi_q, s_t))  # [num | den - 1]
  den = 1.0 + acc[..., -1]
  return state, (acc[..., :-1] / den[..., None], den)


def _chunk_backward(carry, xs, *, degree, local_exact, dt):
  # carry: R = sum over later blocks of Psi_q^T [dnum | dden], as [B, N, H+1, d].
  (qc, kc, vc, fqc, fkc), out, den, state, g = xs
  qc, kc, vc, fqc, fkc = (x.astype(dt) for x in (qc, kc, vc, fqc, fkc))
  v1 = _with_ones(vc)
  g = g.astype(dt)
  dnum = g / den[..., None]
  dden = -jnp.sum(g * out, axis=-1) / den
  dacc = jnp.concatenate([dnum, dden[..., None]], axis=-1)

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
  dv1 = jnp.einsum("gntij,gntih->gntjh", w, dacc)
  dw = jnp.einsum("gntih,gntjh->gntij", dacc, v1)
  ds = jnp.where(mask, dw * (p * s ** (p - 1)), 0.0)

  # Prefix reads and updates.
  psi_q, psi_k = symmetric_features(fqc), symmetric_features(fkc)
  s_t, _ = _chunk_states(state, psi_k, v1)
  ds_t = jnp.einsum("gntih,gntic->gnthc", dacc, psi_q)
  later = _strict_lower(ds_t.shape[2], dt)  # later[s, t] = 1 where s > t
  r_t = carry[:, :, None] + jnp.einsum("st,gnshc->gnthc", later, ds_t)
  dv1 = dv1 + jnp.einsum("gntjc,gnthc->gntjh", psi_k, r_t)
  dfq = _features_grad(dacc, s_t, fqc)
  dfk = _features_grad(v1, r_t, fkc)
  if local_exact:
    dq = jnp.einsum("gntij,gntjh->gntih", ds, kc)
    dk = jnp.einsum("gntij,gntih->gntjh", ds, qc)
  else:
    dq, dk = jnp.zeros_like(qc), jnp.zeros_like(kc)
    dfq = dfq + jnp.einsum("gntij,gntjr->gntir", ds, fkc)
    dfk = dfk + jnp.einsum("gntij,gntir->gntjr", ds, fqc)
  return r_t[:, :, 0] + ds_t[:, :, 0], (dq, dk, dv1[..., :-1], dfq, dfk)


def _init_state(x, r, h, dt):
  b_, n = x.shape[1], x.shape[2]
  return jnp.zeros((b_, n, h + 1, r * (r + 1) // 2), dt)


def _scan_forward(xs, degree, local_exact, save_states):
  qc, _, vc, fqc, _ = xs
  dt = compute_dtype(qc)
  body = functools.partial(_chunk_forward, degree=degree, local_exact=local_exact, dt=dt)

  def step(state, chunk):
    new_state, (out, den) = body(state, chunk)
    return new_state, ((out, den, state) if save_states else out)

  init = _init_state(qc, fqc.shape[-1], vc.shape[-1], dt)
  return jax.lax.scan(step, init, xs)[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _causal_chunks(xs, degree, local_exact):
  """xs: 5 arrays [num_chunks, B, N, cb, b, D]. Returns O (compute dtype)."""
  return _scan_forward(xs, degree, local_exact, save_states=False)


def _causal_chunks_fwd(xs, degree, local_exact):
  out, den, states = _scan_forward(xs, degree, local_exact, save_states=True)
  return out, (xs, out, den, states)


def _causal_chunks_bwd(degree, local_exact, residuals, g):
  xs, out, den, states = residuals
  qc, _, vc, fqc, _ = xs
  dt = compute_dtype(qc)
  body = functools.partial(_chunk_backward, degree=degree, local_exact=local_exact, dt=dt)
  init = _init_state(qc, fqc.shape[-1], vc.shape[-1], dt)
  _, grads = jax.lax.scan(body, init, (xs, out, den, states, g), reverse=True)
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
    phi_k = symmetric_features(fk)
    state = jnp.einsum("btnc,btnh->bnch", phi_k, v)
    norm = jnp.sum(phi_k, axis=1)
    phi_q = symmetric_features(fq)
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
