"""Forward Pallas TPU kernels of PolySketch attention (DESIGN §1.3, §2).

Layout. The wrapper views the public [B, T, N|K, D] arrays so every matmul
in the kernels is a plain (NN) or rhs-transposed (NT) MXU matmul:

  q            [B, K, G, T, H] or q^T [B, K, G, H, T]   (G query heads per kv head)
  k, v         [B, K, T, H]    or k^T, v^T [B, K, H, T]
  o            [B, K, G, T, H] or o^T [B, K, G, H, T]
  f_q^T        [B, K, G, r, T]   blocks (G, r, b), tokens on the 128 lanes
  f_k^T        [B, K, r, T]      blocks (r, b)
  den          [B, K, G, 1, T]   blocks (G, 1, b), float32 (a backward residual)

q, k, v and o take the layout the TPU compiler gives a [B, T, N, H] array by
default, so the views are bitcasts and no XLA copy runs around the kernel:
tokens on rows (H minor) when H is a multiple of the 128 lanes, else tokens
on lanes (T minor: an H = 64 head minor would be padded to 128 lanes). The
kernel transposes the (b, H) tiles it needs in the other orientation in VMEM
(O(bH) per block on the XLU, small beside the O(r^2 H b) MXU work). The
features (r < 128) always come tokens on lanes.

Grid (B, K, T/(m b)) over kv heads: batch and heads "parallel", blocks last and
"arbitrary" (they carry the prefix state). The causal kernel walks m blocks
per grid step, in order (`TileConfig.blocks_per_step`): the step's fixed
pipeline work is shared and the blocks' MXU and vector work overlap. The
state of a kv head is updated once per block and read by the G query heads of
its group. phi^T = f^T (x) f^T (r^2, b) is formed in VMEM from the r-dim
features (DESIGN §2 option 3: the reshape merges leading dims only). The
state lives in one float32 VMEM scratch of shape (H + 16, r^2): rows [0, H)
hold S^T, row H holds z^T, the rest stay zero. V^T is extended by a row of ones (and zero rows up to the 16-row bf16
tile), so one matmul V_aug^T phi_k updates S and z together and one matmul
state phi_q reads both; the normaliser never needs an H+1-wide lane layout.

The causal kernel starts from a given state (or zero) and can emit the state
at the start of a block chosen per batch row (a scalar-prefetch operand; the
number of blocks means "after the last"): chunked prefill keeps the state of
its complete blocks, context parallelism the state after all of them.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_polysketch import _compat
from pallas_polysketch._partitioning import batch_partitioned
from pallas_polysketch._pallas_common import (
    NT_DIMS, augment_v_t, kernel_view, local_weights_t, nbytes, phi_form_dtype,
    pallas_call, phi_rot_t, phi_t, precision_for, public_view,
    full_state, rot_packed, rot_pairs, sub_block, sym_state)
from pallas_polysketch.polynomial import divide_by_denominator
from pallas_polysketch.tpu_config import NORMALISER_ROWS, ResolvedTiles

# The block axis carries the prefix state, so it must run in order. Tests flip
# this to "parallel" to show that the TPU interpreter then catches the bug.
BLOCK_AXIS_SEMANTICS = "arbitrary"


def _causal_forward_kernel(*refs, degree, local_exact, local_tile, bias, has_initial,
                           emit_state, form_dtype, packed, tokens_on_lanes, block,
                           sub_blocks):
  refs = list(refs)
  state_block_ref = refs.pop(0) if emit_state else None
  q_ref, k_ref, v_ref, fq_t_ref, fk_t_ref = refs[:5]
  refs = refs[5:]
  init_ref = refs.pop(0) if has_initial else None
  o_ref, den_ref = refs[:2]
  refs = refs[2:]
  state_out_ref = refs.pop(0) if emit_state else None
  state_ref, acc_ref = refs

  t = pl.program_id(2)
  mm_dtype = q_ref.dtype
  prec = precision_for(mm_dtype)
  group = q_ref.shape[0]
  head_dim = v_ref.shape[0] if tokens_on_lanes else v_ref.shape[1]

  @pl.when(t == 0)
  def _():
    if has_initial:
      state_ref[...] = init_ref[...]
    else:
      state_ref[...] = jnp.zeros_like(state_ref)

  if emit_state:
    emit_at = state_block_ref[pl.program_id(0)]

  tokens = lambda ref, axis, s: sub_block(ref, axis, s, block, sub_blocks)

  # A grid step walks `sub_blocks` blocks in order (TileConfig.blocks_per_step).
  for s in range(sub_blocks):
    if emit_state:
      @pl.when(t * sub_blocks + s == emit_at)
      def _():
        state_out_ref[...] = state_ref[...]

    _forward_block(
        tokens(q_ref, 2 if tokens_on_lanes else 1, s),
        tokens(k_ref, 1 if tokens_on_lanes else 0, s),
        tokens(v_ref, 1 if tokens_on_lanes else 0, s),
        tokens(fq_t_ref, 2, s), tokens(fk_t_ref, 1, s),
        tokens(o_ref, 2 if tokens_on_lanes else 1, s), tokens(den_ref, 2, s),
        state_ref, acc_ref, degree=degree, local_exact=local_exact, local_tile=local_tile,
        bias=bias, form_dtype=form_dtype, packed=packed, tokens_on_lanes=tokens_on_lanes,
        block=block,
        mm_dtype=mm_dtype, prec=prec, group=group, head_dim=head_dim)

  if emit_state:
    last = pl.num_programs(2) - 1

    @pl.when((t == last) & (emit_at > (last + 1) * sub_blocks - 1))
    def _():
      state_out_ref[...] = state_ref[...]


def _forward_block(q_ref, k_ref, v_ref, fq_t_ref, fk_t_ref, o_ref, den_ref, state_ref,
                   acc_ref, *, degree, local_exact, local_tile, bias, form_dtype, packed,
                   tokens_on_lanes, block, mm_dtype, prec, group, head_dim):
  """One block of the causal forward: reads the state, then adds the block to it."""
  v_aug = augment_v_t(v_ref[...] if tokens_on_lanes else v_ref[...].T)  # (H + 16, b)
  state = state_ref[...].astype(mm_dtype)     # read before the update below
  num_tiles = block // local_tile
  if local_exact and tokens_on_lanes:
    k_rows = k_ref[...].T                                             # (b, H)

  def tiles(g):
    """The (q, k) local tiles of query head g: q as (H, n) columns when tokens
    are on lanes (an NN score matmul, one transpose fewer), else (n, H) rows."""
    if not local_exact:                         # the sketched local block reads features only
      return (lambda i: None), (lambda j: None)
    if tokens_on_lanes:
      q_cols = q_ref[g]
      return (lambda i: q_cols[:, i * local_tile:(i + 1) * local_tile],
              lambda j: k_rows[j * local_tile:(j + 1) * local_tile])
    return (lambda i: q_ref[g, pl.ds(i * local_tile, local_tile), :],
            lambda j: k_ref[pl.ds(j * local_tile, local_tile), :])

  # The MXU work in the order that schedules best (bench/TPU_SCHEDULE.md):
  # per query head the prefix read, then (once) the state update, then the
  # diagonal block, whose vector work (powers, mask) overlaps the MXU pops of
  # the first two.
  for g in range(group):
    # Prefix: [S^T; z^T] phi_q reads numerator and normaliser in one matmul.
    phi_q = phi_rot_t(fq_t_ref[g], form_dtype, mm_dtype, query=True, packed=packed)
    prefix = jnp.dot(state, phi_q, preferred_element_type=jnp.float32, precision=prec)

    if g == 0:
      # Update: [S^T; z^T] += V_aug^T phi_k^T (contracting the b tokens).
      phi_k = phi_rot_t(fk_t_ref[...], form_dtype, mm_dtype, query=False,
                        packed=packed)
      state_ref[...] += jax.lax.dot_general(v_aug, phi_k, NT_DIMS,
                                            preferred_element_type=jnp.float32, precision=prec)

    # Exact (or sketched) diagonal block, in local_tile x local_tile tiles;
    # tiles above the diagonal are all zero and skipped.
    q_tile, k_tile = tiles(g)
    w = {}
    for i in range(num_tiles):
      qs = pl.ds(i * local_tile, local_tile)
      for j in range(i + 1):
        ks = pl.ds(j * local_tile, local_tile)
        w[i, j] = local_weights_t(q_tile(i), k_tile(j), fq_t_ref[g, :, qs],
                                  fk_t_ref[:, ks], degree=degree, local_exact=local_exact,
                                  diagonal=i == j, q_cols=tokens_on_lanes).astype(mm_dtype)
    for i in range(num_tiles):
      acc = None
      for j in range(i + 1):
        term = jnp.dot(v_aug[:, j * local_tile:(j + 1) * local_tile], w[i, j],
                       preferred_element_type=jnp.float32, precision=prec)
        acc = term if acc is None else acc + term
      acc_ref[:, pl.ds(i * local_tile, local_tile)] = acc

    acc = acc_ref[...] + prefix
    den = bias + acc[head_dim:head_dim + 1, :]
    o_t = divide_by_denominator(acc[:head_dim, :], den)
    o_ref[g] = (o_t if tokens_on_lanes else o_t.T).astype(o_ref.dtype)
    den_ref[g] = den


def _state_apply_kernel(state_ref, fq_t_ref, o_t_ref, den_ref, *, bias, bf16_phi, mm_dtype):
  """Non-causal: o = S^T phi_q / (bias + z^T phi_q) for one block of one query head."""
  head_dim = o_t_ref.shape[0]
  phi_q = phi_t(fq_t_ref[...], mm_dtype, narrow=bf16_phi)
  acc = jnp.dot(state_ref[...].astype(mm_dtype), phi_q, preferred_element_type=jnp.float32,
                precision=precision_for(mm_dtype))
  den = bias + acc[head_dim:head_dim + 1, :]
  o_t_ref[...] = divide_by_denominator(acc[:head_dim, :], den).astype(o_t_ref.dtype)
  den_ref[...] = den


def forward_flops(batch, heads, seq, head_dim, sketch_dim, block_size, *,
                  causal, local_tile=None, kv_heads=None) -> int:
  """MXU + VPU flops the forward kernels execute (what CostEstimate reports)."""
  kv_heads = kv_heads or heads
  # The causal kernel forms phi on the symmetric pairs only (`rot_pairs`;
  # counted for float32 forming, the 16-bit one keeps a few more rows).
  r2 = len(rot_pairs(sketch_dim, False)) if causal else sketch_dim * sketch_dim
  rows = head_dim + NORMALISER_ROWS
  per_q_block = 2 * r2 * block_size + 2 * rows * r2 * block_size   # phi_q, read
  per_kv_block = 0
  if causal:
    per_kv_block = 2 * r2 * block_size + 2 * rows * r2 * block_size  # phi_k, update
    lt = local_tile or block_size
    n = block_size // lt
    tiles = n * (n + 1) // 2
    per_q_block += tiles * (2 * lt * lt * head_dim + 2 * rows * lt * lt)  # scores, L V
  nb = seq // block_size
  return batch * nb * (heads * per_q_block + kv_heads * per_kv_block)


def blocks_per_step(num_blocks: int, most: int) -> int:
  """The blocks the causal forward walks per grid step: the largest divisor of
  num_blocks up to `most` (`TileConfig.blocks_per_step`)."""
  return max(m for m in range(1, max(1, min(most, num_blocks)) + 1) if num_blocks % m == 0)


def to_kernel_layout(q, k, v, q_features, k_features):
  """[B, T, N|K, D] -> the kernels' layouts (module docstring)."""
  kv = k.shape[2]
  q_r = kernel_view(q, on_lanes=False, num_kv_heads=kv)            # [B, K, G, T, H]
  fq_t = kernel_view(q_features, on_lanes=True, num_kv_heads=kv)   # [B, K, G, r, T]
  k_r = kernel_view(k, on_lanes=False)                             # [B, K, T, H]
  v_t = kernel_view(v, on_lanes=True)                              # [B, K, H, T]
  fk_t = kernel_view(k_features, on_lanes=True)                    # [B, K, r, T]
  return q_r, k_r, v_t, fq_t, fk_t


def tokens_on_lanes(head_dim: int) -> bool:
  """Whether the forward kernel takes q, k, v, o with tokens on lanes (T minor):
  the TPU compiler's default layout of a [B, T, N, H] array, padding-free,
  puts H minor only when H fills whole 128-lane vregs."""
  return head_dim % 128 != 0


@batch_partitioned()
def causal_forward(q, k, v, q_features, k_features, *, degree, block_size, local_exact,
                   bias, tiles: ResolvedTiles, interpret=False, initial_state=None,
                   state_block=None, out_dtype=None):
  """Runs the causal forward kernel.

  Args:
    q [B, T, N, H], k, v [B, T, K, H], T a multiple of block_size;
    q_features [B, T, N, r], k_features [B, T, K, r].
    initial_state: None or [B, K, H + 16, r^2] float32 (rows [0, H): S^T,
      row H: z^T).
    state_block: None or int32 [B]: also return the state at the start of that
      block (T / block_size: after the last block).
    out_dtype: dtype of o (default q's); the VJP keeps a float32 o as its
      residual, since dden = -(g . O) / den cancels against the state terms.
  Returns:
    o [B, T, N, H], den [B, N, 1, T] float32, and with state_block the state
    [B, K, H + 16, r^2] float32.
  """
  b_, t, n, h = q.shape
  sub_blocks = blocks_per_step(t // block_size, tiles.blocks_per_step)
  step = block_size * sub_blocks
  kv = k.shape[2]
  group = n // kv
  r = q_features.shape[-1]
  nb = t // block_size
  rows = h + NORMALISER_ROWS
  on_lanes = tokens_on_lanes(h)
  q_v = kernel_view(q, on_lanes=on_lanes, num_kv_heads=kv)       # [B, K, G, (T, H)|(H, T)]
  k_v, v_v = (kernel_view(x, on_lanes=on_lanes) for x in (k, v))  # [B, K, (T, H)|(H, T)]
  fq_t = kernel_view(q_features, on_lanes=True, num_kv_heads=kv)  # [B, K, G, r, T]
  fk_t = kernel_view(k_features, on_lanes=True)                   # [B, K, r, T]
  o_dims = (h, t) if on_lanes else (t, h)
  o_shape = jax.ShapeDtypeStruct((b_, kv, group) + o_dims, out_dtype or q.dtype)
  den_shape = jax.ShapeDtypeStruct((b_, kv, group, 1, t), jnp.float32)
  # The kernel keeps [S^T; z^T] over the `rot_pairs` of the features only
  # (phi is symmetric); states cross its boundary on all r^2 pairs.
  mm_dtype = q.dtype
  form_dtype = phi_form_dtype(jnp.promote_types(q_features.dtype, k_features.dtype), mm_dtype,
                              tiles.bf16_phi)
  packed = rot_packed(q_features.dtype, k_features.dtype)
  pairs = rot_pairs(r, packed)
  n_sym = len(pairs)
  if initial_state is not None:
    initial_state = sym_state(initial_state, axis=-1, pairs=pairs)
  state_shape = jax.ShapeDtypeStruct((b_, kv, rows, n_sym), jnp.float32)
  flops = forward_flops(b_, n, t, h, r, block_size, causal=True,
                        local_tile=tiles.local_tile, kv_heads=kv)
  emit = state_block is not None
  has_initial = initial_state is not None
  # Index maps take (b, kv head, block) and, with emit, the prefetched ref.
  q_rows = lambda d: pl.BlockSpec((None, None, group, step, d),
                                  lambda bi, ni, ti, *_: (bi, ni, 0, ti, 0))
  q_cols = lambda d: pl.BlockSpec((None, None, group, d, step),
                                  lambda bi, ni, ti, *_: (bi, ni, 0, 0, ti))
  row_spec = pl.BlockSpec((None, None, step, h), lambda bi, ni, ti, *_: (bi, ni, ti, 0))
  col_spec = lambda d: pl.BlockSpec((None, None, d, step),
                                    lambda bi, ni, ti, *_: (bi, ni, 0, ti))
  state_spec = pl.BlockSpec((None, None, rows, n_sym), lambda bi, ni, ti, *_: (bi, ni, 0, 0))
  q_spec, kv_spec = (q_cols(h), col_spec(h)) if on_lanes else (q_rows(h), row_spec)
  in_specs = [q_spec, kv_spec, kv_spec, q_cols(r), col_spec(r)] + (
      [state_spec] if has_initial else [])
  out_specs = [q_spec, q_cols(1)] + ([state_spec] if emit else [])
  out_shape = [o_shape, den_shape] + ([state_shape] if emit else [])
  grid_spec = _compat.pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1 if emit else 0,
      grid=(b_, kv, nb // sub_blocks), in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=[_compat.pltpu.VMEM((rows, n_sym), jnp.float32),
                      _compat.pltpu.VMEM((rows, block_size), jnp.float32)])
  kernel = functools.partial(
      _causal_forward_kernel, degree=degree, local_exact=local_exact,
      local_tile=tiles.local_tile, bias=bias, has_initial=has_initial, emit_state=emit,
      form_dtype=form_dtype, packed=packed, tokens_on_lanes=on_lanes, block=block_size,
      sub_blocks=sub_blocks)
  ins = (q_v, k_v, v_v, fq_t, fk_t) + ((initial_state,) if has_initial else ())
  outs = pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=out_shape,
      compiler_params=_compat.TPUCompilerParams(
          dimension_semantics=("parallel", "parallel", BLOCK_AXIS_SEMANTICS),
          vmem_limit_bytes=tiles.vmem_limit_bytes),
      interpret=interpret,
      cost_estimate=_compat.CostEstimate(
          flops=flops, transcendentals=0,
          bytes_accessed=nbytes(*ins, o_shape, den_shape)),
      name="polysketch_causal_forward",
  )(*(((state_block.astype(jnp.int32),) if emit else ()) + ins))
  o = public_view(outs[0], on_lanes=on_lanes)
  den = outs[1].reshape(b_, n, 1, t)
  return (o, den, full_state(outs[2], r, axis=-1, pairs=pairs)) if emit else (o, den)


@batch_partitioned()
def apply_state_forward(q_features, state, *, head_dim, out_dtype, block_size, bias,
                        tiles: ResolvedTiles, interpret=False, mm_dtype=None):
  """Non-causal read of a whole-sequence state.

  Args:
    q_features [B, T, N, r]; state [B, K, H + 16, r^2] float32; mm_dtype: the
    MXU operand dtype (default out_dtype).
  Returns:
    o [B, T, N, H] in out_dtype, den [B, N, 1, T] float32.
  """
  b_, t, n, r = q_features.shape
  kv = state.shape[1]
  group = n // kv
  h, nb = head_dim, t // block_size
  rows = h + NORMALISER_ROWS
  fq_t = kernel_view(q_features, on_lanes=True)                    # [B, N, r, T]
  mm_dtype = mm_dtype or out_dtype
  o_shape = jax.ShapeDtypeStruct((b_, n, h, t), out_dtype)
  den_shape = jax.ShapeDtypeStruct((b_, n, 1, t), jnp.float32)
  col = lambda d: pl.BlockSpec((None, None, d, block_size), lambda bi, ni, ti: (bi, ni, 0, ti))
  o_t, den = pallas_call(
      functools.partial(_state_apply_kernel, bias=bias, bf16_phi=tiles.bf16_phi,
                        mm_dtype=jnp.dtype(mm_dtype)),
      grid=(b_, n, nb),
      # Grid over query heads; the index map picks the kv head's state.
      in_specs=[pl.BlockSpec((None, None, rows, r * r),
                             lambda bi, ni, ti: (bi, jax.lax.div(ni, group), 0, 0)), col(r)],
      out_specs=[col(h), col(1)],
      out_shape=[o_shape, den_shape],
      compiler_params=_compat.TPUCompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel"),
          vmem_limit_bytes=tiles.vmem_limit_bytes),
      interpret=interpret,
      cost_estimate=_compat.CostEstimate(
          flops=forward_flops(b_, n, t, h, r, block_size, causal=False, kv_heads=kv),
          transcendentals=0, bytes_accessed=nbytes(q_features, state, o_shape, den_shape)),
      name="polysketch_state_apply",
  )(state, fq_t)
  return public_view(o_t, on_lanes=True), den
