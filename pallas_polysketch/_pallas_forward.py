"""Forward Pallas TPU kernels of PolySketch attention (DESIGN §1.3, §2).

Layout. The wrapper transposes once in XLA so every matmul in the kernels is a
plain (NN) or rhs-transposed (NT) MXU matmul:

  q, k         [B, N, T, H]   blocks (b, H)
  v^T          [B, N, H, T]   blocks (H, b)
  f_q^T, f_k^T [B, N, r, T]   blocks (r, b), tokens on the 128 lanes
  o^T          [B, N, H, T]   blocks (H, b)
  den          [B, N, 1, T]   blocks (1, b), float32 (a backward residual)

Grid (B, N, T/b): batch and heads "parallel", blocks last and "arbitrary"
(they carry the prefix state). phi^T = f^T (x) f^T (r^2, b) is formed in VMEM
from the r-dim features (DESIGN §2 option 3: the reshape merges leading dims
only). The state lives in one float32 VMEM scratch of shape (H + 16, r^2):
rows [0, H) hold S^T, row H holds z^T, the rest stay zero. V^T is extended by a
row of ones (and zero rows up to the 16-row bf16 tile), so one matmul
V_aug^T phi_k updates S and z together and one matmul state phi_q reads both;
the normaliser never needs an H+1-wide lane layout.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_polysketch import _compat
from pallas_polysketch._pallas_common import (
    NT_DIMS, augment_v_t, local_weights_t, nbytes, outer_sum, phi_t)
from pallas_polysketch.tpu_config import NORMALISER_ROWS, ResolvedTiles

# The block axis carries the prefix state, so it must run in order. Tests flip
# this to "parallel" to show that the TPU interpreter then catches the bug.
BLOCK_AXIS_SEMANTICS = "arbitrary"

def _causal_forward_kernel(q_ref, k_ref, v_t_ref, fq_t_ref, fk_t_ref,
                           o_t_ref, den_ref, *rest,
                           degree, local_exact, local_tile, emit_state, bf16_phi):
  if emit_state:
    state_out_ref, state_ref, acc_ref = rest
  else:
    state_ref, acc_ref = rest
  t = pl.program_id(2)
  mm_dtype = q_ref.dtype
  head_dim, block = v_t_ref.shape

  @pl.when(t == 0)
  def _():
    state_ref[...] = jnp.zeros_like(state_ref)

  v_aug = augment_v_t(v_t_ref[...])  # (H + 16, b)

  # Exact (or sketched) diagonal block, in local_tile x local_tile tiles; tiles
  # above the diagonal are all zero and skipped.
  num_tiles = block // local_tile
  for i in range(num_tiles):
    qs = pl.ds(i * local_tile, local_tile)
    acc = jnp.zeros((head_dim + NORMALISER_ROWS, local_tile), jnp.float32)
    for j in range(i + 1):
      ks = pl.ds(j * local_tile, local_tile)
      w_t = local_weights_t(q_ref[qs, :], k_ref[ks, :], fq_t_ref[:, qs], fk_t_ref[:, ks],
                            degree=degree, local_exact=local_exact, diagonal=i == j)
      acc += jnp.dot(v_aug[:, j * local_tile:(j + 1) * local_tile], w_t.astype(mm_dtype),
                     preferred_element_type=jnp.float32)
    acc_ref[:, qs] = acc

  # Prefix: [S^T; z^T] phi_q reads numerator and normaliser in one matmul.
  phi_q = phi_t(fq_t_ref[...], mm_dtype, narrow=bf16_phi)
  acc = acc_ref[...] + jnp.dot(state_ref[...].astype(mm_dtype), phi_q,
                               preferred_element_type=jnp.float32)
  den = 1.0 + acc[head_dim:head_dim + 1, :]
  o_t_ref[...] = (acc[:head_dim, :] / den).astype(o_t_ref.dtype)
  den_ref[...] = den

  # Update: [S^T; z^T] += V_aug^T phi_k^T (contracting the b tokens).
  phi_k = phi_t(fk_t_ref[...], mm_dtype, narrow=bf16_phi)
  state_ref[...] += jax.lax.dot_general(v_aug, phi_k, NT_DIMS,
                                        preferred_element_type=jnp.float32)

  if emit_state:
    @pl.when(t == pl.num_programs(2) - 1)
    def _():
      state_out_ref[...] = state_ref[...]


def _state_apply_kernel(state_ref, fq_t_ref, o_t_ref, den_ref, *, bf16_phi):
  """Non-causal pass 2: o = S^T phi_q / (1 + z^T phi_q) for one block."""
  head_dim = o_t_ref.shape[0]
  mm_dtype = o_t_ref.dtype
  phi_q = phi_t(fq_t_ref[...], mm_dtype, narrow=bf16_phi)
  acc = jnp.dot(state_ref[...].astype(mm_dtype), phi_q, preferred_element_type=jnp.float32)
  den = 1.0 + acc[head_dim:head_dim + 1, :]
  o_t_ref[...] = (acc[:head_dim, :] / den).astype(o_t_ref.dtype)
  den_ref[...] = den


def forward_flops(batch, heads, seq, head_dim, sketch_dim, block_size, *,
                  causal, local_tile=None) -> int:
  """MXU + VPU flops the forward kernels execute (what CostEstimate reports)."""
  r2 = sketch_dim * sketch_dim
  rows = head_dim + NORMALISER_ROWS
  per_block = 2 * 2 * r2 * block_size                     # phi_q, phi_k
  per_block += 2 * rows * r2 * block_size                 # read
  if causal:
    per_block += 2 * rows * r2 * block_size               # update
    lt = local_tile or block_size
    n = block_size // lt
    tiles = n * (n + 1) // 2
    per_block += tiles * (2 * lt * lt * head_dim + 2 * rows * lt * lt)  # scores, L V
  return batch * heads * (seq // block_size) * per_block


def polysketch_forward(q, k, v, q_features, k_features, *, degree, block_size,
                       causal, local_exact, tiles: ResolvedTiles, interpret=False,
                       return_state=False):
  """Runs the forward kernels.

  Args:
    q, k, v: [B, T, N, H], T a multiple of block_size.
    q_features, k_features: [B, T, N, r].
  Returns:
    o [B, T, N, H], den [B, N, 1, T] float32, and when return_state the final
    state [B, N, H + 16, r^2] float32 (rows [0, H): S^T, row H: z^T).
  """
  b_, t, n, h = q.shape
  r = q_features.shape[-1]
  nb = t // block_size
  rows = h + NORMALISER_ROWS
  q_bnth = jnp.transpose(q, (0, 2, 1, 3))
  k_bnth = jnp.transpose(k, (0, 2, 1, 3))
  v_t = jnp.transpose(v, (0, 2, 3, 1))
  fq_t = jnp.transpose(q_features, (0, 2, 3, 1))
  fk_t = jnp.transpose(k_features, (0, 2, 3, 1))

  row_spec = pl.BlockSpec((None, None, block_size, h), lambda bi, ni, ti: (bi, ni, ti, 0))
  col_spec = lambda d: pl.BlockSpec((None, None, d, block_size), lambda bi, ni, ti: (bi, ni, 0, ti))
  state_spec = pl.BlockSpec((None, None, rows, r * r), lambda bi, ni, ti: (bi, ni, 0, 0))
  o_shape = jax.ShapeDtypeStruct((b_, n, h, t), q.dtype)
  den_shape = jax.ShapeDtypeStruct((b_, n, 1, t), jnp.float32)
  state_shape = jax.ShapeDtypeStruct((b_, n, rows, r * r), jnp.float32)
  params = _compat.TPUCompilerParams(
      dimension_semantics=("parallel", "parallel", BLOCK_AXIS_SEMANTICS),
      vmem_limit_bytes=tiles.vmem_limit_bytes)
  flops = forward_flops(b_, n, t, h, r, block_size, causal=causal,
                        local_tile=tiles.local_tile)

  if causal:
    kernel = functools.partial(
        _causal_forward_kernel, degree=degree, local_exact=local_exact,
        local_tile=tiles.local_tile, emit_state=return_state, bf16_phi=tiles.bf16_phi)
    out_specs = [col_spec(h), col_spec(1)] + ([state_spec] if return_state else [])
    out_shape = [o_shape, den_shape] + ([state_shape] if return_state else [])
    outs = pl.pallas_call(
        kernel,
        grid=(b_, n, nb),
        in_specs=[row_spec, row_spec, col_spec(h), col_spec(r), col_spec(r)],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[_compat.pltpu.VMEM((rows, r * r), jnp.float32),
                        _compat.pltpu.VMEM((rows, block_size), jnp.float32)],
        compiler_params=params,
        interpret=interpret,
        cost_estimate=_compat.CostEstimate(
            flops=flops, transcendentals=0,
            bytes_accessed=nbytes(q, k, v, q_features, k_features, o_shape, den_shape)),
        name="polysketch_causal_forward",
    )(q_bnth, k_bnth, v_t, fq_t, fk_t)
    o_t, den = outs[0], outs[1]
    state = outs[2] if return_state else None
  else:
    # Whole-sequence [S, z] (r^2, H + 16), transposed (small) for the read.
    state = jnp.swapaxes(outer_sum(v_t, fk_t, block_size=block_size,
                                   vmem_limit_bytes=tiles.vmem_limit_bytes,
                                   interpret=interpret), -1, -2)
    o_t, den = pl.pallas_call(
        functools.partial(_state_apply_kernel, bf16_phi=tiles.bf16_phi),
        grid=(b_, n, nb),
        in_specs=[state_spec, col_spec(r)],
        out_specs=[col_spec(h), col_spec(1)],
        out_shape=[o_shape, den_shape],
        compiler_params=_compat.TPUCompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel"),
            vmem_limit_bytes=tiles.vmem_limit_bytes),
        interpret=interpret,
        cost_estimate=_compat.CostEstimate(
            flops=flops // 2, transcendentals=0,
            bytes_accessed=nbytes(q_features, state_shape, o_shape, den_shape)),
        name="polysketch_state_apply",
    )(state, fq_t)
  o = jnp.transpose(o_t, (0, 3, 1, 2))
  if return_state:
    return o, den, state
  return o, den
