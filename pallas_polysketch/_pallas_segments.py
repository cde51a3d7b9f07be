"""Pallas TPU kernels of the packed-segment walk (DESIGN §1.5; the algorithm and
its reference implementation are `_segments.py`).

Layout as the unsegmented forward kernel (`_pallas_forward.py`): q [B, K, G,
T, H], f_q^T [B, K, G, r, T], k [B, K, T, H], v^T, f_k^T [B, K, H|r, T]; the
outputs are the un-normalised numerator^T [B, K, G, H, T] and the sum of the
weights [B, K, G, 1, T], float32. Grid (B, K, T/b), blocks last and
"arbitrary": the segment-running state S(t-1) lives in a float32 VMEM scratch
(H + 16, r^2) = [S^T; z^T; 0].

Step t reads the keys of grid blocks t-1 and t. Block t comes through the
usual BlockSpecs; block t-1 through a second BlockSpec on the same arrays
whose index map is max(t-1, 0) (no copy), and at t = 0 from `previous`'s own
BlockSpecs (block -1: zeros, or the previous shard's last block). The two
cases run the same code on different refs, each under a `pl.when`.

Segment labels (starts s and segment-relative blocks rb, int32) enter in two
layouts, since the transposed weights W^T [key, query] need the query labels
along the lanes and the key labels along the sublanes: rows [B, 2, T] (s, rb
with tokens on the lanes) and columns [B, T, 2]. The start s_L of the last
token of block t-1 (which decides whether the state keeps running) is a
scalar-prefetch operand [B * T/b] in SMEM.

Per step and query head of the group: the window's b x 2b weights, exact
(q.k)^p where the relative blocks agree and local_exact, else sketched
(f_q.f_k)^2, selected and masked (same segment; j <= i, or j < i when strict)
with `jnp.where`; then [S^T; z^T] phi_q read for the queries whose segment
started before block t-1. Last, the state advances over block t-1:
S(t) = [s_L < (t-1)b] S(t-1) + V_aug^T phi_k over block t-1's keys with
s_j == s_L (masked by `jnp.where`, never a 0/1 product).

Gradients: `segment_walk` is a `jax.custom_vjp` whose backward is, for now, the
VJP of the xla walk `_segments.segment_walk_xla` on the same inputs (the rz
state converted to the xla path's psi state), so it recomputes the walk in XLA.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_polysketch import _compat, _segments, _xla
from pallas_polysketch._pallas_common import (
    NT_DIMS, TN_DIMS, augment_v_t, nbytes, phi_t, precision_for)
from pallas_polysketch._pallas_forward import to_kernel_layout
from pallas_polysketch.tpu_config import NORMALISER_ROWS, ResolvedTiles


def _window_weights_t(q, k, fq_t, fk_t, q_lab, k_lab, *, degree, local_exact, diagonal,
                      strict):
  """W^T [key, query] (b, b) float32 of one key block against the query block.

  q (b, H), k (b, H), fq_t, fk_t (r, b); q_lab (2, b) int32 rows (s, rb) of the
  queries, k_lab (b, 2) columns of the keys. diagonal: the keys are the query
  block itself (causality inside it); else every key precedes every query."""
  w_t = jax.lax.dot_general(fk_t, fq_t, TN_DIMS, preferred_element_type=jnp.float32,
                            precision=precision_for(fq_t.dtype))
  w_t = w_t * w_t
  if local_exact:
    s_t = jax.lax.dot_general(k, q, NT_DIMS, preferred_element_type=jnp.float32,
                              precision=precision_for(q.dtype))
    same_block = k_lab[:, 1:2] == q_lab[1:2, :]
    w_t = jnp.where(same_block, jax.lax.integer_pow(s_t, degree), w_t)
  allowed = k_lab[:, 0:1] == q_lab[0:1, :]
  if diagonal:
    row = jax.lax.broadcasted_iota(jnp.int32, w_t.shape, 0)   # key
    col = jax.lax.broadcasted_iota(jnp.int32, w_t.shape, 1)   # query
    allowed = allowed & ((row < col) if strict else (row <= col))
  return jnp.where(allowed, w_t, 0.0)


def _segment_forward_kernel(s_last_ref, q_ref, k_ref, v_t_ref, fq_t_ref, fk_t_ref,
                            lab_row_ref, lab_col_ref, kp_ref, vp_t_ref, fkp_t_ref,
                            labp_row_ref, labp_col_ref, k0_ref, v0_t_ref, fk0_t_ref,
                            lab0_row_ref, lab0_col_ref, init_ref, num_ref, wsum_ref,
                            state_ref, *, degree, local_exact, strict, bf16_phi):
  bi, t = pl.program_id(0), pl.program_id(2)
  mm_dtype = q_ref.dtype
  prec = precision_for(mm_dtype)
  group = q_ref.shape[0]
  head_dim, block = v_t_ref.shape

  @pl.when(t == 0)
  def _():
    state_ref[...] = init_ref[...]

  s_last = s_last_ref[bi * pl.num_programs(2) + t]   # start of block t-1's last token
  window_start = (t - 1) * block

  def step(kp_ref, vp_t_ref, fkp_t_ref, labp_row_ref, labp_col_ref):
    q_lab = lab_row_ref[...]
    k_lab, kp_lab = lab_col_ref[...], labp_col_ref[...]
    v_aug, vp_aug = augment_v_t(v_t_ref[...]), augment_v_t(vp_t_ref[...])
    state = state_ref[...]
    use = q_lab[0:1, :] < window_start      # queries whose segment began before block t-1
    for g in range(group):
      q, fq_t = q_ref[g], fq_t_ref[g]
      kw = dict(degree=degree, local_exact=local_exact, strict=strict)
      w_prev = _window_weights_t(q, kp_ref[...], fq_t, fkp_t_ref[...], q_lab, kp_lab,
                                 diagonal=False, **kw)
      w_cur = _window_weights_t(q, k_ref[...], fq_t, fk_t_ref[...], q_lab, k_lab,
                                diagonal=True, **kw)
      acc = jnp.dot(vp_aug, w_prev.astype(mm_dtype), preferred_element_type=jnp.float32,
                    precision=prec)
      acc += jnp.dot(v_aug, w_cur.astype(mm_dtype), preferred_element_type=jnp.float32,
                     precision=prec)
      phi_q = phi_t(fq_t, mm_dtype, narrow=bf16_phi)
      read = jnp.dot(state.astype(mm_dtype), phi_q, preferred_element_type=jnp.float32,
                     precision=prec)
      acc += jnp.where(use, read, 0.0)
      num_ref[g] = acc[:head_dim, :]
      wsum_ref[g] = acc[head_dim:head_dim + 1, :]

    # S(t) from S(t-1): keep it iff s_L < (t-1) b; add block t-1's keys of L's segment.
    in_last = labp_row_ref[0:1, :] == s_last
    phi_k = phi_t(fkp_t_ref[...], mm_dtype, narrow=bf16_phi)
    upd = jax.lax.dot_general(jnp.where(in_last, vp_aug, 0).astype(mm_dtype),
                              jnp.where(in_last, phi_k, 0).astype(mm_dtype), NT_DIMS,
                              preferred_element_type=jnp.float32, precision=prec)
    state_ref[...] = jnp.where(s_last < window_start, state, 0.0) + upd

  pl.when(t == 0)(lambda: step(k0_ref, v0_t_ref, fk0_t_ref, lab0_row_ref, lab0_col_ref))
  pl.when(t > 0)(lambda: step(kp_ref, vp_t_ref, fkp_t_ref, labp_row_ref, labp_col_ref))


def segment_forward_flops(batch, heads, seq, head_dim, sketch_dim, block_size, *,
                          local_exact, kv_heads=None) -> int:
  """MXU + VPU flops of the segment walk's forward kernel (its CostEstimate)."""
  kv_heads = kv_heads or heads
  r2, rows, b = sketch_dim * sketch_dim, head_dim + NORMALISER_ROWS, block_size
  scores = 2 * (2 * b * b * sketch_dim + (2 * b * b * head_dim if local_exact else 0))
  per_q_block = scores + 2 * (2 * rows * b * b) + 2 * r2 * b + 2 * rows * r2 * b
  per_kv_block = 2 * r2 * b + 2 * rows * r2 * b
  nb = seq // block_size
  return batch * nb * (heads * per_q_block + kv_heads * per_kv_block)


def _labels(starts, rel_block):
  """int32 [B, T] x 2 -> rows [B, 2, T] and columns [B, T, 2]."""
  rows = jnp.stack([starts, rel_block], axis=1).astype(jnp.int32)
  return rows, jnp.swapaxes(rows, 1, 2)


def segment_forward(q, k, v, q_features, k_features, starts, rel_block, state, previous, *,
                    degree, block_size, local_exact, strict, tiles: ResolvedTiles,
                    interpret=False):
  """Runs the segment walk's forward kernel.

  Args: as `_segments.segment_walk_xla`, with the state rz [B, K, r^2, H + 16]
    float32. Returns acc [B, T, N, H + 1] float32 (numerator | sum of weights).
  """
  b_, t, n, h = q.shape
  kv = k.shape[2]
  group = n // kv
  r = q_features.shape[-1]
  b = block_size
  nb = t // b
  rows = h + NORMALISER_ROWS
  q_r, k_r, v_t, fq_t, fk_t = to_kernel_layout(q, k, v, q_features, k_features)
  lab_row, lab_col = _labels(starts, rel_block)
  k0 = jnp.transpose(previous.k.astype(k.dtype), (0, 2, 1, 3))            # [B, K, b, H]
  v0_t = jnp.transpose(previous.v.astype(v.dtype), (0, 2, 3, 1))          # [B, K, H, b]
  fk0_t = jnp.transpose(previous.k_features.astype(k_features.dtype), (0, 2, 3, 1))
  lab0_row, lab0_col = _labels(previous.starts, previous.rel_block)
  # s_L of step t: the start of token tb - 1 (block -1's last at t = 0).
  s_last = jnp.concatenate([previous.starts[:, -1:], starts[:, b - 1:t - 1:b]], axis=1)
  s_last = s_last.astype(jnp.int32).reshape(-1)
  init = jnp.swapaxes(state.astype(jnp.float32), -1, -2)                 # [B, K, H + 16, r^2]

  prev_t = lambda ti: jax.lax.max(ti - 1, 0)
  q_rows = pl.BlockSpec((None, None, group, b, h), lambda bi, ni, ti, *_: (bi, ni, 0, ti, 0))
  q_cols = lambda d: pl.BlockSpec((None, None, group, d, b),
                                  lambda bi, ni, ti, *_: (bi, ni, 0, 0, ti))
  k_rows = lambda f: pl.BlockSpec((None, None, b, h), lambda bi, ni, ti, *_: (bi, ni, f(ti), 0))
  k_cols = lambda d, f: pl.BlockSpec((None, None, d, b),
                                     lambda bi, ni, ti, *_: (bi, ni, 0, f(ti)))
  l_row = lambda f: pl.BlockSpec((None, 2, b), lambda bi, ni, ti, *_: (bi, 0, f(ti)))
  l_col = lambda f: pl.BlockSpec((None, b, 2), lambda bi, ni, ti, *_: (bi, f(ti), 0))
  same = lambda ti: ti
  zero = lambda ti: 0
  state_spec = pl.BlockSpec((None, None, rows, r * r), lambda bi, ni, ti, *_: (bi, ni, 0, 0))
  in_specs = [
      q_rows, k_rows(same), k_cols(h, same), q_cols(r), k_cols(r, same),
      l_row(same), l_col(same),
      k_rows(prev_t), k_cols(h, prev_t), k_cols(r, prev_t), l_row(prev_t), l_col(prev_t),
      k_rows(zero), k_cols(h, zero), k_cols(r, zero), l_row(zero), l_col(zero),
      state_spec]
  num_shape = jax.ShapeDtypeStruct((b_, kv, group, h, t), jnp.float32)
  wsum_shape = jax.ShapeDtypeStruct((b_, kv, group, 1, t), jnp.float32)
  grid_spec = _compat.pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(b_, kv, nb), in_specs=in_specs,
      out_specs=[q_cols(h), q_cols(1)],
      scratch_shapes=[_compat.pltpu.VMEM((rows, r * r), jnp.float32)])
  kernel = functools.partial(_segment_forward_kernel, degree=degree, local_exact=local_exact,
                             strict=strict, bf16_phi=tiles.bf16_phi)
  ins = (q_r, k_r, v_t, fq_t, fk_t, lab_row, lab_col, k_r, v_t, fk_t, lab_row, lab_col,
         k0, v0_t, fk0_t, lab0_row, lab0_col, init)
  num_t, wsum = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=[num_shape, wsum_shape],
      compiler_params=_compat.TPUCompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary"),
          vmem_limit_bytes=tiles.vmem_limit_bytes),
      interpret=interpret,
      cost_estimate=_compat.CostEstimate(
          flops=segment_forward_flops(b_, n, t, h, r, b, local_exact=local_exact,
                                      kv_heads=kv),
          transcendentals=0,
          bytes_accessed=nbytes(q_r, k_r, k_r, v_t, v_t, fq_t, fk_t, fk_t, lab_row, lab_col,
                                init, num_shape, wsum_shape)),
      name="polysketch_segment_forward",
  )(s_last, *ins)
  acc = jnp.concatenate([num_t, wsum], axis=3).reshape(b_, n, h + 1, t)
  return jnp.transpose(acc, (0, 3, 1, 2))


def _rz_to_psi(state, head_dim):
  """The rz state [B, K, r^2, H + 16] as the xla path's psi state [B, K, H + 1, d]."""
  return _xla.state_to_psi(state[..., :head_dim], state[..., head_dim])


def _xla_walk(q, k, v, fq, fk, starts, rel_block, state, previous, static):
  degree, block_size, local_exact, strict, _, _ = static
  return _segments.segment_walk_xla(
      q, k, v, fq, fk, starts, rel_block, _rz_to_psi(state, q.shape[-1]), previous,
      block_size=block_size, degree=degree, local_exact=local_exact, strict=strict)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def segment_walk(q, k, v, fq, fk, starts, rel_block, state, previous, static):
  """The segment walk on the Pallas kernels: acc [B, T, N, H + 1] float32.

  Arguments as `_segments.segment_walk_xla`, the state rz [B, K, r^2, H + 16];
  static: (degree, block_size, local_exact, strict, tiles, interpret)."""
  degree, block_size, local_exact, strict, tiles, interpret = static
  return segment_forward(q, k, v, fq, fk, starts, rel_block, state, previous, degree=degree,
                         block_size=block_size, local_exact=local_exact, strict=strict,
                         tiles=tiles, interpret=interpret)


def _segment_walk_fwd(q, k, v, fq, fk, starts, rel_block, state, previous, static):
  out = segment_walk(q, k, v, fq, fk, starts, rel_block, state, previous, static)
  return out, (q, k, v, fq, fk, starts, rel_block, state, previous)


def _segment_walk_bwd(static, residuals, d_acc):
  q, k, v, fq, fk, starts, rel_block, state, previous = residuals
  prev_labels = previous.starts, previous.rel_block

  def walk(q, k, v, fq, fk, state, prev_k, prev_v, prev_fk):
    prev = _segments.Previous(prev_k, prev_v, prev_fk, *prev_labels)
    return _xla_walk(q, k, v, fq, fk, starts, rel_block, state, prev, static)

  out, vjp = jax.vjp(walk, q, k, v, fq, fk, state, *previous[:3])
  dq, dk, dv, dfq, dfk, dstate, dpk, dpv, dpfk = vjp(d_acc.astype(out.dtype))
  d_previous = _segments.Previous(dpk, dpv, dpfk, None, None)
  return dq, dk, dv, dfq, dfk, None, None, dstate, d_previous


segment_walk.defvjp(_segment_walk_fwd, _segment_walk_bwd)
