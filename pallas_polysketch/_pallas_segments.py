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

Gradients: `segment_walk` is a `jax.custom_vjp` whose backward runs two more
kernels on the cotangent G^T = [d acc^T; 0] (H + 16, b) float32, all their
products in float32 at full precision (bf16 inputs are upcast in VMEM):

- dq (`_segment_dq_kernel`) walks forward, rebuilding S(t-1) as the forward:
  dW^T = V_aug G^T over the window, masked; ds = p s^(p-1) dW where exact,
  du = 2u dW where sketched; dq = ds k, df_q = du f_k, plus the state read's
  dphi_q = [S^T; z^T]^T G (masked by the read flags) through `phi_t_vjp`.
- dkv (`_segment_dkv_kernel`) walks key blocks u backwards carrying D(u+1), the
  cotangent of the state S(u+1) that block u's keys enter: dv, df_k from D(u+1)
  (for the keys of block u's last segment), dk, dv, df_k from the windows of
  query blocks u (diagonal) and u+1 (a second BlockSpec, min(u+1, nb-1));
  then D(u) = R(u+1) + [s_L(u) < ub] D(u+1), R(t) = sum of the masked G phi_q^T
  of query block t. After block 0 it does block -1 (`previous`) and the
  incoming state's cotangent D(-1), written through constant index maps.

The state cotangent is symmetric in the (a, c) feature pair (as the kernels'
state); the xla walk's, through its psi state, sits on a <= c: they agree as
functions of a symmetric state (which every state here is).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_polysketch import _compat, _segments
from pallas_polysketch._partitioning import batch_partitioned
from pallas_polysketch._pallas_common import (
    HIGHEST, NT_DIMS, TN_DIMS, augment_v_t, nbytes, pallas_call, phi_t, phi_t_vjp,
    precision_for)
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


def _walk_edges(previous, starts, k_dtype, v_dtype, fk_dtype, block_size):
  """Block -1 in the kernels' layout, k0 [B, K, b, H], v0^T [B, K, H, b],
  f_k0^T [B, K, r, b] and its labels, and s_L of every step (the start of
  token tb - 1; block -1's last at t = 0), int32 [B * T/b]."""
  k0 = jnp.transpose(previous.k.astype(k_dtype), (0, 2, 1, 3))
  v0_t = jnp.transpose(previous.v.astype(v_dtype), (0, 2, 3, 1))
  fk0_t = jnp.transpose(previous.k_features.astype(fk_dtype), (0, 2, 3, 1))
  lab0_row, lab0_col = _labels(previous.starts, previous.rel_block)
  t = starts.shape[1]
  s_last = jnp.concatenate([previous.starts[:, -1:],
                            starts[:, block_size - 1:t - 1:block_size]], axis=1)
  return k0, v0_t, fk0_t, lab0_row, lab0_col, s_last.astype(jnp.int32).reshape(-1)


@batch_partitioned()
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
  k0, v0_t, fk0_t, lab0_row, lab0_col, s_last = _walk_edges(
      previous, starts, k.dtype, v.dtype, k_features.dtype, b)
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
  num_t, wsum = pallas_call(
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


def _window_parts(q, k, fq_t, fk_t, q_lab, k_lab, *, local_exact, diagonal, strict):
  """(u, s, exact, allowed) of one key block (rows) against the query block
  (columns), all (b, b): sketched scores u = f_k.f_q, exact scores s = k.q (None
  without local_exact), where the exact weight applies, which pairs count."""
  f32 = jnp.float32
  u = jax.lax.dot_general(fk_t.astype(f32), fq_t.astype(f32), TN_DIMS,
                          preferred_element_type=f32, precision=HIGHEST)
  s = exact = None
  if local_exact:
    s = jax.lax.dot_general(k.astype(f32), q.astype(f32), NT_DIMS,
                            preferred_element_type=f32, precision=HIGHEST)
    exact = k_lab[:, 1:2] == q_lab[1:2, :]
  allowed = k_lab[:, 0:1] == q_lab[0:1, :]
  if diagonal:
    row = jax.lax.broadcasted_iota(jnp.int32, u.shape, 0)
    col = jax.lax.broadcasted_iota(jnp.int32, u.shape, 1)
    allowed = allowed & ((row < col) if strict else (row <= col))
  return u, s, exact, allowed


def _weights_and_score_grads(parts, dw_t, degree):
  """W^T and the cotangents (ds^T, du^T) of the exact and sketched scores."""
  u, s, exact, allowed = parts
  w_t = u * u
  dw_t = jnp.where(allowed, dw_t, 0.0)
  du_t = dw_t * (2.0 * u)
  ds_t = None
  if exact is not None:
    w_t = jnp.where(exact, jax.lax.integer_pow(s, degree), w_t)
    ds_t = jnp.where(exact, dw_t * (degree * jax.lax.integer_pow(s, degree - 1)), 0.0)
    du_t = jnp.where(exact, 0.0, du_t)
  return jnp.where(allowed, w_t, 0.0), ds_t, du_t


def _f32dot(a, b, dims=None):
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  if dims is None:
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=HIGHEST)
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32,
                             precision=HIGHEST)


def _segment_dq_kernel(s_last_ref, q_ref, k_ref, v_t_ref, fq_t_ref, fk_t_ref, g_ref,
                       lab_row_ref, lab_col_ref, kp_ref, vp_t_ref, fkp_t_ref, labp_row_ref,
                       labp_col_ref, k0_ref, v0_t_ref, fk0_t_ref, lab0_row_ref, lab0_col_ref,
                       init_ref, dq_ref, dfq_t_ref, state_ref, *, degree, local_exact, strict):
  """Forward walk: dq and df_q, rebuilding S(t-1) as the forward kernel."""
  bi, t = pl.program_id(0), pl.program_id(2)
  group = q_ref.shape[0]
  block = v_t_ref.shape[1]

  @pl.when(t == 0)
  def _():
    state_ref[...] = init_ref[...]

  s_last = s_last_ref[bi * pl.num_programs(2) + t]
  window_start = (t - 1) * block

  def step(kp_ref, vp_t_ref, fkp_t_ref, labp_row_ref, labp_col_ref):
    q_lab = lab_row_ref[...]
    v_aug = augment_v_t(v_t_ref[...].astype(jnp.float32))
    vp_aug = augment_v_t(vp_t_ref[...].astype(jnp.float32))
    state = state_ref[...]
    use = q_lab[0:1, :] < window_start
    kw = dict(local_exact=local_exact, strict=strict)
    for g in range(group):
      q, fq_t, g_aug = q_ref[g], fq_t_ref[g], g_ref[g]          # g_aug (H + 16, b) f32
      dq = jnp.zeros(q.shape, jnp.float32)
      dphi_q = jnp.where(use, _f32dot(state, g_aug, TN_DIMS), 0.0)  # (r^2, b)
      dfq_t = phi_t_vjp(dphi_q, fq_t)
      for k_, fk_t, lab, v1, diagonal in (
          (kp_ref[...], fkp_t_ref[...], labp_col_ref[...], vp_aug, False),
          (k_ref[...], fk_t_ref[...], lab_col_ref[...], v_aug, True)):
        parts = _window_parts(q, k_, fq_t, fk_t, q_lab, lab, diagonal=diagonal, **kw)
        _, ds_t, du_t = _weights_and_score_grads(parts, _f32dot(v1, g_aug, TN_DIMS), degree)
        if ds_t is not None:
          dq += _f32dot(ds_t, k_, TN_DIMS)                        # (b, H)
        dfq_t += _f32dot(fk_t, du_t)                              # (r, b)
      dq_ref[g] = dq
      dfq_t_ref[g] = dfq_t

    in_last = labp_row_ref[0:1, :] == s_last
    phi_k = phi_t(fkp_t_ref[...])
    upd = _f32dot(jnp.where(in_last, vp_aug, 0.0), jnp.where(in_last, phi_k, 0.0), NT_DIMS)
    state_ref[...] = jnp.where(s_last < window_start, state, 0.0) + upd

  pl.when(t == 0)(lambda: step(k0_ref, v0_t_ref, fk0_t_ref, lab0_row_ref, lab0_col_ref))
  pl.when(t > 0)(lambda: step(kp_ref, vp_t_ref, fkp_t_ref, labp_row_ref, labp_col_ref))


def _segment_dkv_kernel(s_last_ref, k_ref, v_t_ref, fk_t_ref, lab_row_ref, lab_col_ref,
                        q_ref, fq_t_ref, g_ref, qlab_row_ref, qn_ref, fqn_t_ref, gn_ref,
                        qnlab_row_ref, k0_ref, v0_t_ref, fk0_t_ref, lab0_row_ref, lab0_col_ref,
                        dk_ref, dv_t_ref, dfk_t_ref, dk0_ref, dv0_t_ref, dfk0_t_ref,
                        dstate_ref, carry_ref, *, degree, local_exact, strict):
  """Reverse walk over key blocks u = nb-1 .. 0 carrying D(u+1), the cotangent of
  the state S(u+1) that block u's keys enter: dk, dv, df_k from the windows of
  query blocks u and u+1 and from D(u+1); then D(u) = R(u+1) + keep_{u+1} D(u+1)
  with R(t) the state reads of query block t. After block 0: block -1 and the
  initial state's cotangent D(-1)."""
  bi, ti = pl.program_id(0), pl.program_id(2)
  nb = pl.num_programs(2)
  u = nb - 1 - ti
  head_dim, block = v_t_ref.shape
  group = q_ref.shape[0]
  kw = dict(local_exact=local_exact, strict=strict)

  @pl.when(ti == 0)
  def _():
    carry_ref[...] = jnp.zeros_like(carry_ref)

  def key_block(k_, v_t, fk_t, k_lab_col, k_lab_row, windows, s_last):
    """Gradients of one key block: windows = [(q, fq_t, g_aug, q_lab, diagonal)]."""
    v_aug = augment_v_t(v_t.astype(jnp.float32))
    carry = carry_ref[...]
    in_last = k_lab_row[0:1, :] == s_last
    phi_k = phi_t(fk_t)
    dv_aug = jnp.where(in_last, _f32dot(carry, phi_k), 0.0)                    # (H + 16, b)
    dfk_t = phi_t_vjp(jnp.where(in_last, _f32dot(carry, v_aug, TN_DIMS), 0.0), fk_t)
    dk = jnp.zeros(k_.shape, jnp.float32)
    for q_ref_, fq_t_ref_, g_ref_, q_lab, diagonal in windows:
      for g in range(group):
        q, fq_t, g_aug = q_ref_[g], fq_t_ref_[g], g_ref_[g]
        parts = _window_parts(q, k_, fq_t, fk_t, q_lab, k_lab_col, diagonal=diagonal, **kw)
        w_t, ds_t, du_t = _weights_and_score_grads(
            parts, _f32dot(v_aug, g_aug, TN_DIMS), degree)
        dv_aug += _f32dot(g_aug, w_t, NT_DIMS)
        if ds_t is not None:
          dk += _f32dot(ds_t, q)
        dfk_t += _f32dot(fq_t, du_t, NT_DIMS)
    return dk, dv_aug[:head_dim], dfk_t

  def advance(fq_t_ref_, g_ref_, q_lab, keep_flag, window_start):
    """carry <- R + keep carry, R the state reads of one query block."""
    use = q_lab[0:1, :] < window_start
    r_sum = jnp.zeros(carry_ref.shape, jnp.float32)
    for g in range(group):
      r_sum += _f32dot(jnp.where(use, g_ref_[g], 0.0), phi_t(fq_t_ref_[g]), NT_DIMS)
    carry_ref[...] = r_sum + jnp.where(keep_flag, carry_ref[...], 0.0)

  s_next = s_last_ref[bi * nb + jax.lax.min(u + 1, nb - 1)]   # last start of block u
  cur = (q_ref, fq_t_ref, g_ref, qlab_row_ref[...], True)
  nxt = (qn_ref, fqn_t_ref, gn_ref, qnlab_row_ref[...], False)

  def store(windows):
    dk, dv, dfk = key_block(k_ref[...], v_t_ref[...], fk_t_ref[...], lab_col_ref[...],
                            lab_row_ref[...], windows, s_next)
    dk_ref[...], dv_t_ref[...], dfk_t_ref[...] = dk, dv, dfk

  pl.when(u == nb - 1)(lambda: store([cur]))

  @pl.when(u < nb - 1)
  def _():
    store([cur, nxt])
    advance(fqn_t_ref, gn_ref, qnlab_row_ref[...], s_next < u * block, u * block)

  @pl.when(u == 0)
  def _():
    s_first = s_last_ref[bi * nb]            # the last start of block -1
    dk, dv, dfk = key_block(k0_ref[...], v0_t_ref[...], fk0_t_ref[...], lab0_col_ref[...],
                            lab0_row_ref[...], [cur[:4] + (False,)], s_first)
    dk0_ref[...], dv0_t_ref[...], dfk0_t_ref[...] = dk, dv, dfk
    advance(fq_t_ref, g_ref, qlab_row_ref[...], s_first < -block, -block)
    dstate_ref[...] = carry_ref[...]


def _specs(b, group, h, r, rows):
  """BlockSpec factories on (bi, ni, ti, *prefetch) for a block index map f(ti)."""
  return dict(
      q_rows=lambda f: pl.BlockSpec((None, None, group, b, h),
                                    lambda bi, ni, ti, *_: (bi, ni, 0, f(ti), 0)),
      q_cols=lambda d, f: pl.BlockSpec((None, None, group, d, b),
                                       lambda bi, ni, ti, *_: (bi, ni, 0, 0, f(ti))),
      k_rows=lambda f: pl.BlockSpec((None, None, b, h),
                                    lambda bi, ni, ti, *_: (bi, ni, f(ti), 0)),
      k_cols=lambda d, f: pl.BlockSpec((None, None, d, b),
                                       lambda bi, ni, ti, *_: (bi, ni, 0, f(ti))),
      l_row=lambda f: pl.BlockSpec((None, 2, b), lambda bi, ni, ti, *_: (bi, 0, f(ti))),
      l_col=lambda f: pl.BlockSpec((None, b, 2), lambda bi, ni, ti, *_: (bi, f(ti), 0)),
      state=pl.BlockSpec((None, None, rows, r * r), lambda bi, ni, ti, *_: (bi, ni, 0, 0)))


@batch_partitioned()
def segment_backward(q, k, v, q_features, k_features, starts, rel_block, state, previous,
                     d_acc, *, degree, block_size, local_exact, strict, tiles: ResolvedTiles,
                     interpret=False):
  """The segment walk's VJP on two kernels (products in float32 at full precision).

  d_acc [B, T, N, H + 1]. Returns (dq, dk, dv, dfq, dfk, d_state rz,
  (d previous.k, .v, .k_features))."""
  b_, t, n, h = q.shape
  kv = k.shape[2]
  group = n // kv
  r = q_features.shape[-1]
  b = block_size
  nb = t // b
  rows = h + NORMALISER_ROWS
  f32 = jnp.float32
  q_r, k_r, v_t, fq_t, fk_t = to_kernel_layout(q, k, v, q_features, k_features)
  g = jnp.transpose(d_acc.astype(f32), (0, 2, 3, 1))                     # [B, N, H + 1, T]
  g = jnp.pad(g, ((0, 0), (0, 0), (0, rows - h - 1), (0, 0)))
  g = g.reshape(b_, kv, group, rows, t)
  lab_row, lab_col = _labels(starts, rel_block)
  k0, v0_t, fk0_t, lab0_row, lab0_col, s_last = _walk_edges(
      previous, starts, k.dtype, v.dtype, k_features.dtype, b)
  init = jnp.swapaxes(state.astype(f32), -1, -2)
  sp = _specs(b, group, h, r, rows)
  same, zero = (lambda ti: ti), (lambda ti: 0)
  prev_t = lambda ti: jax.lax.max(ti - 1, 0)
  params = _compat.TPUCompilerParams(
      dimension_semantics=("parallel", "parallel", "arbitrary"),
      vmem_limit_bytes=tiles.backward_vmem_limit_bytes)
  kernel_kw = dict(degree=degree, local_exact=local_exact, strict=strict)

  dq, dfq_t = pallas_call(
      functools.partial(_segment_dq_kernel, **kernel_kw),
      grid_spec=_compat.pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b_, kv, nb),
          in_specs=[sp["q_rows"](same), sp["k_rows"](same), sp["k_cols"](h, same),
                    sp["q_cols"](r, same), sp["k_cols"](r, same), sp["q_cols"](rows, same),
                    sp["l_row"](same), sp["l_col"](same),
                    sp["k_rows"](prev_t), sp["k_cols"](h, prev_t), sp["k_cols"](r, prev_t),
                    sp["l_row"](prev_t), sp["l_col"](prev_t),
                    sp["k_rows"](zero), sp["k_cols"](h, zero), sp["k_cols"](r, zero),
                    sp["l_row"](zero), sp["l_col"](zero), sp["state"]],
          out_specs=[sp["q_rows"](same), sp["q_cols"](r, same)],
          scratch_shapes=[_compat.pltpu.VMEM((rows, r * r), f32)]),
      out_shape=[jax.ShapeDtypeStruct((b_, kv, group, t, h), f32),
                 jax.ShapeDtypeStruct((b_, kv, group, r, t), f32)],
      compiler_params=params, interpret=interpret, name="polysketch_segment_dq",
  )(s_last, q_r, k_r, v_t, fq_t, fk_t, g, lab_row, lab_col, k_r, v_t, fk_t, lab_row, lab_col,
    k0, v0_t, fk0_t, lab0_row, lab0_col, init)

  rev = lambda ti: nb - 1 - ti
  rev_next = lambda ti: jax.lax.min(nb - ti, nb - 1)
  const = lambda shape: pl.BlockSpec((None, None) + shape,
                                     lambda bi, ni, ti, *_: (bi, ni) + (0,) * len(shape))
  dk, dv_t, dfk_t, dk0, dv0_t, dfk0_t, d_state = pallas_call(
      functools.partial(_segment_dkv_kernel, **kernel_kw),
      grid_spec=_compat.pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b_, kv, nb),
          in_specs=[sp["k_rows"](rev), sp["k_cols"](h, rev), sp["k_cols"](r, rev),
                    sp["l_row"](rev), sp["l_col"](rev),
                    sp["q_rows"](rev), sp["q_cols"](r, rev), sp["q_cols"](rows, rev),
                    sp["l_row"](rev),
                    sp["q_rows"](rev_next), sp["q_cols"](r, rev_next),
                    sp["q_cols"](rows, rev_next), sp["l_row"](rev_next),
                    sp["k_rows"](zero), sp["k_cols"](h, zero), sp["k_cols"](r, zero),
                    sp["l_row"](zero), sp["l_col"](zero)],
          out_specs=[sp["k_rows"](rev), sp["k_cols"](h, rev), sp["k_cols"](r, rev),
                     const((b, h)), const((h, b)), const((r, b)), sp["state"]],
          scratch_shapes=[_compat.pltpu.VMEM((rows, r * r), f32)]),
      out_shape=[jax.ShapeDtypeStruct((b_, kv, t, h), f32),
                 jax.ShapeDtypeStruct((b_, kv, h, t), f32),
                 jax.ShapeDtypeStruct((b_, kv, r, t), f32),
                 jax.ShapeDtypeStruct((b_, kv, b, h), f32),
                 jax.ShapeDtypeStruct((b_, kv, h, b), f32),
                 jax.ShapeDtypeStruct((b_, kv, r, b), f32),
                 jax.ShapeDtypeStruct((b_, kv, rows, r * r), f32)],
      compiler_params=params, interpret=interpret, name="polysketch_segment_dkv",
  )(s_last, k_r, v_t, fk_t, lab_row, lab_col, q_r, fq_t, g, lab_row, q_r, fq_t, g, lab_row,
    k0, v0_t, fk0_t, lab0_row, lab0_col)

  rows_back = lambda x: jnp.transpose(x, (0, 2, 1, 3))      # [B, K, T, D] -> [B, T, K, D]
  cols_back = lambda x: jnp.transpose(x, (0, 3, 1, 2))      # [B, K, D, T] -> [B, T, K, D]
  dq = jnp.transpose(dq.reshape(b_, n, t, h), (0, 2, 1, 3)).astype(q.dtype)
  dfq = jnp.transpose(dfq_t.reshape(b_, n, r, t), (0, 3, 1, 2)).astype(q_features.dtype)
  grads = (dq, rows_back(dk).astype(k.dtype), cols_back(dv_t).astype(v.dtype), dfq,
           cols_back(dfk_t).astype(k_features.dtype))
  d_prev = (rows_back(dk0).astype(previous.k.dtype), cols_back(dv0_t).astype(previous.v.dtype),
            cols_back(dfk0_t).astype(previous.k_features.dtype))
  return grads + (jnp.swapaxes(d_state, -1, -2), d_prev)


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
  degree, block_size, local_exact, strict, tiles, interpret = static
  *grads, d_state, d_prev = segment_backward(
      *residuals, d_acc, degree=degree, block_size=block_size, local_exact=local_exact,
      strict=strict, tiles=tiles, interpret=interpret)
  return (*grads, None, None, d_state, _segments.Previous(*d_prev, None, None))


segment_walk.defvjp(_segment_walk_fwd, _segment_walk_bwd)
