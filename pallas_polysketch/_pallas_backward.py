"""Backward Pallas TPU kernels of PolySketch attention (DESIGN §1.4).

No per-block state is saved by the forward; both kernels recompute what they
need, as FlashAttention recomputes P. With g = dO (in XLA beforehand):

  dnum = g / den,   dden = -(g . O) / den           per query row
  G^T  = [dnum^T; dden^T; 0]    (H + 16, b)         tokens on lanes
  V^T  = [v^T; 1; 0]            (H + 16, b)         as in the forward

Kernel 1 (`_dq_kernel`) walks blocks forward, rebuilding the state
[S, z] (P, H + 16) in float32 VMEM from the initial state;
dPhi_q^T = S dnum^T + z dden^T = (S g^T - z (g . O)^T) / den (one matmul
with dO itself and a rank-1 term on the VPU), then df_q its cotangent through
phi, scaled by 1 / den per token (the cotangent is linear per token).
Both kernels form phi and its cotangent from whole-vreg float32 pieces
(`phi_rot_t`, `phi_rot_vjp`: P = len(rot_pairs(r, False)) rows, 528 for
r = 32), whatever the features' dtype.

Kernel 2 (`_dkv_kernel`) walks blocks in reverse carrying
[R, rho] = d(returned state) + sum_{t' > t} Phi_q,t'^T [dnum_t', dden_t']
(P, H + 16): dPhi_k^T = [R, rho] V^T (NN), dV += Phi_k R. The returned
state's cotangent joins the carry where the forward took the state, per row
(a scalar-prefetch block index, as in the forward's): before the last block
for the final state, before block c - 1 for the state at the start of block
c (chunked prefill; c = 0: straight to the initial state's cotangent). It also
computes the diagonal block's dQ, dK and dV (df_q, df_k when the block is
sketched) from one pass over its scores: forming them in both kernels cost the
dq kernel a third of its cycles. After the first block the carry is the
initial state's cotangent.

Layout: q, k, v, dO and the dq, dk, dv outputs come in the forward's layout
(`_pallas_forward.tokens_on_lanes`: (H, b) tiles for H = 64, (b, H) for
H = 128), views of the TPU compiler's default [B, T, N, H] layout; the
kernels transpose the tiles they need on rows in VMEM. Features and the row
scalars (1 / den, dden, the power of two the dq kernel's overflow guard
takes: `_row_terms`) come tokens on lanes, from XLA; the dkv kernel forms
dnum = dO / den itself (an XLA float32 dnum was a copy of dO in T-minor at
H = 128, and a float32 array to write and read everywhere).

Both grids run over kv heads; the G query heads of a group are handled inside
the kernel, so the state is rebuilt once per kv head and dK, dV, df_k are
summed over the group in VMEM (no race, no repeated K or V in HBM).

Precision. [S, z] G^T and [R, rho] V^T cancel: S^T dnum + z dden =
(S^T g - z (g . O)) / den is small where O is close to what the state predicts.
So those products keep their float32 operands (dnum, dden, the state and its
cotangent) to about 2^-17: at HIGHEST in f32 kernels, as bf16 hi + lo pairs
in bf16 kernels (`split_dot`: two bf16 MXU passes for S g^T (g = dO is exact
in bf16; z dden^T and the 1 / den scale in float32 on the VPU), two for
[R, rho] V^T (V is exact in bf16) and for Phi_q^T G (phi_q rounded to bf16
once: measured harmless, bench/bf16_gradients.py)), never rounded to one
bf16. Where H fills whole MXU passes (`ResolvedTiles.normaliser_apart`: H =
128 on 128-wide MXUs) the normaliser's 16 rows would take a pass of their
own in every split term, so rho 1^T, z's update and rho's are float32
broadcasts and lane sums on the VPU there. The local dL = (g v^T) / den + dden is formed from
the bf16 cotangent g itself (exact bf16 products, f32 accumulation) rather
than from a rounded dnum.

Non-causal attention is `state_sum` then `apply_state` (see `_pallas`); their
backward passes reuse the same kernels without a local block or an update.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_polysketch import _compat
from pallas_polysketch._partitioning import batch_partitioned
from pallas_polysketch._pallas_common import (
    NN_DIMS, NT_DIMS, TN_DIMS, augment_g_t, augment_v_t, causal_mask, full_state, group_view,
    kernel_view, nbytes, outer_sum, pallas_call, phi_rot_t, phi_rot_vjp, phi_t, phi_t_vjp,
    precision_for, public_view, rot_pairs, split_dot, split_operand, sub_block, sym_state)
from pallas_polysketch._pallas_forward import blocks_per_step, tokens_on_lanes
from pallas_polysketch.polynomial import reciprocal_denominator
from pallas_polysketch.tpu_config import NORMALISER_ROWS, ResolvedTiles


def _local_grad_scores(s, dl, *, degree, local_exact):
  """ds = dL * dw/ds for w = s^p (exact) or w = s^2 (sketched)."""
  if local_exact:
    return dl * (degree * jax.lax.integer_pow(s, degree - 1))
  return dl * (2.0 * s)


def _dq_kernel(*refs, causal, has_initial, split, stack=False, apart=False, merged=True,
               tokens_on_lanes=False, block=None, sub_blocks=1):
  """Forward walk: df_q of the sketched prefix (the diagonal block's gradients
  are the dkv kernel's). v and dO come tokens on rows (b, H) or, with
  `tokens_on_lanes`, as (H, b) tiles (the forward's layouts; non-causal: on
  lanes). Causal: a grid step walks `sub_blocks` blocks of `block` tokens in
  order."""
  refs = list(refs)
  if not causal:
    state_ref, fq_t_ref, g_ref, scal_t_ref, dfq_t_ref = refs
    _dq_block(None, fq_t_ref, None, g_ref, scal_t_ref, dfq_t_ref, state_ref,
              causal=False, split=split, stack=stack, apart=apart, merged=merged,
              tokens_on_lanes=True)
    return
  v_ref, fq_t_ref, fk_t_ref, g_ref, scal_t_ref = refs[:5]
  refs = refs[5:]
  init_ref = refs.pop(0) if has_initial else None
  dfq_t_ref, state_ref = refs

  @pl.when(pl.program_id(2) == 0)
  def _():
    if has_initial:
      state_ref[...] = init_ref[...]
    else:
      state_ref[...] = jnp.zeros_like(state_ref)

  kv_axis, q_axis = (1, 2) if tokens_on_lanes else (0, 1)
  tokens = lambda ref, axis, s: sub_block(ref, axis, s, block, sub_blocks)
  for s in range(sub_blocks):
    _dq_block(tokens(v_ref, kv_axis, s), tokens(fq_t_ref, 2, s), tokens(fk_t_ref, 1, s),
              tokens(g_ref, q_axis, s), tokens(scal_t_ref, 2, s), tokens(dfq_t_ref, 2, s),
              state_ref, causal=True, split=split, stack=stack, apart=apart, merged=merged,
              tokens_on_lanes=tokens_on_lanes)


def _dq_block(v_ref, fq_t_ref, fk_t_ref, g_ref, scal_t_ref, dfq_t_ref, state_ref, *,
              causal, split, stack, apart, merged, tokens_on_lanes):
  """One block of the dq kernel: reads the state, then adds the block to it."""
  group = fq_t_ref.shape[0] if causal else 1
  state_all = state_ref[...]
  head_dim = state_all.shape[1] - NORMALISER_ROWS
  # dPhi_q^T = S dnum^T + z dden^T with the state of the blocks before this one,
  # and dnum = g / den: (S g^T - z (g . O)^T) / den, where g (dO) is exact in
  # the operand dtype, so only S is split (two bf16 passes; a split dnum took
  # three), and the z term is a float32 rank-1 product on the VPU.
  # Where den > 2^100, S g^T must stay below float32's max: a power of two
  # (`_row_terms`: one per block and kv head) scales dO's rows or, with
  # `apart` (H = 128: dO comes on rows and is transposed here, so scaling S
  # costs less), S; df_q is divided by the same factor.
  s = state_all[:, :head_dim]
  if apart:
    block_scale = jnp.min(scal_t_ref[(0,) if causal else ...][2:3], axis=1, keepdims=True)
    s = s * block_scale
  s_parts = split_operand(s, split)
  z = state_all[:, head_dim:head_dim + 1]
  for gi in range(group):
    sel = (gi,) if causal else (...,)
    g_t = g_ref[sel] if tokens_on_lanes else g_ref[sel].T     # (H, b)
    scal = scal_t_ref[sel]
    inv_den, dden, scale = scal[0:1], scal[1:2], scal[2:3]  # (1, b) rows
    if apart:
      scale = block_scale
    else:
      g_t = (g_t.astype(jnp.float32) * scale).astype(g_t.dtype)
    s_g = split_dot(s_parts, split_operand(g_t, split and "exact"), NN_DIMS, stack=stack)
    # The 1 / (den scale) of each token scales its column of dPhi_q, and the
    # phi cotangent is linear per token: scale the (r, b) df_q instead.
    dphi_q = s_g + z * (dden / inv_den * scale)       # dden / inv_den = -(g . O)
    dfq = (phi_rot_vjp(dphi_q, fq_t_ref[sel], query=True, merged=merged) if causal
           else phi_t_vjp(dphi_q, fq_t_ref[sel]))
    dfq_t_ref[sel] = (dfq * (inv_den / scale)).astype(dfq_t_ref.dtype)
  if not causal:
    return

  # Update: [S, z] += Phi_k^T [V, 1], in the forward's operand dtype.
  v_t = v_ref[...] if tokens_on_lanes else v_ref[...].T             # (H, b)
  mm_dtype = v_t.dtype
  phi_k = phi_rot_t(fk_t_ref[...], jnp.float32, mm_dtype, query=False, packed=False,
                    merged=merged)
  if apart:
    state_ref[:, :head_dim] += jax.lax.dot_general(phi_k, v_t, NT_DIMS,
                                                   preferred_element_type=jnp.float32,
                                                   precision=precision_for(mm_dtype))
    state_ref[:, head_dim:head_dim + 1] += jnp.sum(phi_k.astype(jnp.float32), axis=1,
                                                   keepdims=True)
  else:
    state_ref[...] += jax.lax.dot_general(phi_k, augment_v_t(v_t), NT_DIMS,
                                          preferred_element_type=jnp.float32,
                                          precision=precision_for(mm_dtype))


def _dkv_kernel(*refs, degree, causal, local_exact, local_tile, inject,
                emit_initial, split, stack=False, apart=False, merged=True,
                tokens_on_lanes=False, block=None, sub_blocks=1):
  """Reverse walk: dV, df_k (prefix); the diagonal block's dQ, dK, dV (df_q,
  df_k when sketched), its scores formed once for all three.

  Causal: q, k, v, g and the dQ, dK, dV outputs tokens on rows or, with
  `tokens_on_lanes`, as (D, b) tiles; non-causal: v^T in, dV on rows out.
  Causal, a grid step walks `sub_blocks` blocks of `block` tokens, last first.
  inject: the returned state's cotangent (left in HBM) and, prefetched, the
  block c it was taken at per batch row; it joins the carry before block
  c - 1, copied in through a small VMEM buffer: a state-sized input block
  would take 2 x 2.25 MiB of VMEM at H = 128, r = 64, past v4's 16 MiB."""
  refs = list(refs)
  state_block_ref = refs.pop(0) if inject else None
  kw = dict(degree=degree, local_exact=local_exact, local_tile=local_tile, split=split,
            stack=stack, apart=apart, merged=merged, tokens_on_lanes=tokens_on_lanes)
  if not causal:
    carry_ref, v_t_ref, fk_t_ref, dv_ref, dfk_t_ref = refs
    _dkv_block(None, None, v_t_ref, None, fk_t_ref, None, None, None, dv_ref,
               dfk_t_ref, None, carry_ref, causal=False, prepare=lambda: None, **kw)
    return
  (q_ref, k_ref, v_ref, fq_t_ref, fk_t_ref, g_ref, scal_t_ref) = refs[:7]
  refs = refs[7:]
  d_state_ref = refs.pop(0) if inject else None
  local_out_ref, dv_ref, dfk_t_ref, dq_local_ref = refs[:4]
  refs = refs[4:]
  d_initial_ref = refs.pop(0) if emit_initial else None
  carry_ref, *buf = refs
  d_state_buf, copy_sem = buf if inject else (None, None)

  def prepare(s):
    """The carry's set-up before block s of the step reads it (after the
    block's v is loaded: that order schedules best on v5e)."""
    if s == sub_blocks - 1:
      @pl.when(pl.program_id(2) == 0)
      def _():
        carry_ref[...] = jnp.zeros_like(carry_ref)

    if inject:
      # The state at the start of block c depends on blocks before c only.
      block_now = (pl.num_programs(2) - 1 - pl.program_id(2)) * sub_blocks + s
      bi, ki = pl.program_id(0), pl.program_id(1)

      @pl.when(block_now == state_block_ref[bi] - 1)
      def _():
        pairs, chunk = carry_ref.shape[0], d_state_buf.shape[0]
        for start in range(0, pairs, chunk):
          size = min(chunk, pairs - start)
          # A DMA on a scratch semaphore, not pltpu.sync_copy: jax 0.12
          # lowers that one's run_scoped only where the default device is a TPU.
          copy = _compat.pltpu.make_async_copy(d_state_ref.at[bi, ki, pl.ds(start, size)],
                                               d_state_buf.at[pl.ds(0, size)], copy_sem)
          copy.start()
          copy.wait()
          carry_ref[pl.ds(start, size), :] += d_state_buf[pl.ds(0, size), :]

  # The token axis of a kv head's (D, b) | (b, D) tile and of a group's.
  kv_axis, q_axis = (1, 2) if tokens_on_lanes else (0, 1)
  tokens = lambda ref, axis, s: sub_block(ref, axis, s, block, sub_blocks)
  for s in reversed(range(sub_blocks)):
    _dkv_block(tokens(q_ref, q_axis, s), tokens(k_ref, kv_axis, s),
               tokens(v_ref, kv_axis, s), tokens(fq_t_ref, 2, s), tokens(fk_t_ref, 1, s),
               tokens(g_ref, q_axis, s), tokens(scal_t_ref, 2, s),
               tokens(local_out_ref, kv_axis, s), tokens(dv_ref, kv_axis, s),
               tokens(dfk_t_ref, 1, s), tokens(dq_local_ref, q_axis, s), carry_ref,
               causal=True, prepare=functools.partial(prepare, s), **kw)

  if emit_initial:
    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
      d_initial_ref[...] = carry_ref[...]


def _dkv_block(q_ref, k_ref, v_ref, fq_t_ref, fk_t_ref, g_ref, scal_t_ref,
               local_out_ref, dv_ref, dfk_t_ref, dq_local_ref, carry_ref, *, causal, degree,
               local_exact, local_tile, split, stack, apart, merged, tokens_on_lanes,
               prepare):
  """One block of the dkv kernel (v_ref is v^T when not causal): reads the
  carry of the blocks after it (`prepare()` sets it up), then adds the block
  to it."""
  on_lanes = tokens_on_lanes or not causal
  v_side = v_ref[...]                                       # (H, b) on lanes, else (b, H)
  v_t = v_side if on_lanes else v_side.T
  prepare()
  head_dim = v_t.shape[0]
  mm_dtype = v_t.dtype
  mm = lambda a, b, dims, dtype=mm_dtype: jax.lax.dot_general(
      a, b, dims, preferred_element_type=jnp.float32, precision=precision_for(dtype))

  # Prefix, with [R, rho] of the blocks after this one:
  # dPhi_k^T = [R, rho] [V^T; 1] (f32: it cancels), dV = Phi_k R.
  carry = carry_ref[...]
  # rho 1^T on the VPU where H fills whole 128-row passes: on every MXU here
  # (v6e's stacked split terms pad each part to 128 rows too).
  if head_dim % 128 == 0:
    dphi_k = split_dot(split_operand(carry[:, :head_dim], split),
                       split_operand(v_t, split and "exact"), NN_DIMS, stack=stack)
    dphi_k = dphi_k + carry[:, head_dim:head_dim + 1]
  else:
    dphi_k = split_dot(split_operand(carry, split),
                       split_operand(augment_v_t(v_t), split and "exact"), NN_DIMS, stack=stack)
  if causal:     # [R, rho] on the float32 `rot_pairs`, as the dq kernel's state
    dfk_t = phi_rot_vjp(dphi_k, fk_t_ref[...], query=False, merged=merged)
    phi_k = phi_rot_t(fk_t_ref[...], jnp.float32, mm_dtype, query=False, packed=False,
                      merged=merged)
  else:
    dfk_t = phi_t_vjp(dphi_k, fk_t_ref[...])
    phi_k = phi_t(fk_t_ref[...]).astype(mm_dtype)
  r_v = carry[:, :head_dim].astype(mm_dtype)
  if not causal:
    dv_ref[...] = mm(phi_k, r_v, TN_DIMS).astype(dv_ref.dtype)        # (b, H)
    dfk_t_ref[...] = dfk_t.astype(dfk_t_ref.dtype)
    return
  dv = mm(r_v, phi_k, TN_DIMS) if on_lanes else mm(phi_k, r_v, TN_DIMS)

  # Local block, keys on the scores' rows: L^T = w(k q^T), dL^T = v g^T / den
  # + dden, ds^T = dL^T * dw/ds; dK = ds^T Q, dV += L^T dnum (summed over the
  # group's query heads) and dQ = (ds^T)^T K. Tokens on lanes ((D, b) tiles,
  # H = 64) every product takes and gives them so, transposing nothing.
  group = q_ref.shape[0]
  # dnum = dO / den in float32 (as `apply_state_backward` forms it for the
  # non-causal kernels), in dO's layout: (H, b) on lanes, else (b, H) with
  # 1 / den as a column (the row scalars transposed once, (8, b) -> (b, 8)).
  if on_lanes:
    axis, scores = 1, TN_DIMS
    dk_of = lambda ds, q: mm(q, ds, NT_DIMS, q.dtype)               # (D, lt)
    dq_of = lambda ds, k: mm(k, ds, NN_DIMS, k.dtype)
    dv_of = lambda w, dnum: mm(dnum, w, NT_DIMS)
    side = lambda x, f: x if local_exact else f
    dnums = [g_ref[gi].astype(jnp.float32) * scal_t_ref[gi, 0:1, :] for gi in range(group)]
  else:
    axis, scores = 0, NT_DIMS
    dk_of = lambda ds, q: mm(ds, q, NN_DIMS, q.dtype)               # (lt, D)
    dq_of = lambda ds, k: mm(ds, k, TN_DIMS, k.dtype)
    dv_of = lambda w, dnum: mm(w, dnum, NN_DIMS)
    side = lambda x, f: x if local_exact else f.T
    pad = jnp.zeros((8 - scal_t_ref.shape[1], g_ref.shape[1]), jnp.float32)
    scal_cols = [jnp.concatenate([scal_t_ref[gi], pad]).T for gi in range(group)]
    dnums = [g_ref[gi].astype(jnp.float32) * scal_cols[gi][:, 0:1] for gi in range(group)]
  # The local dV takes dnum in the operand dtype (as rounding it in XLA would).
  dnum_sides = [dnum.astype(mm_dtype) for dnum in dnums]
  k_side = side(k_ref[...], fk_t_ref[...])
  q_sides = [side(q_ref[gi], fq_t_ref[gi]) for gi in range(group)]
  g_sides = [g_ref[gi] for gi in range(group)]
  tile = lambda x, i: jax.lax.slice_in_dim(x, i * local_tile, (i + 1) * local_tile, axis=axis)
  num_tiles = k_side.shape[axis] // local_tile
  dv_tiles, dk_tiles = [], []
  dq_tiles = [[None] * num_tiles for _ in range(group)]
  add = lambda acc, x: x if acc is None else acc + x
  for j in range(num_tiles):
    dk_acc, dv_acc = None, tile(dv, j)
    for gi in range(group):
      for i in range(j, num_tiles):
        qs = pl.ds(i * local_tile, local_tile)
        k_j, q_i = tile(k_side, j), tile(q_sides[gi], i)
        s_t = mm(k_j, q_i, scores, k_j.dtype)                          # (lt_k, lt_q)
        w_t = jax.lax.integer_pow(s_t, degree) if local_exact else s_t * s_t
        vg = mm(tile(v_side, j), tile(g_sides[gi], i), scores)
        dl_t = vg * scal_t_ref[gi, 0:1, qs] + scal_t_ref[gi, 1:2, qs]
        ds_t = _local_grad_scores(s_t, dl_t, degree=degree, local_exact=local_exact)
        if i == j:
          upper = causal_mask(local_tile, lower=False)
          ds_t = jnp.where(upper, ds_t, 0.0)
          w_t = jnp.where(upper, w_t, 0.0)
        ds_t = ds_t.astype(q_i.dtype)       # q and k (or f_q and f_k) share a dtype
        dk_acc = add(dk_acc, dk_of(ds_t, q_i))
        dq_tiles[gi][i] = add(dq_tiles[gi][i], dq_of(ds_t, k_j))
        dv_acc += dv_of(w_t.astype(mm_dtype), tile(dnum_sides[gi], i))
    dk_tiles.append(dk_acc)
    dv_tiles.append(dv_acc)
  local_out_ref[...] = jnp.concatenate(dk_tiles, axis=axis).astype(local_out_ref.dtype)
  dv_ref[...] = jnp.concatenate(dv_tiles, axis=axis).astype(dv_ref.dtype)
  for gi in range(group):
    dq_local_ref[gi] = jnp.concatenate(dq_tiles[gi], axis=axis).astype(dq_local_ref.dtype)
  dfk_t_ref[...] = dfk_t.astype(dfk_t_ref.dtype)

  # Update: [R, rho] += Phi_q^T [dnum, dden] over the group, in f32 (with
  # `apart`: R on the MXU, rho a float32 lane sum on the VPU).
  for gi in range(group):
    # phi_q rounded to bf16 once costs nothing measurable here (the cotangent
    # G is what cancels): two passes, not three.
    phi_q = phi_rot_t(fq_t_ref[gi], jnp.float32, jnp.float32, query=True, packed=False,
                      merged=merged)
    phi_q = split_operand(phi_q, split and "exact")
    if apart:
      carry_ref[:, :head_dim] += split_dot(
          phi_q, split_operand(dnums[gi], split), NT_DIMS if on_lanes else NN_DIMS)
      carry_ref[:, head_dim:head_dim + 1] += jnp.sum(
          phi_q[0].astype(jnp.float32) * scal_t_ref[gi, 1:2, :], axis=1, keepdims=True)
    else:
      if on_lanes:
        g_aug, dims = augment_g_t(dnums[gi], scal_t_ref[gi, 1:2, :]), NT_DIMS
      else:        # [dnum, dden, 0] (b, H + 16): H = 128 fills whole lane tiles
        g_aug = jnp.concatenate([dnums[gi], scal_cols[gi][:, 1:2],
                                 jnp.zeros((dnums[gi].shape[0], NORMALISER_ROWS - 1),
                                           jnp.float32)], axis=1)
        dims = NN_DIMS
      carry_ref[...] += split_dot(phi_q, split_operand(g_aug, split), dims)


def backward_flops(batch, heads, seq, head_dim, sketch_dim, block_size, *,
                   causal, local_tile=None, kv_heads=None) -> tuple[int, int]:
  """Flops of (kernel 1, kernel 2) for CostEstimate and the roofline; local_tile:
  kernel 2's diagonal-block tile."""
  kv_heads = kv_heads or heads
  # The causal kernels form phi on the float32 `rot_pairs` only.
  r2 = len(rot_pairs(sketch_dim, False)) if causal else sketch_dim * sketch_dim
  rows = head_dim + NORMALISER_ROWS
  nb = seq // block_size
  phi = 2 * r2 * block_size
  # Per query head: the state (or carry) product and the phi vjp (the dq
  # kernel's product contracts over H; 1/den and z dden^T on the VPU).
  k1_q = phi + 2 * r2 * head_dim * block_size + 3 * r2 * block_size + 4 * r2 * block_size
  k2_kv = phi + 2 * r2 * rows * block_size + 2 * r2 * head_dim * block_size + 4 * r2 * block_size
  k1_kv = k2_q = 0
  if causal:
    lt = local_tile or block_size
    n = block_size // lt
    tiles = n * (n + 1) // 2
    k1_kv = phi + 2 * r2 * rows * block_size                       # state update
    # The carry update, and the diagonal block (kernel 2's local tile):
    # s, v g^T, dK, dV and dQ.
    k2_q = phi + 2 * r2 * rows * block_size + tiles * 5 * (2 * lt * lt * head_dim)
  return (batch * nb * (heads * k1_q + kv_heads * k1_kv),
          batch * nb * (heads * k2_q + kv_heads * k2_kv))


# The dq kernel multiplies its state by dO itself and divides by den after;
# where a den of the block and kv head is past 2^DQ_SCALE_EXPONENT it first
# scales dO (or S) by an exact power of two (`_row_terms`), so S g^T stays as
# far from float32's max as S dnum^T was.
DQ_SCALE_EXPONENT = 100


def _row_terms(o, den, do, block_size, num_kv_heads):
  """Per-row (1/den, dden, s) [B, T, N, 3] from o, do [B, T, N, H] and den
  [B, N, 1, T] (T a multiple of block_size; dnum = do / den is do times the
  first, formed where it is used). s is the smallest over the row's block and
  the query heads of its kv head of 2^-k, k = max(0, e - DQ_SCALE_EXPONENT)
  for den = m 2^e: the power of two the dq kernel scales S dO^T by. One per
  block and group: a token with a small den meets the same S as the largest
  (per token, S dO^T was inf there)."""
  b_, t, n = do.shape[:3]
  kv = num_kv_heads
  den_btn = jnp.transpose(den[:, :, 0, :], (0, 2, 1))            # [B, T, N]
  do32 = do.astype(jnp.float32)
  inv_den = reciprocal_denominator(den_btn)
  dden = -jnp.sum(do32 * o.astype(jnp.float32), axis=-1) * inv_den
  _, exponent = jnp.frexp(den_btn)
  blocks = (b_, t // block_size, block_size, kv, n // kv)
  exponent = jnp.max(exponent.reshape(blocks), axis=(2, 4), keepdims=True)
  exponent = jnp.broadcast_to(exponent, blocks).reshape(b_, t, n)
  scale = jnp.ldexp(jnp.ones_like(den_btn), -jnp.maximum(exponent - DQ_SCALE_EXPONENT, 0))
  return jnp.stack([inv_den, dden, scale], axis=-1)              # [B, T, N, 3]


def _splits(dtype):
  """bf16 kernels split their float32 cancelling operands into bf16 hi + lo;
  f32 kernels multiply them at HIGHEST (`split_dot`)."""
  return jnp.dtype(dtype) == jnp.bfloat16


# Rows of the returned state's cotangent copied into VMEM at a time.
INJECT_CHUNK = 128


@batch_partitioned()
def causal_backward(q, k, v, q_features, k_features, o, den, do, *, degree, block_size,
                    local_exact, tiles: ResolvedTiles, interpret=False,
                    initial_state=None, d_final_state=None, state_block=None):
  """Gradients of the causal forward for cotangents do (and the returned state's).

  Args:
    q, do, o [B, T, N, H]; k, v [B, T, K, H]; q_features [B, T, N, r],
    k_features [B, T, K, r]; den [B, N, 1, T] float32 from the forward;
    initial_state, d_final_state: None or [B, K, r^2, H + 16] float32 ([S, z]);
    d_final_state is the cotangent of the state the forward returned: the
    final one, or with state_block (int32 [B], as `causal_forward` takes it)
    the state at the start of block state_block[b].
  Returns:
    dq, dk, dv, dq_features, dk_features in the input shapes and dtypes, and the
    initial state's cotangent [B, K, r^2, H + 16] (None without initial_state).
  """
  b_, t, n, h = q.shape
  kv = k.shape[2]
  group = n // kv
  r = q_features.shape[-1]
  nb = t // block_size
  mm_dtype = q.dtype
  rows = h + NORMALISER_ROWS
  f32 = jnp.float32
  sds = jax.ShapeDtypeStruct

  scal = _row_terms(o, den, do, block_size, kv)
  # q, k, v, dO and dq, dk, dv in the forward's layout (`tokens_on_lanes`):
  # views of what the TPU compiler stores by default, no XLA copies.
  on_lanes = tokens_on_lanes(h)
  cols_g = functools.partial(kernel_view, on_lanes=True, num_kv_heads=kv)   # [B, K, G, D, T]
  k_cols = functools.partial(kernel_view, on_lanes=True)                    # [B, K, D, T]
  q_view = functools.partial(kernel_view, on_lanes=on_lanes, num_kv_heads=kv)
  kv_view = functools.partial(kernel_view, on_lanes=on_lanes)
  q_v, k_v, v_v = q_view(q), kv_view(k), kv_view(v)
  g_v = q_view(do.astype(mm_dtype))
  fq_t, fk_t = cols_g(q_features), k_cols(k_features)
  scal_t = cols_g(scal)

  # A grid step walks several blocks (`TileConfig.dq_blocks_per_step`,
  # `dkv_blocks_per_step`): the dq kernel dq_sub of them, the dkv kernel dkv_sub.
  dq_sub = blocks_per_step(nb, tiles.dq_blocks_per_step)
  dkv_sub = blocks_per_step(nb, tiles.dkv_blocks_per_step)

  def spec(shape, grouped, rev):
    """Block (G?, shape) of the step walked at ti (the dq kernel's; reversed,
    the dkv kernel's at steps - 1 - ti); shape is (b, D) (tokens on rows) or
    (D, b) given as ("t", D) / (D, "t")."""
    lead = (None, None) + ((group,) if grouped else ())
    tok_axis = shape.index("t")
    sub = dkv_sub if rev else dq_sub
    steps = nb // sub
    shape = tuple(block_size * sub if d == "t" else d for d in shape)
    def index(bi, ni, ti, *_):       # *_: the dkv kernel's prefetched state_block
      blk = steps - 1 - ti if rev else ti
      idx = [0, 0]
      idx[tok_axis] = blk
      return (bi, ni) + ((0,) if grouped else ()) + tuple(idx)
    return pl.BlockSpec(lead + tuple(shape), index)

  # The kernels keep [S, z] and [R, rho] on the pairs of phi's float32 pieces
  # (`rot_pairs(r, False)`, whatever the features' dtype: the backward forms
  # phi in float32); states and their cotangents cross the boundary on all
  # r^2 pairs.
  pairs = rot_pairs(r, False, tiles.merged_rotations)
  n_sym = len(pairs)
  sym_shape = sds((b_, kv, n_sym, rows), f32)
  if initial_state is not None:
    initial_state = sym_state(initial_state, axis=-2, pairs=pairs)
  inject = d_final_state is not None
  if inject:    # the cotangent of the returned state through full_state
    d_final_state, = jax.linear_transpose(lambda x: full_state(x, r, axis=-2, pairs=pairs),
                                          sym_shape)(d_final_state)
    # The forward emits the state after the last block for any block >= nb.
    state_block = jnp.minimum(
        jnp.full((b_,), nb, jnp.int32) if state_block is None
        else state_block.astype(jnp.int32), nb)
  whole = pl.BlockSpec((None, None, n_sym, rows), lambda bi, ni, ti, *_: (bi, ni, 0, 0))
  params = lambda limit: _compat.TPUCompilerParams(
      dimension_semantics=("parallel", "parallel", "arbitrary"), vmem_limit_bytes=limit)
  dkv_tile = tiles.dkv_local_tile or tiles.local_tile
  flops1, flops2 = backward_flops(b_, n, t, h, r, block_size, causal=True,
                                  local_tile=dkv_tile, kv_heads=kv)
  b, lw = "t", (h if local_exact else r)
  local_dtype = q.dtype if local_exact else f32
  has_initial = initial_state is not None
  kw = dict(degree=degree, causal=True, local_exact=local_exact, split=_splits(mm_dtype),
            stack=tiles.stack_split_products, apart=tiles.normaliser_apart,
            merged=tiles.merged_rotations)

  hd = (h, b) if on_lanes else (b, h)           # a q, k, v, dO, dq, dk, dv block
  lwd = (lw, b) if on_lanes else (b, lw)        # the local output's block

  def shape_of(width, grouped):
    lead = (b_, kv) + ((group,) if grouped else ())
    return lead + ((width, t) if on_lanes else (t, width))

  kw["tokens_on_lanes"] = on_lanes
  ins1 = (v_v, fq_t, fk_t, g_v, scal_t)
  ins1 += (initial_state,) if has_initial else ()
  out1 = sds((b_, kv, group, r, t), f32)
  dfq_t = pallas_call(
      functools.partial(_dq_kernel, causal=True, has_initial=has_initial,
                        split=_splits(mm_dtype), stack=tiles.stack_split_products,
                        apart=tiles.normaliser_apart, merged=tiles.merged_rotations,
                        tokens_on_lanes=on_lanes, block=block_size, sub_blocks=dq_sub),
      grid=(b_, kv, nb // dq_sub),
      in_specs=[spec(hd, False, False), spec((r, b), True, False), spec((r, b), False, False),
                spec(hd, True, False), spec((3, b), True, False)]
               + ([whole] if has_initial else []),
      out_specs=spec((r, b), True, False),
      out_shape=out1,
      scratch_shapes=[_compat.pltpu.VMEM((n_sym, rows), f32)],
      compiler_params=params(tiles.dq_vmem_limit_bytes or tiles.backward_vmem_limit_bytes),
      interpret=interpret,
      cost_estimate=_compat.CostEstimate(flops=flops1, transcendentals=0,
                                         bytes_accessed=nbytes(*ins1, out1)),
      name="polysketch_bwd_dq",
  )(*ins1)

  emit_initial = has_initial
  ins2 = (q_v, k_v, v_v, fq_t, fk_t, g_v, scal_t)
  ins2 += (d_final_state,) if inject else ()
  outs2 = [sds(shape_of(lw, False), local_dtype), sds(shape_of(h, False), k.dtype),
           sds((b_, kv, r, t), f32), sds(shape_of(lw, True), local_dtype)] + (
               [sds((b_, kv, n_sym, rows), f32)] if emit_initial else [])
  outs = pallas_call(
      functools.partial(_dkv_kernel, inject=inject, emit_initial=emit_initial,
                        local_tile=dkv_tile, block=block_size, sub_blocks=dkv_sub, **kw),
      grid_spec=_compat.pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1 if inject else 0,
          grid=(b_, kv, nb // dkv_sub),
          in_specs=[spec(hd, True, True), spec(hd, False, True), spec(hd, False, True),
                    spec((r, b), True, True), spec((r, b), False, True), spec(hd, True, True),
                    spec((3, b), True, True)]
                   + ([pl.BlockSpec(memory_space=pl.ANY)] if inject else []),
          out_specs=[spec(lwd, False, True), spec(hd, False, True),
                     spec((r, b), False, True), spec(lwd, True, True)]
                    + ([whole] if emit_initial else []),
          scratch_shapes=[_compat.pltpu.VMEM((n_sym, rows), f32)]
                         + ([_compat.pltpu.VMEM((min(n_sym, INJECT_CHUNK), rows), f32),
                             _compat.pltpu.SemaphoreType.DMA(())] if inject else [])),
      out_shape=outs2,
      compiler_params=params(tiles.dkv_vmem_limit_bytes or tiles.backward_vmem_limit_bytes),
      interpret=interpret,
      cost_estimate=_compat.CostEstimate(flops=flops2, transcendentals=0,
                                         bytes_accessed=nbytes(*ins2, *outs2)),
      name="polysketch_bwd_dkv",
  )(*(((state_block,) if inject else ()) + ins2))
  dlocal_k, dv_r, dfk_t, dlocal_q = outs[:4]
  d_initial = None
  if emit_initial:     # the initial state entered through sym_state
    d_initial = outs[4]
    if inject:         # a state returned at block 0 is the initial state
      d_initial += jnp.where((state_block == 0)[:, None, None, None], d_final_state, 0.0)
    d_initial, = jax.linear_transpose(lambda x: sym_state(x, axis=-2, pairs=pairs),
                                      sds((b_, kv, r * r, rows), f32))(d_initial)

  q_back = kv_back = functools.partial(public_view, on_lanes=on_lanes)
  dv = kv_back(dv_r)
  dfq, dfk = (public_view(x, on_lanes=True) for x in (dfq_t, dfk_t))
  if local_exact:
    dq, dk = q_back(dlocal_q), kv_back(dlocal_k)
  else:
    dq, dk = jnp.zeros_like(q), jnp.zeros_like(k)
    dfq, dfk = dfq + q_back(dlocal_q), dfk + kv_back(dlocal_k)
  grads = (dq, dk, dv, dfq.astype(q_features.dtype), dfk.astype(k_features.dtype))
  return grads, d_initial


@batch_partitioned()
def state_sum_backward(v, k_features, d_state, *, block_size, tiles, interpret=False):
  """VJP of `state_sum`: d_state [B, K, r^2, H + 16] -> (dv, dk_features)."""
  b_, t, kv, h = v.shape
  r = k_features.shape[-1]
  nb = t // block_size
  v_t = kernel_view(v, on_lanes=True)
  fk_t = kernel_view(k_features, on_lanes=True)
  col = lambda d: pl.BlockSpec((None, None, d, block_size), lambda bi, ni, ti: (bi, ni, 0, ti))
  row = pl.BlockSpec((None, None, block_size, h), lambda bi, ni, ti: (bi, ni, ti, 0))
  _, flops2 = backward_flops(b_, kv, t, h, r, block_size, causal=False)
  dv_r, dfk_t = pallas_call(
      functools.partial(_dkv_kernel, degree=2, causal=False, local_exact=False,
                        local_tile=tiles.local_tile, inject=False, emit_initial=False,
                        split=_splits(v.dtype)),
      grid=(b_, kv, nb),
      in_specs=[pl.BlockSpec((None, None, r * r, h + NORMALISER_ROWS),
                             lambda bi, ni, ti: (bi, ni, 0, 0)), col(h), col(r)],
      out_specs=[row, col(r)],
      out_shape=[jax.ShapeDtypeStruct((b_, kv, t, h), v.dtype),
                 jax.ShapeDtypeStruct((b_, kv, r, t), jnp.float32)],
      compiler_params=_compat.TPUCompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel"),
          vmem_limit_bytes=tiles.backward_vmem_limit_bytes),
      interpret=interpret,
      cost_estimate=_compat.CostEstimate(flops=flops2, transcendentals=0,
                                         bytes_accessed=2 * nbytes(v, k_features, d_state)),
      name="polysketch_bwd_state_sum",
  )(d_state, v_t, fk_t)
  return (public_view(dv_r, on_lanes=False),
          public_view(dfk_t, on_lanes=True).astype(k_features.dtype))


@batch_partitioned()
def apply_state_backward(q_features, state, o, den, do, *, block_size, tiles,
                         interpret=False):
  """VJP of `apply_state`: -> (dq_features [B, T, N, r], d_state [B, K, r^2, H + 16]).

  state: [B, K, r^2, H + 16] float32 ([S, z]); o, do [B, T, N, H]; den [B, N, 1, T]."""
  b_, t, n, r = q_features.shape
  kv = state.shape[1]
  group = n // kv
  h = o.shape[-1]
  nb = t // block_size
  scal = _row_terms(o, den, do, block_size, kv)
  dnum32 = do.astype(jnp.float32) * scal[..., 0:1]                 # dO / den
  dnum_t = kernel_view(dnum32, on_lanes=True)                      # [B, N, H, T]
  g_t = kernel_view(do, on_lanes=True)                             # [B, N, H, T]
  scal_t = kernel_view(scal, on_lanes=True)                        # [B, N, 3, T]
  dden_row = scal_t[:, :, 1:2, :]
  fq_t = kernel_view(q_features, on_lanes=True)                    # [B, N, r, T]
  col = lambda d: pl.BlockSpec((None, None, d, block_size), lambda bi, ni, ti: (bi, ni, 0, ti))
  flops1, _ = backward_flops(b_, n, t, h, r, block_size, causal=False)
  dfq_t = pallas_call(
      functools.partial(_dq_kernel, causal=False, has_initial=False, split=_splits(do.dtype)),
      grid=(b_, n, nb),
      in_specs=[pl.BlockSpec((None, None, r * r, h + NORMALISER_ROWS),
                             lambda bi, ni, ti: (bi, jax.lax.div(ni, group), 0, 0)),
                col(r), col(h), col(3)],
      out_specs=col(r),
      out_shape=jax.ShapeDtypeStruct((b_, n, r, t), jnp.float32),
      compiler_params=_compat.TPUCompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel"),
          vmem_limit_bytes=tiles.backward_vmem_limit_bytes),
      interpret=interpret,
      cost_estimate=_compat.CostEstimate(flops=flops1, transcendentals=0,
                                         bytes_accessed=nbytes(state, q_features, g_t, scal_t)),
      name="polysketch_bwd_apply_state",
  )(state, fq_t, g_t, scal_t)
  d_state = outer_sum(group_view(dnum_t, kv), group_view(fq_t, kv), group_view(dden_row, kv),
                      block_size=block_size, vmem_limit_bytes=tiles.backward_vmem_limit_bytes,
                      interpret=interpret)
  dfq = public_view(dfq_t, on_lanes=True).astype(q_features.dtype)
  return dfq, d_state
