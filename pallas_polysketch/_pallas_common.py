"""Pieces shared by the forward and backward PolySketch Pallas kernels.

Conventions: a `_t` suffix means tokens on the lanes ((D, b) tiles); phi is
the self-tensored feature f (x) f; "augmented" matrices carry the normaliser as
extra rows (a row of ones below V^T, dden below dnum^T; see `_pallas_forward`).

Grouped-query attention: the kernels run on a grid over kv heads; query-side
blocks carry the G query heads of the group as a leading block axis, viewed
for free from [B, N, ...] as [B, K, G, ...] (query head n = kv head n // G).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_polysketch import _compat
from pallas_polysketch._partitioning import batch_partitioned
from pallas_polysketch.tpu_config import NORMALISER_ROWS

NT_DIMS = (((1,), (1,)), ((), ()))   # a @ b^T
TN_DIMS = (((0,), (0,)), ((), ()))   # a^T @ b
NN_DIMS = (((1,), (0,)), ((), ()))   # a @ b
HIGHEST = jax.lax.Precision.HIGHEST


def pallas_call(kernel, **kwargs):
  """`pl.pallas_call`, with the kernel and its index maps traced with 32-bit
  defaults: under `jax_enable_x64` a Python int or float in them becomes a
  64-bit value (a roll's shift, an index, a `where`'s 0.0), which Mosaic cannot
  lower, although interpret mode runs it."""
  call = pl.pallas_call(kernel, **kwargs)

  def run(*args):
    with jax.enable_x64(False):
      return call(*args)
  return run


def precision_for(dtype):
  """Full f32 products for f32 operands (Mosaic's default may use bf16 passes)."""
  return HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def split_operand(x, split):
  """A float32 operand of a cancelling product as a tuple of MXU operands.

  split: (x,) in float32, multiplied at HIGHEST (f32 kernels); or x as bf16
  hi + lo, hi = bf16(x), lo = bf16(x - hi), which carries x to about 2^-17
  (bf16 kernels); an operand that is exactly bf16 already (V, the ones row)
  gives (bf16(x),)."""
  x = x.astype(jnp.float32)
  if split == "exact":
    return (x.astype(jnp.bfloat16),)
  if not split:
    return (x,)
  hi = x.astype(jnp.bfloat16)
  return hi, (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)


def split_dot(a_parts, b_parts, dims, stack=None):
  """sum of the products of `split_operand` parts, f32 accumulation, without
  lo x lo (below 2^-16 of the result): one pass at HIGHEST for float32 parts
  (six bf16 passes in Mosaic), three bf16 passes for two split operands, two
  when one is exact. The backward's cancelling state products take it: bf16
  rounding of their float32 operands cost 20x in dq at small value spreads
  (BUILD_NOTES, issue 11), HIGHEST costs 3x the kernel's cycles.
  stack: the bf16 terms as one product stacked along the contraction
  (`_stacked_dot`), for 256-wide MXUs (`ResolvedTiles.stack_split_products`)."""
  terms = [(a, b) for i, a in enumerate(a_parts) for j, b in enumerate(b_parts) if i + j <= 1]
  if len(terms) > 1 and stack:
    return _stacked_dot(terms, dims)
  out = None
  for a, b in terms:
    prec = HIGHEST if a.dtype == jnp.float32 and b.dtype == jnp.float32 else None
    term = jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32, precision=prec)
    out = term if out is None else out + term
  return out


def _pad_to(x, axis, size):
  if x.shape[axis] == size:
    return x
  pad = list(x.shape)
  pad[axis] = size - x.shape[axis]
  return jnp.concatenate([x, jnp.zeros(pad, x.dtype)], axis=axis)


def _stacked_dot(terms, dims):
  """The bf16 terms of `split_dot` as one MXU product, stacked along the
  contraction, each part zero-padded to a multiple of 128: on a 256-wide MXU
  a contraction of H + 16 = 80 fills a third of the array, three stacked
  parts (384) two passes, not three."""
  (ca,), (cb,) = dims[0]
  width = -(-terms[0][0].shape[ca] // 128) * 128
  a = jnp.concatenate([_pad_to(x, ca, width) for x, _ in terms], axis=ca)
  b = jnp.concatenate([_pad_to(y, cb, width) for _, y in terms], axis=cb)
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def phi_form_dtype(feature_dtype, mm_dtype, narrow: bool):
  """The dtype phi = f (x) f is formed in: float32 unless `narrow` and the
  features already are in mm_dtype. The product of two bf16 numbers is exact
  in f32, so forming it in bf16 gives the same bits with half the vregs, a win
  where the VPU has bf16 (v6e; `TileConfig.bf16_phi`)."""
  narrow = narrow and jnp.dtype(feature_dtype) == jnp.dtype(mm_dtype)
  return jnp.dtype(mm_dtype if narrow else jnp.float32)


def phi_t(f_t, mm_dtype=jnp.float32, *, narrow=False):
  """(r, b) -> (r^2, b): phi^T[a r + c, t] = f[a, t] f[c, t], returned in mm_dtype,
  formed in `phi_form_dtype`.

  The reshape merges leading dims only (layout-free for r a multiple of 8).
  """
  f_t = f_t.astype(phi_form_dtype(f_t.dtype, mm_dtype, narrow))
  r, b = f_t.shape
  return (f_t[:, None, :] * f_t[None, :, :]).reshape(r * r, b).astype(mm_dtype)


# Features per tile of `sym_pairs`: the 32-bit sublane tile. Measured best for
# r = 32 and 64 on v5e and v6e, bf16 phi included (16 and 4 cost more).
SYM_TILE = 8


def sym_pairs(r: int, tile: int = SYM_TILE) -> list[tuple[int, int]]:
  """The (a, c) feature pairs `phi_sym_t` keeps, in row order.

  phi(a, c) = phi(c, a), so a pair whose c lies in a later tile of `tile`
  features than a is kept once (its q side doubled) and the mirror pair is
  dropped; inside a's own tile all pairs stay, so every piece is whole tiles
  (no unaligned sublane concatenation). r = 32: 640 of the 1024 pairs;
  r = 64: 2304 of 4096. r not a multiple of tile: all r^2 pairs.
  """
  if r % tile:
    return [(a, c) for a in range(r) for c in range(r)]
  return [(a, c) for a in range(r) for c in range((a // tile) * tile, r)]


def sym_gather_indices(r: int, tile: int = SYM_TILE, pairs=None):
  """(kept, mirror, to_full) int32 index arrays on an r^2 axis (a r + c):
  state_sym = (state[..., kept] + state[..., mirror]) / 2 (the symmetric part,
  all that phi reads), state_full = state_sym[..., to_full]."""
  pairs = sym_pairs(r, tile) if pairs is None else pairs
  where = {}
  for j, p in enumerate(pairs):
    where.setdefault(p, j)
  kept = np.array([a * r + c for a, c in pairs], np.int32)
  mirror = np.array([c * r + a for a, c in pairs], np.int32)
  to_full = np.array([where.get((a, c), where.get((c, a))) for a in range(r) for c in range(r)],
                     np.int32)
  return kept, mirror, to_full


def sym_state(state, axis, pairs=None):
  """A state on all r^2 pairs (at `axis`) -> its symmetric part on the kept
  pairs (`sym_pairs`, or the given ones), all that phi reads:
  (S[a, c] + S[c, a]) / 2."""
  kept, mirror, _ = sym_gather_indices(math.isqrt(state.shape[axis]), pairs=pairs)
  return (jnp.take(state, kept, axis=axis) + jnp.take(state, mirror, axis=axis)) * 0.5


def full_state(state_sym, r, axis, pairs=None):
  """The inverse on symmetric states: kept pairs (at `axis`) -> all r^2 pairs."""
  _, _, to_full = sym_gather_indices(r, pairs=pairs)
  return jnp.take(state_sym, to_full, axis=axis)


def phi_sym_t(f_t, form_dtype, mm_dtype, *, query):
  """(r, b) -> (R, b): phi^T restricted to `sym_pairs` rows, formed in form_dtype.

  The query side doubles the pairs whose mirror was dropped (exact: a power
  of two), so phi_sym_q . phi_sym_k = phi_q . phi_k for every token pair.
  """
  f = f_t.astype(form_dtype)
  r, b = f.shape
  tile = SYM_TILE
  if r % tile:
    return (f[:, None, :] * f[None, :, :]).reshape(r * r, b).astype(mm_dtype)
  twice = f + f if query else f
  pieces = []
  for a in range(r):
    start = (a // tile) * tile
    end = start + tile
    pieces.append(f[a:a + 1] * f[start:end])
    if end < r:
      pieces.append(twice[a:a + 1] * f[end:])
  return jnp.concatenate(pieces, axis=0).astype(mm_dtype)


def _rot_tile(r: int, packed: bool) -> int | None:
  """Rows per tile of `rot_plan`: a whole vreg of the form dtype (16 packed
  bf16 rows, 8 float32 rows); None where r is no multiple of it."""
  if packed and r % 16 == 0:
    return 16
  return 8 if r % 8 == 0 else None


@functools.lru_cache(maxsize=None)
def rot_plan(r: int, packed: bool, merged: bool = True):
  """The pieces `phi_rot_t` forms, one vreg-tile each, and the pairs they hold.

  Features come in tiles of t rows (t = 8 float32 rows, or 16 bf16 rows packed
  two to a 32-bit sublane, `packed`). A piece is tile i times tile k rotated
  by m sublanes (and, packed, with the two rows of each sublane swapped): row
  x of tile i meets row rho(x) of tile k. Inside a tile, the rotations by
  m = 0 .. 4 (swapped or not) meet every pair of its features; across tiles
  i < k all 8 rotations (x 2) meet each pair once. So every piece is a whole
  vreg (no sublane shuffles but the rotations) and r = 32 keeps 576 rows
  packed, 528 in float32 (against `sym_pairs`' 640): r (r + 1) / 2, every pair
  once. In float32 the rotation by 4 inside a tile meets each of its 4 pairs
  twice, so two tiles i < k share one such piece (`merged`): rows 0..3 from
  tile i, rows 4..7 from tile k, each with its partner 4 sublanes away,
  u * roll(v, 4) for u = (f_i above, f_k below) and v = (f_k above, f_i below).

  Returns (pieces, pairs): pieces a tuple of (i, k, m, swap, merged, weight),
  weight the query side's factor (2: the mirror pair is not kept; 1: the
  diagonal, or a pair every row of the piece holds twice); pairs the (a, c)
  of each row. None where r is no multiple of 8. merged=False keeps the
  float32 rotations by 4 apart (544 rows at r = 32; `ResolvedTiles.merged_rotations`).
  """
  t = _rot_tile(r, packed)
  if t is None:
    return None
  packed = t == 16
  n = r // t
  rows = np.arange(t)

  def partner(m, swap):
    if packed:
      j, h = rows // 2, rows % 2
      return 2 * ((j - m) % 8) + (1 - h if swap else h)
    return (rows - m) % 8

  specs = []
  for i in range(n):
    for k in range(i, n):
      for m in range(5 if k == i else 8):
        for swap in ((False, True) if packed else (False,)):
          if k == i and m == 4 and merged and not packed and (i ^ 1) < n:
            if i % 2 == 0:                       # tiles i and i + 1 share one piece
              specs.append((i, i + 1, 4, False, True))
            continue
          specs.append((i, k, m, swap, False))

  def rows_of_piece(i, k, m, swap, merged):
    if merged:
      return [(i * t + x, i * t + x + 4) for x in range(4)] + [
          (k * t + x, k * t + x - 4) for x in range(4, 8)]
    return [(i * t + x, k * t + y) for x, y in zip(rows, partner(m, swap))]

  rows_of = [rows_of_piece(*spec) for spec in specs]
  count = {}
  for piece in rows_of:
    for a, c in piece:
      key = (min(a, c), max(a, c))
      count[key] = count.get(key, 0) + 1
  assert len(count) == r * (r + 1) // 2, "rot_plan misses pairs"
  pieces, pairs = [], []
  for spec, piece in zip(specs, rows_of):
    w = {(1 if a == c else 2) / count[(min(a, c), max(a, c))] for a, c in piece}
    assert len(w) == 1 and w <= {1.0, 2.0}, (spec, w)
    pieces.append(spec + (int(w.pop()),))
    pairs.extend((int(a), int(c)) for a, c in piece)
  return tuple(pieces), tuple(pairs)


def rot_pairs(r: int, packed: bool, merged: bool = True) -> list[tuple[int, int]]:
  """The (a, c) pairs of the rows of `phi_rot_t` (`sym_pairs` where r is no
  multiple of 8: all r^2 pairs)."""
  plan = rot_plan(r, packed, merged)
  return list(plan[1]) if plan else sym_pairs(r)


def rot_packed(*feature_dtypes) -> bool:
  """Whether `phi_rot_t` takes its pieces from 16-bit features (`rot_plan`)."""
  return all(jnp.dtype(d).itemsize == 2 for d in feature_dtypes)


def phi_rot_t(f_t, form_dtype, mm_dtype, *, query, packed, merged=True):
  """(r, b) -> (R, b): phi^T on the rows of `rot_pairs(r, packed)`, multiplied
  in form_dtype, the query side weighted as `phi_sym_t`'s, so
  phi_rot_q . phi_rot_k = phi_q . phi_k for every token pair.

  Every piece is a whole vreg (`rot_plan`): a feature tile times a sublane
  rotation of one (pltpu.roll); packed (16-bit features, `rot_packed`), the
  rotations and the swap of the two rows of a 32-bit sublane act on the
  features' 32-bit view (pltpu.bitcast), whatever dtype the products are
  formed in, so forming in bf16 or float32 gives the same rows and bits.
  `phi_sym_t`'s pieces of 8 rows instead broadcast single rows and realign
  half vregs.
  """
  r, b = f_t.shape
  plan = rot_plan(r, packed, merged)
  if plan is None:
    return phi_sym_t(f_t, form_dtype, mm_dtype, query=query)
  t = _rot_tile(r, packed)
  packed = t == 16
  f = f_t if packed else f_t.astype(form_dtype)
  tiles = [f[i * t:(i + 1) * t] for i in range(r // t)]
  if packed:
    words = [_compat.pltpu.bitcast(x, jnp.uint32) for x in tiles]
    swapped = [(w << 16) | (w >> 16) for w in words]
    tiles = [x.astype(form_dtype) for x in tiles]
  twice = [x + x for x in tiles] if query else tiles
  cache = {}

  def operand(k, m, swap):
    if (k, m, swap) not in cache:
      x = (swapped if swap else words)[k] if packed else tiles[k]
      x = _compat.pltpu.roll(x, m, 0) if m else x
      cache[(k, m, swap)] = (_compat.pltpu.bitcast(x, f_t.dtype).astype(form_dtype)
                             if packed else x)
    return cache[(k, m, swap)]

  pieces = []
  for i, k, m, swap, merged, w in plan[0]:
    left = twice if w == 2 else tiles
    if merged:
      upper = _upper_rows(tiles[i].shape)
      pieces.append(jnp.where(upper, left[i], left[k])
                    * _compat.pltpu.roll(jnp.where(upper, tiles[k], tiles[i]), m, 0))
    else:
      pieces.append(left[i] * operand(k, m, swap))
  return jnp.concatenate(pieces, axis=0).astype(mm_dtype)


def _upper_rows(shape):
  """(8, b) bool: rows 0..3, the half of a `merged` piece from its tile i."""
  return jax.lax.broadcasted_iota(jnp.int32, shape, 0) < shape[0] // 2


def phi_rot_vjp(dphi, f_t, *, query, merged=True):
  """Cotangent of `phi_rot_t` with packed=False: (R, b), (r, b) -> (r, b) float32.

  A piece is (w f_i) * roll(f_k, m) (tiles of 8 float32 rows), so it sends
  w dphi * roll(f_k, m) to tile i and roll(w dphi * f_i, -m) to tile k: whole
  vregs and sublane rotations, as the forward's pieces (`phi_sym_vjp` instead
  sums each feature's row over sublanes). r no multiple of 8: `phi_sym_vjp`.
  """
  r, b = f_t.shape
  plan = rot_plan(r, False, merged)
  if plan is None:
    return phi_sym_vjp(dphi, f_t, query=query)
  t = _rot_tile(r, False)
  f = f_t.astype(jnp.float32)
  dphi = dphi.astype(jnp.float32)
  tiles = [f[i * t:(i + 1) * t] for i in range(r // t)]
  twice = [x + x for x in tiles] if query else None
  rolled = {}
  # Tile i's cotangent from pieces of weight 1 and of weight 2 (doubled once).
  to_i = [[None, None] for _ in tiles]
  to_k = [None for _ in tiles]
  add = lambda acc, x: x if acc is None else acc + x
  for j, (i, k, m, _, merged, w) in enumerate(plan[0]):
    w = w if query else 1
    d = dphi[j * t:(j + 1) * t]
    if merged:
      # u * roll(v, 4) with u's rows from tiles i | k (above | below), v's
      # from tiles k | i: tile i takes u's cotangent above and v's below.
      upper = _upper_rows(d.shape)
      to_u = d * _compat.pltpu.roll(jnp.where(upper, tiles[k], tiles[i]), m, 0)
      to_u = to_u + to_u if w == 2 else to_u
      left = twice if w == 2 else tiles
      to_v = _compat.pltpu.roll(d * jnp.where(upper, left[i], left[k]), t - m, 0)
      to_k[i] = add(to_k[i], jnp.where(upper, to_u, to_v))
      to_k[k] = add(to_k[k], jnp.where(upper, to_v, to_u))
      continue
    if (k, m) not in rolled:
      rolled[(k, m)] = _compat.pltpu.roll(tiles[k], m, 0) if m else tiles[k]
    to_i[i][w - 1] = add(to_i[i][w - 1], d * rolled[(k, m)])
    back = d * twice[i] if w == 2 else d * tiles[i]
    to_k[k] = add(to_k[k], _compat.pltpu.roll(back, t - m, 0) if m else back)
  out = []
  for (ones, twos), ks in zip(to_i, to_k):
    acc = ks
    acc = add(acc, ones) if ones is not None else acc
    acc = add(acc, twos + twos) if twos is not None else acc
    out.append(acc)
  return jnp.concatenate(out, axis=0)


def phi_sym_vjp(dphi, f_t, *, query):
  """Cotangent of phi_sym_t: (R, b), (r, b) -> (r, b) float32.

  Row (a, c) of phi_sym is w f_a f_c (w = 2 on the query side's doubled
  pairs, else 1), so it sends w dphi f_c to feature a and w dphi f_a to c.
  """
  f = f_t.astype(jnp.float32)
  dphi = dphi.astype(jnp.float32)
  r, b = f.shape
  tile = SYM_TILE
  if r % tile:
    return phi_t_vjp(dphi, f_t)
  doubled = 2.0 if query else 1.0
  to_c = [jnp.zeros((tile, b), jnp.float32) for _ in range(r // tile)]   # the f_a dphi terms
  to_a = []                                                               # the f_c dphi terms
  j = 0
  for a in range(r):
    ta = a // tile
    start = ta * tile
    fa = f[a:a + 1]
    d = dphi[j:j + r - start]
    j += r - start
    row = jnp.sum(d[:tile] * f[start:start + tile], axis=0, keepdims=True)
    to_c[ta] = to_c[ta] + fa * d[:tile]
    for t in range(ta + 1, r // tile):
      piece = d[(t - ta) * tile:(t - ta + 1) * tile]
      row = row + doubled * jnp.sum(piece * f[t * tile:(t + 1) * tile], axis=0, keepdims=True)
      to_c[t] = to_c[t] + (doubled * fa) * piece
    to_a.append(row)
  return jnp.concatenate([to_c[t] + jnp.concatenate(to_a[t * tile:(t + 1) * tile], axis=0)
                          for t in range(r // tile)], axis=0)


def phi_t_vjp(dphi_t, f_t):
  """Cotangent of phi_t: (r^2, b), (r, b) -> (r, b) float32; df = (M + M^T) f."""
  r, b = f_t.shape
  f = f_t.astype(jnp.float32)
  m = dphi_t.reshape(r, r, b)
  return jnp.sum(m * f[None, :, :], axis=1) + jnp.sum(m * f[:, None, :], axis=0)


def sub_block(ref, axis, s, block, count):
  """The view of block s of a ref that holds `count` blocks of `block` tokens
  on `axis` (a kernel's grid step walking several blocks)."""
  if count == 1:
    return ref
  idx = [slice(None)] * len(ref.shape)
  idx[axis] = pl.ds(s * block, block)
  return ref.at[tuple(idx)]


def augment_v_t(v_t):
  """(H, b) -> (H + 16, b): [V^T; 1; 0]."""
  h, b = v_t.shape
  ones = jnp.ones((1, b), v_t.dtype)
  zeros = jnp.zeros((NORMALISER_ROWS - 1, b), v_t.dtype)
  return jnp.concatenate([v_t, ones, zeros], axis=0)


def augment_g_t(dnum_t, dden_row):
  """(H, b), (1, b) -> (H + 16, b): [dnum^T; dden^T; 0] in the dtype of dnum."""
  h, b = dnum_t.shape
  zeros = jnp.zeros((NORMALISER_ROWS - 1, b), dnum_t.dtype)
  return jnp.concatenate([dnum_t, dden_row.astype(dnum_t.dtype), zeros], axis=0)


def causal_mask(n, *, lower):
  """(n, n) bool for a diagonal tile: row >= col (lower) or row <= col (upper)."""
  row = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
  return row >= col if lower else row <= col


def local_weights_t(q, k, fq_t, fk_t, *, degree, local_exact, diagonal, q_cols=False):
  """Transposed local weights L^T[j, i] of one (key tile, query tile) pair, f32.

  q, k: (n, H) tiles; fq_t, fk_t: (r, n). `diagonal` zeroes j > i.
  """
  if local_exact:
    s_t = jax.lax.dot_general(k, q, NN_DIMS if q_cols else NT_DIMS,
                              preferred_element_type=jnp.float32,
                              precision=precision_for(q.dtype))
    w_t = jax.lax.integer_pow(s_t, degree)
  else:
    s_t = jax.lax.dot_general(fk_t, fq_t, TN_DIMS, preferred_element_type=jnp.float32,
                              precision=precision_for(fq_t.dtype))
    w_t = s_t * s_t
  if diagonal:
    w_t = jnp.where(causal_mask(w_t.shape[0], lower=False), w_t, 0.0)
  return w_t


def _outer_sum_kernel(*refs, kind):
  """Sum over all blocks of Phi^T X: (r^2, H + 16), X = [V, 1] or [dnum, dden].

  kind "g": the query-side blocks hold the G heads of the group, summed too."""
  *in_refs, f_t_ref, out_ref = refs

  @pl.when(pl.program_id(2) == 0)
  def _():
    out_ref[...] = jnp.zeros_like(out_ref)

  if kind == "v":
    pairs = [(augment_v_t(in_refs[0][...]), f_t_ref[...])]
  else:
    pairs = [(augment_g_t(in_refs[0][g], in_refs[1][g]), f_t_ref[g])
             for g in range(f_t_ref.shape[0])]
  for rows, f_t in pairs:
    rows = rows.astype(jnp.float32) if kind == "g" else rows
    phi = phi_t(f_t).astype(rows.dtype)
    out_ref[...] += jax.lax.dot_general(phi, rows, NT_DIMS,
                                        preferred_element_type=jnp.float32,
                                        precision=precision_for(rows.dtype))


@batch_partitioned()
def outer_sum(rows_t, f_t, extra_row=None, *, block_size, vmem_limit_bytes, interpret):
  """Whole-sequence [S, z] (rows_t = V^T) or [R, rho] (rows_t = dnum^T, extra_row = dden).

  Args:
    rows_t: [B, K, H, T] (kind v) or [B, K, G, H, T] (kind g);
    extra_row: None or [B, K, G, 1, T]; f_t: [B, K, r, T] or [B, K, G, r, T].
  Returns:
    [B, K, r^2, H + 16] float32 (kind g: summed over the group). Kind g runs
    its products in float32: [R, rho] later meets V in a sum that cancels.
  """
  kind = "v" if extra_row is None else "g"
  b_, kv = rows_t.shape[:2]
  d, t = rows_t.shape[-2:]
  r = f_t.shape[-2]
  lead = () if kind == "v" else (rows_t.shape[2],)
  col = lambda dd: pl.BlockSpec((None, None, *lead, dd, block_size),
                                lambda bi, ni, ti: (bi, ni, *(0,) * len(lead), 0, ti))
  out_shape = jax.ShapeDtypeStruct((b_, kv, r * r, d + NORMALISER_ROWS), jnp.float32)
  ins = (rows_t, f_t) if extra_row is None else (rows_t, extra_row, f_t)
  in_specs = [col(d), col(r)] if extra_row is None else [col(d), col(1), col(r)]
  group = lead[0] if lead else 1
  return pallas_call(
      functools.partial(_outer_sum_kernel, kind=kind),
      grid=(b_, kv, t // block_size),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, None, r * r, d + NORMALISER_ROWS),
                             lambda bi, ni, ti: (bi, ni, 0, 0)),
      out_shape=out_shape,
      compiler_params=_compat.TPUCompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary"),
          vmem_limit_bytes=vmem_limit_bytes),
      interpret=interpret,
      cost_estimate=_compat.CostEstimate(
          flops=b_ * kv * group * t * (2 * r * r + 2 * r * r * (d + NORMALISER_ROWS)),
          transcendentals=0,
          bytes_accessed=nbytes(*ins, out_shape)),
      name=f"polysketch_outer_sum_{kind}",
  )(*ins)


def kernel_view(x, *, on_lanes: bool, num_kv_heads: int | None = None):
  """[B, T, N, D] -> [B, N, D, T] (tokens on lanes) or [B, N, T, D] (tokens on
  rows), grouped to [B, K, G, ...] when num_kv_heads is given: the kernels'
  views, bitcasts where they match the compiler's default layout."""
  x = jnp.transpose(x, (0, 2, 3, 1) if on_lanes else (0, 2, 1, 3))
  return x if num_kv_heads is None else group_view(x, num_kv_heads)


def public_view(x, *, on_lanes: bool):
  """The inverse of kernel_view: [B, N|K, (G,) D, T] or [B, N|K, (G,) T, D]
  -> [B, T, N, D] (a group axis is merged back into the heads)."""
  b_, heads = x.shape[0], x.shape[1] * (x.shape[2] if x.ndim == 5 else 1)
  x = x.reshape((b_, heads) + x.shape[-2:])
  return jnp.transpose(x, (0, 3, 1, 2) if on_lanes else (0, 2, 1, 3))


def nbytes(*arrays) -> int:
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in arrays)


def group_view(x, num_kv_heads):
  """[B, N, ...] -> [B, K, G, ...] (free: query head n = kv head n // G)."""
  return x.reshape(x.shape[0], num_kv_heads, x.shape[1] // num_kv_heads, *x.shape[2:])
