"""Backward Pallas TPU kernels of PolySketch attention (DESIGN §1.4).

No per-block state is saved by the forward; both kernels recompute what they
need, as FlashAttention recomputes P. With g = dO (computed in XLA beforehand):

  dnum = g / den,   dden = -(g . O) / den           per query row
  G^T  = [dnum^T; dden^T; 0]    (H + 16, b)         tokens on lanes
  V^T  = [v^T; 1; 0]            (H + 16, b)         as in the forward

Kernel 1 (`_dq_kernel`) walks blocks forward, rebuilding the state
[S, z] (r^2, H + 16) in float32 VMEM; dPhi_q^T = [S, z] G^T is one NN matmul,
then df_q = (M + M^T) f_q. It also produces the local dQ (or df_q when the
diagonal block is sketched).

Kernel 2 (`_dkv_kernel`) walks blocks in reverse carrying
[R, rho] = sum_{t' > t} Phi_q,t'^T [dnum_t', dden_t'] (r^2, H + 16):
dPhi_k^T = [R, rho] V^T (NN), dV += Phi_k R, then the local dK, dV (df_k).

Non-causal attention uses the same kernels with the full-sequence [S, z] or
[R, rho] passed in (one reduction pass each, `_outer_sum_kernel`) and no
local block or update.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_polysketch import _compat
from pallas_polysketch._pallas_common import (
    NT_DIMS, TN_DIMS, augment_g_t, augment_v_t, causal_mask, nbytes, outer_sum,
    phi_t, phi_t_vjp)
from pallas_polysketch.tpu_config import NORMALISER_ROWS, ResolvedTiles

def _local_grad_scores(s, dl, *, degree, local_exact):
  """ds = dL * dw/ds for w = s^p (exact) or w = s^2 (sketched)."""
  if local_exact:
    return dl * (degree * jax.lax.integer_pow(s, degree - 1))
  return dl * (2.0 * s)


def _dq_kernel(*refs, degree, causal, local_exact, local_tile):
  """Forward walk: dQ (local) and df_q (prefix; local too when sketched)."""
  refs = list(refs)
  if causal:
    (q_ref, k_ref, v_ref, v_t_ref, fq_t_ref, fk_t_ref, fq_ref, fk_ref,
     dnum_ref, dnum_t_ref, dden_row_ref, dden_col_ref) = refs[:12]
    local_out_ref, dfq_t_ref, state_ref = refs[12:]
  else:
    state_ref, fq_t_ref, dnum_t_ref, dden_row_ref, dfq_t_ref = refs
  mm_dtype = dnum_t_ref.dtype

  if causal:
    @pl.when(pl.program_id(2) == 0)
    def _():
      state_ref[...] = jnp.zeros_like(state_ref)

  # Prefix: dPhi_q^T = [S, z] G^T with the state of the blocks before this one.
  g_aug = augment_g_t(dnum_t_ref[...], dden_row_ref[...])
  dphi_q = jnp.dot(state_ref[...].astype(mm_dtype), g_aug,
                   preferred_element_type=jnp.float32)
  dfq_t = phi_t_vjp(dphi_q, fq_t_ref[...])
  dfq_t_ref[...] = dfq_t.astype(dfq_t_ref.dtype)
  if not causal:
    return

  # Local block: ds = (dnum V^T + dden 1^T) * dw/ds, dQ = ds K (or df_q = ds f_k).
  block = q_ref.shape[0]
  for i in range(block // local_tile):
    qs = pl.ds(i * local_tile, local_tile)
    width = q_ref.shape[1] if local_exact else fq_ref.shape[1]
    acc = jnp.zeros((local_tile, width), jnp.float32)
    for j in range(i + 1):
      ks = pl.ds(j * local_tile, local_tile)
      if local_exact:
        s = jax.lax.dot_general(q_ref[qs, :], k_ref[ks, :], NT_DIMS,
                                preferred_element_type=jnp.float32)
      else:
        s = jax.lax.dot_general(fq_ref[qs, :], fk_ref[ks, :], NT_DIMS,
                                preferred_element_type=jnp.float32)
      dl = jax.lax.dot_general(dnum_ref[qs, :], v_ref[ks, :], NT_DIMS,
                               preferred_element_type=jnp.float32)
      dl = dl + dden_col_ref[qs, :]
      ds = _local_grad_scores(s, dl, degree=degree, local_exact=local_exact)
      if i == j:
        ds = jnp.where(causal_mask(local_tile, lower=True), ds, 0.0)
      rhs = k_ref[ks, :] if local_exact else fk_ref[ks, :]
      acc += jnp.dot(ds.astype(rhs.dtype), rhs, preferred_element_type=jnp.float32)
    local_out_ref[qs, :] = acc.astype(local_out_ref.dtype)

  # Update: [S, z] += Phi_k^T [V, 1].
  phi_k = phi_t(fk_t_ref[...]).astype(mm_dtype)
  state_ref[...] += jax.lax.dot_general(phi_k, augment_v_t(v_t_ref[...]), NT_DIMS,
                                        preferred_element_type=jnp.float32)


def _dkv_kernel(*refs, degree, causal, local_exact, local_tile):
  """Reverse walk: dV, df_k (prefix); dK, dV (local; df_k when sketched)."""
  refs = list(refs)
  if causal:
    (q_ref, k_ref, v_ref, v_t_ref, fq_t_ref, fk_t_ref, fq_ref, fk_ref,
     dnum_ref, dnum_t_ref, dden_row_ref) = refs[:11]
    local_out_ref, dv_ref, dfk_t_ref, carry_ref = refs[11:]
  else:
    carry_ref, v_t_ref, fk_t_ref, dv_ref, dfk_t_ref = refs
  head_dim = v_t_ref.shape[0]
  mm_dtype = v_t_ref.dtype

  if causal:
    @pl.when(pl.program_id(2) == 0)
    def _():
      carry_ref[...] = jnp.zeros_like(carry_ref)

  # Prefix, with [R, rho] of the blocks after this one:
  # dPhi_k^T = [R, rho] [V^T; 1], dV = Phi_k R.
  carry = carry_ref[...].astype(mm_dtype)
  phi_k = phi_t(fk_t_ref[...]).astype(mm_dtype)
  dphi_k = jnp.dot(carry, augment_v_t(v_t_ref[...]), preferred_element_type=jnp.float32)
  dfk_t_ref[...] = phi_t_vjp(dphi_k, fk_t_ref[...]).astype(dfk_t_ref.dtype)
  dv = jax.lax.dot_general(phi_k, carry[:, :head_dim], TN_DIMS,
                           preferred_element_type=jnp.float32)
  if not causal:
    dv_ref[...] = dv.astype(dv_ref.dtype)
    return

  # Local block, transposed (keys on rows): L^T = w(k q^T),
  # dL^T = v dnum^T + 1 dden^T, ds^T = dL^T * dw/ds; dK = ds^T Q, dV += L^T dnum.
  block = k_ref.shape[0]
  h_or_r = k_ref.shape[1] if local_exact else fk_ref.shape[1]
  num_tiles = block // local_tile
  dv_tiles = []
  for j in range(num_tiles):
    ks = pl.ds(j * local_tile, local_tile)
    dk_acc = jnp.zeros((local_tile, h_or_r), jnp.float32)
    dv_acc = dv[j * local_tile:(j + 1) * local_tile, :]
    for i in range(j, num_tiles):
      qs = pl.ds(i * local_tile, local_tile)
      if local_exact:
        s_t = jax.lax.dot_general(k_ref[ks, :], q_ref[qs, :], NT_DIMS,
                                  preferred_element_type=jnp.float32)
        w_t = jax.lax.integer_pow(s_t, degree)
      else:
        s_t = jax.lax.dot_general(fk_ref[ks, :], fq_ref[qs, :], NT_DIMS,
                                  preferred_element_type=jnp.float32)
        w_t = s_t * s_t
      dl_t = jax.lax.dot_general(v_ref[ks, :], dnum_ref[qs, :], NT_DIMS,
                                 preferred_element_type=jnp.float32)
      dl_t = dl_t + dden_row_ref[:, qs]
      ds_t = _local_grad_scores(s_t, dl_t, degree=degree, local_exact=local_exact)
      if i == j:
        upper = causal_mask(local_tile, lower=False)
        ds_t = jnp.where(upper, ds_t, 0.0)
        w_t = jnp.where(upper, w_t, 0.0)
      rhs = q_ref[qs, :] if local_exact else fq_ref[qs, :]
      dk_acc += jnp.dot(ds_t.astype(rhs.dtype), rhs, preferred_element_type=jnp.float32)
      dv_acc += jnp.dot(w_t.astype(mm_dtype), dnum_ref[qs, :],
                        preferred_element_type=jnp.float32)
    local_out_ref[ks, :] = dk_acc.astype(local_out_ref.dtype)
    dv_tiles.append(dv_acc)
  dv_ref[...] = jnp.concatenate(dv_tiles, axis=0).astype(dv_ref.dtype)

  # Update: [R, rho] += Phi_q^T [dnum, dden].
  phi_q = phi_t(fq_t_ref[...]).astype(mm_dtype)
  g_aug = augment_g_t(dnum_t_ref[...], dden_row_ref[...])
  carry_ref[...] += jax.lax.dot_general(phi_q, g_aug, NT_DIMS,
                                        preferred_element_type=jnp.float32)


def backward_flops(batch, heads, seq, head_dim, sketch_dim, block_size, *,
                   causal, local_tile=None) -> tuple[int, int]:
  """Flops of (kernel 1, kernel 2) for CostEstimate and the roofline."""
  r2 = sketch_dim * sketch_dim
  rows = head_dim + NORMALISER_ROWS
  nb = seq // block_size
  phi = 2 * r2 * block_size
  k1 = phi + 2 * r2 * rows * block_size + 4 * r2 * block_size  # read + phi vjp
  k2 = phi + 2 * r2 * rows * block_size + 2 * r2 * head_dim * block_size + 4 * r2 * block_size
  if causal:
    lt = local_tile or block_size
    n = block_size // lt
    tiles = n * (n + 1) // 2
    k1 += phi + 2 * r2 * rows * block_size + tiles * 3 * (2 * lt * lt * head_dim)
    k2 += phi + 2 * r2 * rows * block_size + tiles * 4 * (2 * lt * lt * head_dim)
  return batch * heads * nb * k1, batch * heads * nb * k2


def polysketch_backward(q, k, v, q_features, k_features, o, den, do, *, degree,
                        block_size, causal, local_exact, tiles: ResolvedTiles,
                        interpret=False):
  """Gradients of the forward for cotangent do.

  Args:
    q, k, v, do, o: [B, T, N, H]; q_features, k_features: [B, T, N, r];
    den: [B, N, 1, T] float32 from the forward.
  Returns:
    dq, dk, dv, dq_features, dk_features in the input shapes and dtypes.
  """
  b_, t, n, h = q.shape
  r = q_features.shape[-1]
  nb = t // block_size
  mm_dtype = q.dtype
  rows = h + NORMALISER_ROWS

  # dnum = g / den, dden = -(g . O) / den, in XLA (fused with the transposes).
  den_btn = jnp.transpose(den[:, :, 0, :], (0, 2, 1))          # [B, T, N]
  do32 = do.astype(jnp.float32)
  dnum = (do32 / den_btn[..., None]).astype(mm_dtype)           # [B, T, N, H]
  dden = -jnp.sum(do32 * o.astype(jnp.float32), axis=-1) / den_btn  # [B, T, N]

  to_bnth = lambda x: jnp.transpose(x, (0, 2, 1, 3))  # [B, T, N, D] -> [B, N, T, D]
  to_bndt = lambda x: jnp.transpose(x, (0, 2, 3, 1))  # [B, T, N, D] -> [B, N, D, T]
  v_t, fq_t, fk_t, dnum_t = map(to_bndt, (v, q_features, k_features, dnum))
  dden_row = jnp.transpose(dden, (0, 2, 1))[:, :, None, :]     # [B, N, 1, T]
  params = _compat.TPUCompilerParams(
      dimension_semantics=("parallel", "parallel", "arbitrary"),
      vmem_limit_bytes=tiles.vmem_limit_bytes)
  col = lambda d, rev=False: pl.BlockSpec(
      (None, None, d, block_size),
      (lambda bi, ni, ti: (bi, ni, 0, nb - 1 - ti)) if rev else
      (lambda bi, ni, ti: (bi, ni, 0, ti)))
  row = lambda d, rev=False: pl.BlockSpec(
      (None, None, block_size, d),
      (lambda bi, ni, ti: (bi, ni, nb - 1 - ti, 0)) if rev else
      (lambda bi, ni, ti: (bi, ni, ti, 0)))
  whole = pl.BlockSpec((None, None, r * r, rows), lambda bi, ni, ti: (bi, ni, 0, 0))
  f32 = jnp.float32
  sds = jax.ShapeDtypeStruct
  flops1, flops2 = backward_flops(b_, n, t, h, r, block_size, causal=causal,
                                  local_tile=tiles.local_tile)

  if causal:
    q_r, k_r, v_r, fq_r, fk_r, dnum_r = map(to_bnth, (q, k, v, q_features, k_features, dnum))
    dden_col = jnp.transpose(dden, (0, 2, 1))[..., None]        # [B, N, T, 1]
    kw = dict(degree=degree, causal=True, local_exact=local_exact,
              local_tile=tiles.local_tile)
    ins1 = (q_r, k_r, v_r, v_t, fq_t, fk_t, fq_r, fk_r, dnum_r, dnum_t, dden_row, dden_col)
    # The local block feeds dQ (exact) or df_q (sketched): one output either way.
    local_width, local_dtype = (h, q.dtype) if local_exact else (r, f32)
    dlocal_q, dfq_t = pl.pallas_call(
        functools.partial(_dq_kernel, **kw),
        grid=(b_, n, nb),
        in_specs=[row(h), row(h), row(h), col(h), col(r), col(r), row(r), row(r),
                  row(h), col(h), col(1), row(1)],
        out_specs=[row(local_width), col(r)],
        out_shape=[sds((b_, n, t, local_width), local_dtype), sds((b_, n, r, t), f32)],
        scratch_shapes=[_compat.pltpu.VMEM((r * r, rows), f32)],
        compiler_params=params, interpret=interpret,
        cost_estimate=_compat.CostEstimate(flops=flops1, transcendentals=0,
                                           bytes_accessed=nbytes(*ins1) + nbytes(q, q_features)),
        name="polysketch_bwd_dq",
    )(*ins1)
    ins2 = (q_r, k_r, v_r, v_t, fq_t, fk_t, fq_r, fk_r, dnum_r, dnum_t, dden_row)
    dlocal_k, dv_r, dfk_t = pl.pallas_call(
        functools.partial(_dkv_kernel, **kw),
        grid=(b_, n, nb),
        in_specs=[row(h, True), row(h, True), row(h, True), col(h, True), col(r, True),
                  col(r, True), row(r, True), row(r, True), row(h, True), col(h, True),
                  col(1, True)],
        out_specs=[row(local_width, True), row(h, True), col(r, True)],
        out_shape=[sds((b_, n, t, local_width), local_dtype), sds((b_, n, t, h), q.dtype),
                   sds((b_, n, r, t), f32)],
        scratch_shapes=[_compat.pltpu.VMEM((r * r, rows), f32)],
        compiler_params=params, interpret=interpret,
        cost_estimate=_compat.CostEstimate(flops=flops2, transcendentals=0,
                                           bytes_accessed=nbytes(*ins2) + nbytes(k, v, k_features)),
        name="polysketch_bwd_dkv",
    )(*ins2)
    back = lambda x: jnp.transpose(x, (0, 2, 1, 3))  # [B, N, T, D] -> [B, T, N, D]
    dv = back(dv_r)
    dfq = jnp.transpose(dfq_t, (0, 3, 1, 2))
    dfk = jnp.transpose(dfk_t, (0, 3, 1, 2))
    if local_exact:
      dq, dk = back(dlocal_q), back(dlocal_k)
    else:
      dq, dk = jnp.zeros_like(q), jnp.zeros_like(k)
      dfq, dfk = dfq + back(dlocal_q), dfk + back(dlocal_k)
  else:
    sums = dict(block_size=block_size, vmem_limit_bytes=tiles.vmem_limit_bytes,
                interpret=interpret)
    state = outer_sum(v_t, fk_t, **sums)
    carry = outer_sum(dnum_t, fq_t, dden_row, **sums)
    parallel = _compat.TPUCompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel"),
        vmem_limit_bytes=tiles.vmem_limit_bytes)
    kw = dict(degree=degree, causal=False, local_exact=local_exact,
              local_tile=tiles.local_tile)
    dfq_t = pl.pallas_call(
        functools.partial(_dq_kernel, **kw),
        grid=(b_, n, nb),
        in_specs=[whole, col(r), col(h), col(1)],
        out_specs=col(r),
        out_shape=sds((b_, n, r, t), f32),
        compiler_params=parallel, interpret=interpret,
        cost_estimate=_compat.CostEstimate(
            flops=flops1, transcendentals=0,
            bytes_accessed=nbytes(state, q_features, dnum_t, dden_row, q_features)),
        name="polysketch_bwd_dq",
    )(state, fq_t, dnum_t, dden_row)
    dv_r, dfk_t = pl.pallas_call(
        functools.partial(_dkv_kernel, **kw),
        grid=(b_, n, nb),
        in_specs=[whole, col(h), col(r)],
        out_specs=[row(h), col(r)],
        out_shape=[sds((b_, n, t, h), q.dtype), sds((b_, n, r, t), f32)],
        compiler_params=parallel, interpret=interpret,
        cost_estimate=_compat.CostEstimate(
            flops=flops2, transcendentals=0,
            bytes_accessed=nbytes(carry, v, k_features, v, k_features)),
        name="polysketch_bwd_dkv",
    )(carry, v_t, fk_t)
    dq = jnp.zeros_like(q)
    dk = jnp.zeros_like(k)
    dv = jnp.transpose(dv_r, (0, 2, 1, 3))
    dfq = jnp.transpose(dfq_t, (0, 3, 1, 2))
    dfk = jnp.transpose(dfk_t, (0, 3, 1, 2))
  return (dq, dk, dv, dfq.astype(q_features.dtype), dfk.astype(k_features.dtype))
