"""Pallas TPU kernels of the learned sketch's features (paper §4).

XLA computes the learned sketch as some sixty fusions on TPU, each storing its
activations to HBM for the next, and the whole is bound by the vector work on
the hidden units (bench/TPU_SCHEDULE.md, "Left to do", item 6). These kernels
compute the two branches' four Dense blocks of one tile of tokens in VMEM: the
forward reads x and writes the features; the backward reads x and the
features' cotangent, recomputes the forward and writes dx and, per (batch
row, head), the weights' gradients, summed over heads and batch rows outside.

Layout: tokens on the 128 lanes, as the attention kernels take the features
(`kernel_view`): x^T [B, N, H, T] (a bitcast of [B, T, N, H] at H = 64), f^T
[B, N, r, T]. Every activation is [units, tokens], so the Dense layers are
W^T x^T (NN), their weight gradients dY X^T (NT) and their input gradients
W dY (TN); LayerNorm reduces over rows.

The weights come folded by `sketches._folded_weights` (each
LayerNorm's affine into the next Dense kernel, GELU's 1/2 into the following
one), stacked over the two branches and transposed:
  w1_t [2, h, H], c1 [2, h, 1]   first block's input layer (+ LayerNorm bias term)
  a_t  [2, r, h]                 first block's output layer
  w2_t [2, h, r], c2 [2, h, 1]   second block's input layer
  b_t  [2, r, h]                 second block's output layer
float32 here; the kernels take them in the matmul dtype (x's), each bias as
one more column multiplying a row of ones (the MXU adds it) unless that row
would cost an MXU pass of its own (`bias_on_mxu`: H = 128 on 128-wide MXUs,
where the VPU adds the bias in float32), and return float32 gradients. The
matmuls accumulate in float32; GELU is float32, or bf16 for bf16 x where
`FeatureTiles.bf16_gelu` (chips with a bf16 VPU). Each stage is issued for
both branches before the next, so one branch's vector work overlaps the
other's matmuls.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_polysketch import _compat
from pallas_polysketch._partitioning import batch_partitioned
from pallas_polysketch._pallas_common import NN_DIMS, NT_DIMS, TN_DIMS, pallas_call, precision_for
from pallas_polysketch.tpu_config import FeatureTiles

LAYER_NORM_EPS = 1e-5   # the learned sketch's LayerNorms (and the Flax layer's q, k norm)
GELU_C = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715
ONES_ROWS = 16   # the bias row and zero rows up to a bf16 sublane tile


def _dot(a, b, dims, precision):
  return jax.lax.dot_general(a, b, dims, precision=precision,
                             preferred_element_type=jnp.float32)


def _normalized_rows(x32):
  """LayerNorm without affine over the rows of [d, tokens]: (x_hat, 1/sigma)."""
  centered = x32 - jnp.mean(x32, axis=0, keepdims=True)
  inv = jax.lax.rsqrt(jnp.mean(centered * centered, axis=0, keepdims=True) + LAYER_NORM_EPS)
  return centered * inv, inv


def _normalized_rows_vjp(dx_hat, x_hat, inv):
  mean_d = jnp.mean(dx_hat, axis=0, keepdims=True)
  mean_dx = jnp.mean(dx_hat * x_hat, axis=0, keepdims=True)
  return inv * (dx_hat - mean_d - x_hat * mean_dx)


def twice_gelu(pre, gelu_dtype, *, slope: bool):
  """2 gelu(pre) (the tanh form) computed in gelu_dtype, and (when slope) its
  derivative; None in its place otherwise. Also the xla path's
  (`sketches._twice_gelu`)."""
  x = pre.astype(gelu_dtype)
  x2 = x * x
  t = jnp.tanh(x * (GELU_C + (GELU_C * GELU_A) * x2))
  if not slope:
    return x + x * t, None
  # d/dx x (1 + t) = (1 + t) (1 + (1 - t) x u'), u' = c (1 + 3 a x^2)
  one_plus_t = 1.0 + t
  x_du = x * (GELU_C + (3 * GELU_C * GELU_A) * x2)
  return x * one_plus_t, one_plus_t * (1.0 + (1.0 - t) * x_du)


def _with_ones_row(x_hat, mm_dtype):
  """[d, tokens] -> [d + ONES_ROWS, tokens] in mm_dtype: a row of ones, then
  zero rows, below x_hat, so W_aug^T x_aug adds the bias column on the MXU."""
  rows = jax.lax.broadcasted_iota(jnp.int32, (ONES_ROWS, x_hat.shape[1]), 0)
  return jnp.concatenate([x_hat.astype(mm_dtype), (rows == 0).astype(mm_dtype)], axis=0)


def bias_on_mxu(rows: int, mxu_width: int) -> bool:
  """Whether a Dense layer over `rows` inputs adds its bias on the MXU, as a
  column of its kernel against a row of ones below the input: where the
  ONES_ROWS fit in the contraction's last MXU pass. Elsewhere (e.g. rows a
  multiple of the MXU width: H = 128 on 128-wide MXUs) they would take a pass
  of their own in the layer's matmul and both its gradients', and the VPU
  adds the bias (and sums its gradient) instead."""
  return -(-(rows + ONES_ROWS) // mxu_width) == -(-rows // mxu_width)


def _dense_input(x_hat, mm_dtype, bias):
  """A Dense layer's matmul input: x_hat, with the ones row where the bias is
  a column of the kernel (bias None)."""
  return _with_ones_row(x_hat, mm_dtype) if bias is None else x_hat.astype(mm_dtype)


def _dense(w, bias, x_in, precision):
  out = _dot(w, x_in, NN_DIMS, precision)
  return out if bias is None else out + bias


def _forward_tile(x_t, w, mm_dtype, gelu_dtype, precision, keep):
  """The features of one tile x^T [H, tokens]: f^T [r, tokens] float32, and
  (when keep) the activations the backward needs. Each stage is issued for
  both branches before the next (the scheduler keeps the source order of
  matmuls: one branch's vector work overlaps the other's matmul). The GELUs'
  slopes are not kept: the backward recomputes them from the pre-activations
  (in gelu_dtype, so bit-identical), which keeps fewer [hidden, tokens] arrays
  live across the backward's matmuls (v5e's VJP 8% fewer cycles, v6e's 7%)."""
  w1_t, c1, a_t, w2_t, c2, b_t = w
  both = lambda f, *args: tuple(f(i, *(a[i] for a in args)) for i in range(2))
  branch = lambda c, i: None if c is None else c[i]
  x_hat1, inv1 = _normalized_rows(x_t.astype(jnp.float32))
  x_aug1 = _dense_input(x_hat1, mm_dtype, c1)
  pre1 = both(lambda i: _dense(w1_t[i], branch(c1, i), x_aug1, precision).astype(gelu_dtype))
  hid1 = both(lambda i, p: twice_gelu(p, gelu_dtype, slope=False)[0].astype(mm_dtype), pre1)
  y = both(lambda i, h: _dot(a_t[i], h, NN_DIMS, precision), hid1)
  norm2 = tuple(_normalized_rows(v) for v in y)
  x_aug2 = tuple(_dense_input(xh, mm_dtype, c2) for xh, _ in norm2)
  pre2 = both(lambda i, xa: _dense(w2_t[i], branch(c2, i), xa, precision).astype(gelu_dtype),
              x_aug2)
  hid2 = both(lambda i, p: twice_gelu(p, gelu_dtype, slope=False)[0].astype(mm_dtype), pre2)
  g = both(lambda i, h: _dot(b_t[i], h, NN_DIMS, precision), hid2)
  scale = math.sqrt(g[0].shape[0])
  tanh_p = jnp.tanh(g[0] * g[1] * (1.0 / scale))
  saved = [(hid1[i], pre1[i], norm2[i][0], norm2[i][1], x_aug2[i], pre2[i], hid2[i])
           for i in range(2)] if keep else None
  return scale * tanh_p, (x_hat1, inv1, x_aug1, saved, g, tanh_p)


def _unpack(values, vpu_biases):
  """(w1, c1, a_t, w2, c2, b_t) from the kernels' weight operands (or their
  gradients), c None where the bias is a column of w."""
  it = iter(values)
  w1 = next(it)
  c1 = next(it) if vpu_biases[0] else None
  a, w2 = next(it), next(it)
  c2 = next(it) if vpu_biases[1] else None
  return w1, c1, a, w2, c2, next(it)


def _features_forward_kernel(x_ref, *refs, mm_dtype, gelu_dtype, precision, vpu_biases):
  n_w = len(refs) - 1
  w_refs, (f_ref,) = refs[:n_w], refs[n_w:]
  w = _unpack([r[...] for r in w_refs], vpu_biases)
  f, _ = _forward_tile(x_ref[...], w, mm_dtype, gelu_dtype, precision, keep=False)
  f_ref[...] = f.astype(f_ref.dtype)


def _features_backward_kernel(x_ref, df_ref, *refs, mm_dtype, gelu_dtype, precision,
                              vpu_biases):
  n_w = (len(refs) - 1) // 2
  w_refs, (dx_ref,), dw_refs = refs[:n_w], refs[n_w:n_w + 1], refs[n_w + 1:]
  w = _unpack([r[...] for r in w_refs], vpu_biases)
  w1_t, c1, a_t, w2_t, c2, b_t = w
  dw1, dc1, da, dw2, dc2, db = _unpack(dw_refs, vpu_biases)
  bias_grad = lambda d: jnp.sum(d.astype(jnp.float32), axis=1, keepdims=True)
  head_dim = x_ref.shape[0]

  @pl.when(pl.program_id(2) == 0)
  def _zero():
    for ref in dw_refs:
      ref[...] = jnp.zeros(ref.shape, ref.dtype)

  _, (x_hat1, inv1, x_aug1, saved, g, tanh_p) = _forward_tile(
      x_ref[...], w, mm_dtype, gelu_dtype, precision, keep=True)
  # d/dp sqrt(r) tanh(p / sqrt(r)) = 1 - tanh^2, p = g1 g2
  dp = df_ref[...].astype(jnp.float32) * (1.0 - tanh_p * tanh_p)
  dg = (dp * g[1], dp * g[0])
  dx_hat1 = None
  for i in range(2):
    hid1, pre1, x_hat2, inv2, x_aug2, pre2, hid2 = saved[i]
    dg_mm = dg[i].astype(mm_dtype)
    db[i] += _dot(dg_mm, hid2, NT_DIMS, precision)
    dpre2 = (_dot(b_t[i], dg_mm, TN_DIMS, precision).astype(gelu_dtype)
             * twice_gelu(pre2, gelu_dtype, slope=True)[1]).astype(mm_dtype)
    dw2[i] += _dot(dpre2, x_aug2, NT_DIMS, precision)
    if dc2 is not None:
      dc2[i] += bias_grad(dpre2)
    dx_hat2 = _dot(w2_t[i], dpre2, TN_DIMS, precision)[:x_hat2.shape[0]]
    dy = _normalized_rows_vjp(dx_hat2, x_hat2, inv2).astype(mm_dtype)
    da[i] += _dot(dy, hid1, NT_DIMS, precision)
    dpre1 = (_dot(a_t[i], dy, TN_DIMS, precision).astype(gelu_dtype)
             * twice_gelu(pre1, gelu_dtype, slope=True)[1]).astype(mm_dtype)
    dw1[i] += _dot(dpre1, x_aug1, NT_DIMS, precision)
    if dc1 is not None:
      dc1[i] += bias_grad(dpre1)
    part = _dot(w1_t[i], dpre1, TN_DIMS, precision)[:head_dim]
    dx_hat1 = part if dx_hat1 is None else dx_hat1 + part
  dx_ref[...] = _normalized_rows_vjp(dx_hat1, x_hat1, inv1).astype(dx_ref.dtype)


def _specs(weights, head_dim, sketch_dim, tile):
  token = lambda d: pl.BlockSpec((None, None, d, tile), lambda b, n, t: (b, n, 0, t))
  whole = lambda a: pl.BlockSpec(a.shape, lambda b, n, t: (0,) * a.ndim)
  per_head = lambda a: pl.BlockSpec((None, None) + a.shape, lambda b, n, t: (b, n) + (0,) * a.ndim)
  return token(head_dim), token(sketch_dim), [whole(a) for a in weights], per_head


def _vpu_biases(weights, mxu_width):
  """Per Dense input layer (first block's, second block's): whether the VPU
  adds its bias (`bias_on_mxu`)."""
  head_dim, sketch_dim = weights[0].shape[2], weights[3].shape[2]
  return tuple(not bias_on_mxu(rows, mxu_width) for rows in (head_dim, sketch_dim))


def _matmul_operands(weights, mm_dtype, vpu_biases):
  """The folded weights as the kernels take them: each input layer's kernel in
  mm_dtype with its bias as one more column (then zeros up to ONES_ROWS), or,
  where the VPU adds it, the kernel and the bias [2, h, 1] in float32 after it:
  (w1 [2, h, H (+ ONES_ROWS)], [c1,] a_t, w2 [2, h, r (+ ONES_ROWS)], [c2,] b_t)."""
  w1_t, c1, a_t, w2_t, c2, b_t = weights
  aug = lambda w, c: jnp.concatenate(
      [w, c, jnp.zeros(w.shape[:2] + (ONES_ROWS - 1,), w.dtype)], axis=2).astype(mm_dtype)
  layer = lambda w, c, vpu: [w.astype(mm_dtype), c] if vpu else [aug(w, c)]
  return tuple(layer(w1_t, c1, vpu_biases[0]) + [a_t.astype(mm_dtype)]
               + layer(w2_t, c2, vpu_biases[1]) + [b_t.astype(mm_dtype)])


def _weight_gradients(d_ops, weights, vpu_biases):
  """The kernels' gradients of `_matmul_operands` -> those of the folded weights."""
  dw1, dc1, da, dw2, dc2, db = _unpack(d_ops, vpu_biases)
  head_dim, sketch_dim = weights[0].shape[2], weights[3].shape[2]
  split = lambda dw, dc, rows: (dw, dc) if dc is not None else (dw[..., :rows],
                                                               dw[..., rows:rows + 1])
  return split(dw1, dc1, head_dim) + (da,) + split(dw2, dc2, sketch_dim) + (db,)


def _features_flops(b_, n, t, head_dim, hidden, sketch_dim):
  per_token = 2 * 2 * hidden * (head_dim + 3 * sketch_dim)   # two branches, four Dense layers
  return b_ * n * t * per_token


def _gelu_dtype(tiles: FeatureTiles, mm_dtype):
  return jnp.dtype(jnp.bfloat16 if tiles.bf16_gelu and mm_dtype == jnp.bfloat16
                   else jnp.float32)


@batch_partitioned(unbatched=("weights",))
def _forward_call(weights, x_t, tiles: FeatureTiles, interpret):
  b_, n, head_dim, t = x_t.shape
  hidden, sketch_dim = weights[0].shape[1], weights[2].shape[1]
  mm_dtype = x_t.dtype
  vpu_biases = _vpu_biases(weights, tiles.mxu_width)
  w = _matmul_operands(weights, mm_dtype, vpu_biases)
  x_spec, f_spec, w_specs, _ = _specs(w, head_dim, sketch_dim, tiles.tile)
  return pallas_call(
      functools.partial(_features_forward_kernel, mm_dtype=mm_dtype,
                        gelu_dtype=_gelu_dtype(tiles, mm_dtype),
                        precision=precision_for(mm_dtype), vpu_biases=vpu_biases),
      grid=(b_, n, t // tiles.tile),
      in_specs=[x_spec] + w_specs,
      out_specs=f_spec,
      out_shape=jax.ShapeDtypeStruct((b_, n, sketch_dim, t), x_t.dtype),
      compiler_params=_compat.TPUCompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel"),
          vmem_limit_bytes=tiles.vmem_limit_bytes),
      interpret=interpret,
      cost_estimate=_compat.CostEstimate(
          flops=_features_flops(b_, n, t, head_dim, hidden, sketch_dim),
          transcendentals=b_ * n * t * (2 * hidden + 1) * 2,
          bytes_accessed=x_t.size * x_t.dtype.itemsize * (head_dim + sketch_dim) // head_dim),
      name="polysketch_learned_features",
  )(x_t, *w)


@batch_partitioned(unbatched=("weights",), summed=(1,))
def _backward_call(weights, x_t, df_t, tiles: FeatureTiles, interpret):
  b_, n, head_dim, t = x_t.shape
  hidden, sketch_dim = weights[0].shape[1], weights[2].shape[1]
  mm_dtype = x_t.dtype
  vpu_biases = _vpu_biases(weights, tiles.mxu_width)
  w = _matmul_operands(weights, mm_dtype, vpu_biases)
  x_spec, f_spec, w_specs, per_head = _specs(w, head_dim, sketch_dim, tiles.tile)
  outs = pallas_call(
      functools.partial(_features_backward_kernel, mm_dtype=mm_dtype,
                        gelu_dtype=_gelu_dtype(tiles, mm_dtype),
                        precision=precision_for(mm_dtype), vpu_biases=vpu_biases),
      grid=(b_, n, t // tiles.tile),
      in_specs=[x_spec, f_spec] + w_specs,
      out_specs=[x_spec] + [per_head(a) for a in w],
      out_shape=[jax.ShapeDtypeStruct(x_t.shape, x_t.dtype)]
      + [jax.ShapeDtypeStruct((b_, n) + a.shape, jnp.float32) for a in w],
      compiler_params=_compat.TPUCompilerParams(
          # the token axis accumulates the weight gradients of a (batch row, head)
          dimension_semantics=("parallel", "parallel", "arbitrary"),
          vmem_limit_bytes=tiles.vmem_limit_bytes),
      interpret=interpret,
      cost_estimate=_compat.CostEstimate(
          flops=3 * _features_flops(b_, n, t, head_dim, hidden, sketch_dim),
          transcendentals=b_ * n * t * (2 * hidden + 1) * 2,
          bytes_accessed=x_t.size * x_t.dtype.itemsize * (2 * head_dim + sketch_dim) // head_dim),
      name="polysketch_learned_features_vjp",
  )(x_t, df_t, *w)
  return outs[0], _weight_gradients([d.sum(axis=(0, 1)) for d in outs[1:]], weights,
                                    vpu_biases)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _features_t(weights, x_t, tiles, interpret):
  return _forward_call(weights, x_t, tiles, interpret)


def _features_t_fwd(weights, x_t, tiles, interpret):
  return _features_t(weights, x_t, tiles, interpret), (weights, x_t)


def _features_t_bwd(tiles, interpret, residuals, df_t):
  weights, x_t = residuals
  dx_t, dw = _backward_call(weights, x_t, df_t, tiles, interpret)
  return tuple(d.astype(a.dtype) for d, a in zip(dw, weights)), dx_t


_features_t.defvjp(_features_t_fwd, _features_t_bwd)


def learned_features(weights: tuple, x: jax.Array, tiles: FeatureTiles, *,
                     interpret: bool = False) -> jax.Array:
  """The learned sketch's features of x [B, T, N, H] (bfloat16 or float32) with
  the folded weights (module docstring): [B, T, N, r] in x's dtype.
  Differentiable in reverse mode into the weights and x. T is padded to a
  multiple of the tile: zero tokens normalise to zero, and their zero
  cotangents add nothing to the weights' gradients."""
  t = x.shape[1]
  padded = -(-t // tiles.tile) * tiles.tile
  x_t = jnp.transpose(x, (0, 2, 3, 1))                                  # [B, N, H, T]
  if padded != t:
    x_t = jnp.pad(x_t, ((0, 0), (0, 0), (0, 0), (0, padded - t)))
  f_t = _features_t(tuple(weights), x_t, tiles, interpret)
  return jnp.transpose(f_t[..., :t], (0, 3, 1, 2))
