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
- the state is stored transposed, [S | z]^T [B, K, H + 1, d], so no product
  needs a d-sized transpose.

Layout inside the scan: batch and kv heads share one axis, M = B * K; a
query-side block holds its G group members' rows one after the other,
[M, cb, G * b, D] (query head n = kv head n // G, group member n % G), a
key-side block [M, cb, b, D]. The state is per kv head, [M, H + 1, d]; its
update is done once per kv head and read by the G * b rows, and products over
rows (dV, dK, the state's cotangent) sum the group. No axis has size 1 when
B = 1 or G = 1: XLA:CPU ran multiply-reduces over [1, ...] shapes 5x slower.

Non-causal attention is a state sum and a read (`state_sum_xla`,
`apply_state_xla`), each a scan over token chunks with a custom VJP.

The backward is a `jax.custom_vjp` following DESIGN §1.4: residuals are the
inputs, O, the denominator and the state at each chunk start (d (H + 1) floats
per chunk and head, never per block). One reverse scan over chunks recomputes
each chunk's block states from its start state and carries
R = sum over later blocks of Psi_q^T [dnum | dden] for the gradients of V and
the key features. The scan starts from a given state and returns the final one
(prefill, context parallelism); their cotangents flow through the same carries.

Every product runs at `Precision.HIGHEST` in float32: on GPU a default f32
matmul is TF32 and on TPU bf16 passes, and (q.k)^p multiplies the relative
error of q.k by p.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_polysketch.polynomial import (
    compute_dtype, divide_by_denominator, reciprocal_denominator)

# Tokens per chunk of the causal scan: large enough for large batched matmuls,
# small enough that a chunk's wide features stay small (at r = 32 and 12 heads
# one chunk's psi is 512 * 12 * 528 floats = 13 MiB). Side by side on CPU at
# 8k tokens, fwd + bwd (bench/BENCH_NOTES.md): 512 tokens (two blocks of 256)
# 1.1 s, 1024 1.5 s, 2048 1.6 s, 256 (one block a chunk) 3.4 s.
CHUNK_TOKENS = 512

HIGHEST = jax.lax.Precision.HIGHEST


def einsum(spec, *operands):
  """jnp.einsum at full float32 precision on every backend."""
  return jnp.einsum(spec, *operands, precision=HIGHEST)


def _to_chunks(x, num_chunks, chunk_blocks, block_size, group):
  """[B, T, N, D] -> [num_chunks, B * K, cb, G * b, D] (query side, group=G;
  row g * b + i of a block is token i of group member g) or
  [num_chunks, B * K, cb, b, D] (key side, group=None).

  Batch and kv heads share one axis and the group members join the block's
  rows, so no array in the scan has a size-1 axis when B = 1 or G = 1: on
  XLA:CPU (jax 0.10.2) a multiply-reduce over [1, ...] shapes ran 5x slower
  than the same over the shape without the 1."""
  b_, _, n, d = x.shape
  g = 1 if group is None else group
  x = x.reshape(b_, num_chunks, chunk_blocks, block_size, n // g, g, d)
  x = jnp.transpose(x, (1, 0, 4, 2, 5, 3, 6))     # [nc, B, K, cb, G, b, D]
  return x.reshape(num_chunks, b_ * (n // g), chunk_blocks, g * block_size, d)


def _from_chunks(x, batch, group):
  """[num_chunks, B * K, cb, G * b, D] -> [B, T, K * G, D]."""
  nc, m, cb, gb, d = x.shape
  k, blk = m // batch, gb // group
  x = x.reshape(nc, batch, k, cb, group, blk, d)
  return jnp.transpose(x, (1, 0, 3, 5, 2, 4, 6)).reshape(batch, nc * cb * blk, k * group, d)


def _exclusive_cumsum(x, axis, reverse=False):
  """sum over s < t (reverse: s > t) of x[s] along axis. A cumulative sum, not a
  product with a 0/1 matrix: 0 * inf would spread an overflow in one block to
  the blocks before it."""
  n = x.shape[axis]
  if n == 1:
    # A constant zero here let XLA's CPU compiler (jax 0.10.2) fold the chunk's
    # backward into garbage key-feature gradients (a one-block chunk, batch > 1,
    # under jit); the barrier keeps it an ordinary value.
    return jax.lax.optimization_barrier(jnp.zeros_like(x))
  zero = jnp.zeros_like(jax.lax.slice_in_dim(x, 0, 1, axis=axis))
  c = jax.lax.cumsum(x, axis=axis, reverse=reverse)
  if reverse:
    return jnp.concatenate([jax.lax.slice_in_dim(c, 1, n, axis=axis), zero], axis=axis)
  return jnp.concatenate([zero, jax.lax.slice_in_dim(c, 0, n - 1, axis=axis)], axis=axis)


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
  float rounding. Built row by row, f_a * f[a:], concatenated: inside the
  chunk scan XLA:CPU (jax 0.10.2) lowered the constant-index gather to a
  d-major gather plus a transposing copy, 1.3x slower over the whole backward.
  The custom VJP avoids a scatter-add.
  """
  r = f.shape[-1]
  return jnp.concatenate(
      [f[..., a:a + 1] * (f[..., a:] * _row_coef(r, a, f.dtype)) for a in range(r)], axis=-1)


def _row_coef(r, a, dtype):
  """Row a of psi's scale: 1 on the diagonal (a, a), sqrt 2 for (a, c > a)."""
  return np.where(np.arange(a, r) == a, 1.0, np.sqrt(2.0)).astype(dtype)


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


def state_to_psi(s, z):
  """Public state (S [B, K, r^2, H], z [B, K, r^2]) -> [S | z]^T over psi,
  [B, K, H + 1, r(r+1)/2]. phi . S reads only the part of S symmetric in the
  pair (a, c), (S[a, c] + S[c, a]) / 2, so that is what psi keeps: exact for
  every S (the states the op makes are symmetric), as the kernels' `sym_state`."""
  r = int(round(s.shape[2] ** 0.5))
  ia, ic, _ = _pairs(r)
  coef = np.where(ia == ic, 0.5, np.sqrt(0.5)).astype(s.dtype)
  full = jnp.concatenate([s, z[..., None]], axis=-1)       # [B, K, r^2, H + 1]
  psi = (jnp.take(full, ia * r + ic, axis=2) + jnp.take(full, ic * r + ia, axis=2)) * coef[:, None]
  return jnp.swapaxes(psi, -1, -2)


def state_from_psi(state, sketch_dim):
  """Inverse of `state_to_psi`: -> (S [B, K, r^2, H], z [B, K, r^2])."""
  ia, ic, pos = _pairs(sketch_dim)
  coef = np.where(ia == ic, 1.0, np.sqrt(0.5)).astype(state.dtype)
  full = jnp.take(jnp.swapaxes(state, -1, -2) * coef[:, None], pos, axis=2)
  return full[..., :-1], full[..., -1]


def _features_grad(spec, x, state, f):
  """Cotangent of f for the product x @ state^T . psi(f), per token.

  The gradient of psi(f) . X with respect to f is D f, D the symmetric r x r
  matrix of X (sqrt2 X off the diagonal, 2 X on it). Expanding the small
  per-block state to that r^2 form first turns the whole thing into one matmul
  and a contiguous multiply-reduce; gathering the per-token psi cotangent into
  r x r instead ran 4x slower on CPU.

  Args: spec, the einsum of x [..., b, H + 1] and the expanded state
    [..., H + 1, r^2]; f [..., b, r].
  """
  return _expanded_features_grad(spec, x, _expand_state(state, f.shape[-1]), f)


def _expand_state(state, r):
  """[..., d] over psi -> [..., r^2]: the symmetric r x r matrix D of each row
  (sqrt2 X off the diagonal, 2 X on it), flattened."""
  ia, ic, pos = _pairs(r)
  coef = np.where(ia == ic, 2.0, np.sqrt(2.0)).astype(state.dtype)
  return jnp.take(state * coef, pos, axis=-1)


def _expanded_features_grad(spec, x, full, f):
  """`_features_grad` with the state already expanded by `_expand_state`."""
  r = f.shape[-1]
  d = einsum(spec, x, full).reshape(*f.shape, r)
  return jnp.sum(d * f[..., None, :], axis=-1)


def _with_ones(v):
  """[..., H] -> [..., H + 1]: the ones column turns the normaliser z into the
  last row of the state, so one matmul serves numerator and denominator."""
  return jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), v.dtype)], axis=-1)


def _chunk_states(state, psi_k, v1):
  """Per-block prefix states of one chunk, from the state at its start.

  The state is kept transposed and augmented, [S | z]^T [M, H + 1, d] with
  d = r(r+1)/2 and M = B * K: then the update V1^T Psi_k and every other
  product below are matmuls whose operands need no d-sized transpose (on CPU,
  Phi_k^T V with the contraction on Phi_k's rows ran 2.5x slower than V^T Phi_k).

  Args: state [M, H + 1, d], psi_k [M, cb, b, d], v1 [M, cb, b, H + 1].
  Returns: (per-block states [M, cb, H + 1, d], the state after the chunk).
  """
  upd = einsum("msjh,msjc->mshc", v1, psi_k)
  s_t = state[:, None] + _exclusive_cumsum(upd, axis=1)
  return s_t, s_t[:, -1] + upd[:, -1]


def _local_mask(group, block_size):
  """[G * b, b]: row g * b + i sees keys j <= i of its block."""
  return jnp.tile(jnp.tril(jnp.ones((block_size, block_size), bool)), (group, 1))


def _local_scores(qc, kc, fqc, fkc, local_exact, degree):
  """(s, p): scores [M, cb, G * b, b] of the diagonal blocks and their power."""
  if local_exact:
    return einsum("mtih,mtjh->mtij", qc, kc), degree
  return einsum("mtir,mtjr->mtij", fqc, fkc), 2


def _chunk_forward(state, xs, *, degree, local_exact, bias, dt):
  qc, kc, vc, fqc, fkc = (x.astype(dt) for x in xs)
  v1 = _with_ones(vc)
  s, p = _local_scores(qc, kc, fqc, fkc, local_exact, degree)
  mask = _local_mask(qc.shape[2] // kc.shape[2], kc.shape[2])
  local = jnp.where(mask, s ** p, 0.0)
  psi_q, psi_k = symmetric_features(fqc), symmetric_features(fkc)
  s_t, new_state = _chunk_states(state, psi_k, v1)
  acc = (einsum("mtij,mtjh->mtih", local, v1)
         + einsum("mtic,mthc->mtih", psi_q, s_t))  # [num | den - bias]
  den = bias + acc[..., -1]
  return new_state, (divide_by_denominator(acc[..., :-1], den[..., None]), den, s_t)


def _chunk_backward(carry, xs, *, degree, local_exact, dt):
  # carry: R = sum over later blocks of Psi_q^T [dnum | dden] (+ the final
  # state's cotangent), as [M, H+1, d].
  (qc, kc, vc, fqc, fkc), out, den, state, g = xs
  qc, kc, vc, fqc, fkc = (x.astype(dt) for x in (qc, kc, vc, fqc, fkc))
  v1 = _with_ones(vc)
  g = g.astype(dt)
  inv_den = reciprocal_denominator(den)
  dnum = g * inv_den[..., None]
  dden = -jnp.sum(g * out, axis=-1) * inv_den
  dacc = jnp.concatenate([dnum, dden[..., None]], axis=-1)

  # Local block: w = tril(s^p) with s = q k^T (or f_q f_k^T, p = 2). The
  # group's rows share the block's keys, so products over rows sum the group.
  s, p = _local_scores(qc, kc, fqc, fkc, local_exact, degree)
  mask = _local_mask(qc.shape[2] // kc.shape[2], kc.shape[2])
  w = jnp.where(mask, s ** p, 0.0)
  dv1 = einsum("mtij,mtih->mtjh", w, dacc)
  dw = einsum("mtih,mtjh->mtij", dacc, v1)
  ds = jnp.where(mask, dw * (p * s ** (p - 1)), 0.0)

  # Prefix reads and updates.
  psi_q, psi_k = symmetric_features(fqc), symmetric_features(fkc)
  s_t, _ = _chunk_states(state, psi_k, v1)
  ds_t = einsum("mtih,mtic->mthc", dacc, psi_q)
  r_t = carry[:, None] + _exclusive_cumsum(ds_t, axis=1, reverse=True)
  dv1 = dv1 + einsum("mtjc,mthc->mtjh", psi_k, r_t)
  dfq = _features_grad("mtih,mthc->mtic", dacc, s_t, fqc)
  dfk = _features_grad("mtih,mthc->mtic", v1, r_t, fkc)
  if local_exact:
    dq = einsum("mtij,mtjh->mtih", ds, kc)
    dk = einsum("mtij,mtih->mtjh", ds, qc)
  else:
    dq, dk = jnp.zeros_like(qc), jnp.zeros_like(kc)
    dfq = dfq + einsum("mtij,mtjr->mtir", ds, fkc)
    dfk = dfk + einsum("mtij,mtir->mtjr", ds, fqc)
  return r_t[:, 0] + ds_t[:, 0], (dq, dk, dv1[..., :-1], dfq, dfk)


def _scan_forward(xs, initial_state, degree, local_exact, bias, save_states,
                  state_block=None):
  """The forward scan, state [M, H + 1, d]. state_block: None, or int32 [M]:
  also return the state at the start of that block (counted over all chunks)."""
  dt = initial_state.dtype
  body = functools.partial(_chunk_forward, degree=degree, local_exact=local_exact,
                           bias=bias, dt=dt)
  chunk_blocks = xs[0].shape[2]

  def step(carry, chunk):
    state, emitted, first_block = carry
    new_state, (out, den, s_t) = body(state, chunk)
    if state_block is not None:
      # One-hot over the chunk's block starts (and the chunk's end, which is the
      # start of the next chunk's first block: counted there, or below).
      hit = (state_block[:, None] - first_block) == jnp.arange(chunk_blocks)
      emitted = emitted + einsum("mt,mthc->mhc", hit.astype(dt), s_t)
    carry = (new_state, emitted, first_block + chunk_blocks)
    return carry, ((out, den, state) if save_states else out)

  # Training carries no emitted state (None), only prefill does.
  emitted = None if state_block is None else jnp.zeros_like(initial_state)
  init = (initial_state, emitted, 0)
  (final, emitted, total_blocks), ys = jax.lax.scan(step, init, xs)
  if state_block is not None:
    at_end = (state_block >= total_blocks).astype(dt)[:, None, None]
    emitted = emitted + at_end * final
  return final, emitted, ys


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _causal_chunks(xs, initial_state, degree, local_exact, bias):
  """xs: q-side [nc, M, cb, G * b, D], k-side [nc, M, cb, b, D]; state [M, H + 1, d].

  Returns O (compute dtype, chunked like q) and the final state."""
  final, _, out = _scan_forward(xs, initial_state, degree, local_exact, bias, False)
  return out, final


def _causal_chunks_fwd(xs, initial_state, degree, local_exact, bias):
  final, _, (out, den, states) = _scan_forward(xs, initial_state, degree, local_exact,
                                               bias, True)
  return (out, final), (xs, out, den, states)


def _causal_chunks_bwd(degree, local_exact, bias, residuals, cotangents):
  del bias  # den already holds it
  xs, out, den, states = residuals
  g, d_final = cotangents
  dt = states.dtype
  body = functools.partial(_chunk_backward, degree=degree, local_exact=local_exact, dt=dt)
  d_initial, grads = jax.lax.scan(body, d_final.astype(dt), (xs, out, den, states, g),
                                  reverse=True)
  return tuple(d.astype(x.dtype) for d, x in zip(grads, xs)), d_initial


_causal_chunks.defvjp(_causal_chunks_fwd, _causal_chunks_bwd)


def _chunking(num_blocks, block_size, chunk_tokens):
  """(num_chunks, chunk_blocks) with chunks of about chunk_tokens, balanced."""
  target = max(2, chunk_tokens // block_size)  # one-block chunks ran 3x slower
  num_chunks = -(-num_blocks // target)
  chunk_blocks = -(-num_blocks // num_chunks)
  return num_chunks, chunk_blocks


def zero_state(q, k, sketch_dim):
  """A zero xla-path state for these inputs: [B, K, H + 1, r(r+1)/2]."""
  dt = compute_dtype(q)
  return jnp.zeros((k.shape[0], k.shape[2], k.shape[3] + 1,
                    sketch_dim * (sketch_dim + 1) // 2), dt)


def causal_xla(q, k, v, q_features, k_features, initial_state, *, degree, block_size,
               local_exact, bias, state_block=None):
  """Causal attention from a given state, T a multiple of block_size.

  Args:
    q [B, T, N, H], k, v [B, T, K, H], q_features [B, T, N, r],
    k_features [B, T, K, r]; initial_state [B, K, H + 1, d] (`state_to_psi`);
    state_block: None or int32 [B] (see returns).
  Returns:
    (o [B, T, N, H] in q's dtype, state): the final state, or with state_block
    the state at the start of block state_block[b] of each row (differentiable
    then by autodiff of the scan, not through the custom VJP).
  """
  out_dtype = q.dtype
  t = q.shape[1]
  group = q.shape[2] // k.shape[2]
  num_blocks = t // block_size
  num_chunks, chunk_blocks = _chunking(num_blocks, block_size, CHUNK_TOKENS)
  padded = num_chunks * chunk_blocks * block_size
  # Zero blocks at the end are exact: causal queries never see later keys, and
  # the padded queries are sliced off; zero keys leave the state unchanged.
  chunk = lambda x, g: _to_chunks(jnp.pad(x, ((0, 0), (0, padded - t), (0, 0), (0, 0))),
                                  num_chunks, chunk_blocks, block_size, g)
  xs = (chunk(q, group), chunk(k, None), chunk(v, None), chunk(q_features, group),
        chunk(k_features, None))
  b_, kv = initial_state.shape[:2]
  state = initial_state.reshape(b_ * kv, *initial_state.shape[2:])
  if state_block is None:
    out, state = _causal_chunks(xs, state, degree, local_exact, bias)
  else:
    _, state, out = _scan_forward(xs, state, degree, local_exact, bias, False,
                                  state_block=jnp.repeat(state_block, kv))
  out = _from_chunks(out, b_, group)[:, :t].astype(out_dtype)
  return out, state.reshape(initial_state.shape)


def _token_chunks(x, group, chunk):
  """[B, T, N, D] -> [nc, B * K, G * chunk, D] (zero-padded), for the
  non-causal path: zero features add nothing to a state sum, and padded
  queries are sliced off."""
  t = x.shape[1]
  nc = -(-t // chunk)
  x = jnp.pad(x, ((0, 0), (0, nc * chunk - t), (0, 0), (0, 0)))
  x = _to_chunks(x, nc, 1, chunk, group)
  return x.reshape(x.shape[0], x.shape[1], *x.shape[3:])


def _non_causal_chunk(t):
  """Tokens per chunk of the non-causal scans: CHUNK_TOKENS, or all of T."""
  return min(t, CHUNK_TOKENS)


@jax.custom_vjp
def _state_sum_chunks(vc, fkc):
  """vc [nc, M, c, H], fkc [nc, M, c, r] -> sum of psi(f_k)^T [v, 1], [M, H + 1, d]."""
  def step(state, xs):
    v, fk = xs
    return state + einsum("mjh,mjc->mhc", _with_ones(v), symmetric_features(fk)), None
  r = fkc.shape[-1]
  init = jnp.zeros((vc.shape[1], vc.shape[-1] + 1, r * (r + 1) // 2), vc.dtype)
  return jax.lax.scan(step, init, (vc, fkc))[0]


def _state_sum_fwd(vc, fkc):
  return _state_sum_chunks(vc, fkc), (vc, fkc)


def _state_sum_bwd(residuals, d_state):
  vc, fkc = residuals
  full = _expand_state(d_state, fkc.shape[-1])

  def step(_, xs):
    v, fk = xs
    v1 = _with_ones(v)
    dv = einsum("mjc,mhc->mjh", symmetric_features(fk), d_state[:, :-1])
    return None, (dv, _expanded_features_grad("mjh,mhc->mjc", v1, full, fk))
  return jax.lax.scan(step, None, (vc, fkc))[1]


_state_sum_chunks.defvjp(_state_sum_fwd, _state_sum_bwd)


@jax.custom_vjp
def _apply_state_chunks(fqc, state):
  """fqc [nc, M, G * c, r], state [M, H + 1, d] -> psi(f_q) state^T, [nc, M, G * c, H + 1]."""
  def step(_, fq):
    return None, einsum("mic,mhc->mih", symmetric_features(fq), state)
  return jax.lax.scan(step, None, fqc)[1]


def _apply_state_fwd(fqc, state):
  return _apply_state_chunks(fqc, state), (fqc, state)


def _apply_state_bwd(residuals, dacc):
  fqc, state = residuals
  full = _expand_state(state, fqc.shape[-1])

  def step(d_state, xs):
    fq, da = xs
    d_state = d_state + einsum("mih,mic->mhc", da, symmetric_features(fq))
    return d_state, _expanded_features_grad("mih,mhc->mic", da, full, fq)
  d_state, dfq = jax.lax.scan(step, jnp.zeros_like(state), (fqc, dacc))
  return dfq, d_state


_apply_state_chunks.defvjp(_apply_state_fwd, _apply_state_bwd)


def state_sum_xla(k, v, k_features):
  """sum over all tokens of psi(f_k)^T [v, 1]: [B, K, H + 1, d] (compute dtype).

  A scan over token chunks (memory linear in T with a small constant; psi of
  one chunk at a time), with a custom VJP: dv = psi(f_k) dS^T and df_k by the
  expanded state, as in the causal backward."""
  dt = compute_dtype(k)
  b_, t, kv, _ = k.shape
  chunk = _non_causal_chunk(t)
  vc, fkc = (_token_chunks(x.astype(dt), None, chunk) for x in (v, k_features))
  state = _state_sum_chunks(vc, fkc)
  return state.reshape(b_, kv, *state.shape[1:])


def apply_state_xla(q, q_features, state, *, bias):
  """Non-causal read of a whole-sequence state: q [B, T, N, H] (for its shape
  and dtype), q_features [B, T, N, r], state [B, K, H + 1, d] -> [B, T, N, H]."""
  dt = state.dtype
  b_, t, n, h = q.shape
  kv = state.shape[1]
  chunk = _non_causal_chunk(t)
  fqc = _token_chunks(q_features.astype(dt), n // kv, chunk)
  acc = _apply_state_chunks(fqc, state.reshape(b_ * kv, *state.shape[2:]))
  acc = _from_chunks(acc[:, :, None], b_, n // kv)[:, :t]
  den = bias + acc[..., -1]
  return divide_by_denominator(acc[..., :-1], den[..., None]).astype(q.dtype)
