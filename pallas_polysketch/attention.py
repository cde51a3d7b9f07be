"""PolySketch attention (DESIGN §1.3): the public op and its dispatch.

Two backends compute the same three things, each in its own state format:
causal attention from a given prefix state, the whole-sequence state sum, and
the non-causal read of a state. Everything else composes them: non-causal
attention is a read of the state sum; context parallelism feeds causal
attention the exclusive prefix sum, over the devices of a mesh axis, of the
shards' state sums (a `psum` of them when non-causal); chunked prefill and
decoding (`decode.py`) start from a state and keep one.

Packed segments (`segment_ids`) run a walk over the blocks whose state resets
at segment starts (`_segments.py`), from a given segment-running state and
block -1: zeros at a sequence's start; under context parallelism the
segmented exclusive prefix, over the devices, of the shards' transitions, and
the previous shard's last block. Each backend provides the walk itself:
`_segments.segment_walk_xla`, and the Pallas kernel of `_pallas_segments.py`.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_polysketch import _pallas, _pallas_segments, _segments, _validation, _xla
from pallas_polysketch import tpu_config
from pallas_polysketch._platform import require_tpu
from pallas_polysketch.polynomial import divide_by_denominator

IMPLEMENTATIONS = (None, "xla", "pallas")


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def pad_seq(x, seq_len):
  pad = seq_len - x.shape[1]
  if pad == 0:
    return x
  return jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))


@dataclasses.dataclass(frozen=True)
class Config:
  """The static arguments of one call (hashable: a jit static argument)."""
  degree: int
  block_size: int
  local_exact: bool
  bias: float
  interpret: object = False
  tiles: tpu_config.ResolvedTiles | None = None


class XlaBackend:
  """The blocked pure-JAX path. State: [S | z]^T over psi, [B, K, H + 1, d]."""

  def __init__(self, config: Config):
    self.c = config

  def zero_state(self, q, k, k_features):
    return _xla.zero_state(q, k, k_features.shape[-1])

  def causal(self, q, k, v, fq, fk, state, state_block=None):
    c = self.c
    if state is None:
      state = self.zero_state(q, k, fk)
    return _xla.causal_xla(q, k, v, fq, fk, state, degree=c.degree, block_size=c.block_size,
                           local_exact=c.local_exact, bias=c.bias, state_block=state_block)

  def state_sum(self, k, v, fk):
    return _xla.state_sum_xla(k, v, fk)

  def apply_state(self, q, fq, state):
    return _xla.apply_state_xla(q, fq, state, bias=self.c.bias)

  def segment_walk(self, q, k, v, fq, fk, starts, rel_block, state, previous, *,
                   local_exact, strict):
    c = self.c
    return _segments.segment_walk_xla(
        q, k, v, fq, fk, starts, rel_block, state, previous, block_size=c.block_size,
        degree=c.degree, local_exact=local_exact, strict=strict)

  def to_native(self, s, z):
    return _xla.state_to_psi(s, z)

  def from_native(self, state, head_dim, sketch_dim):
    return _xla.state_from_psi(state, sketch_dim)


class PallasBackend:
  """The fused TPU kernels. State: [S, z, 0] [B, K, r^2, H + 16] float32."""

  def __init__(self, config: Config):
    self.c = config

  def _static(self):
    c = self.c
    return (c.degree, c.block_size, c.local_exact, c.bias, c.tiles, c.interpret)

  def zero_state(self, q, k, k_features):
    r = k_features.shape[-1]
    return jnp.zeros((k.shape[0], k.shape[2], r * r, k.shape[3] + 16), jnp.float32)

  def causal(self, q, k, v, fq, fk, state, state_block=None):
    if state_block is None:
      return _pallas.causal(q, k, v, fq, fk, state, self._static()), None
    if state is None:
      state = self.zero_state(q, k, fk)
    return _pallas.causal_with_state(q, k, v, fq, fk, state, state_block, self._static())

  def state_sum(self, k, v, fk):
    c = self.c
    return _pallas.state_sum(v, fk, (c.block_size, c.tiles, c.interpret))

  def apply_state(self, q, fq, state):
    c = self.c
    return _pallas.apply_state(fq, state, (q.shape[-1], q.dtype),
                               (c.block_size, c.bias, c.tiles, c.interpret))

  def segment_walk(self, q, k, v, fq, fk, starts, rel_block, state, previous, *,
                   local_exact, strict):
    c = self.c
    return _pallas_segments.segment_walk(
        q, k, v, fq, fk, starts, rel_block, state, previous,
        (c.degree, c.block_size, local_exact, strict, c.tiles, c.interpret))

  def to_native(self, s, z):
    return _pallas.to_rz(s, z)

  def from_native(self, state, head_dim, sketch_dim):
    return _pallas.from_rz(state, head_dim)


def _shift_over_devices(x, axis_name, by, reverse=False):
  """Device i receives device i - by's x (i + by's when reverse); the devices
  with no such neighbour get zeros. x: a pytree of arrays."""
  size = jax.lax.axis_size(axis_name)
  pairs = [(i, i + by) for i in range(size - by)]
  if reverse:
    pairs = [(size - 1 - i, size - 1 - j) for i, j in pairs]
  return jax.lax.ppermute(x, axis_name, pairs)


def _exclusive_prefix_over_devices(x, axis_name, combine=jnp.add, reverse=False):
  """combine over the devices before this one on mesh axis axis_name (after it
  when reverse), in device order; zeros (the identity of `combine`) on the first.

  A log-depth scan of `ppermute`s (Hillis-Steele): one shift by a device, then
  log2(D) rounds that combine the partial result from 2^i devices back. Each
  device receives (1 + ceil(log2 D)) values, where an all-gather would bring
  all D - 1 of them (at D = 256, 9 against 255; bench/context_parallel.py);
  autodiff runs the same permutations backwards. x: a pytree; combine(earlier,
  later) must be associative with the zero tree as its identity."""
  size = jax.lax.axis_size(axis_name)
  if size == 1:
    return jax.tree.map(jnp.zeros_like, x)
  total = _shift_over_devices(x, axis_name, 1, reverse)
  step = 1
  while step < size:
    total = combine(_shift_over_devices(total, axis_name, step, reverse), total)
    step *= 2
  return total


def run_backend(backend, q, k, v, fq, fk, *, causal, initial_state=None,
                context_axis_name=None):
  """Attention on one backend; T a multiple of block_size. Returns o."""
  if not causal:
    state = backend.state_sum(k, v, fk)
    if context_axis_name is not None:
      state = jax.lax.psum(state, context_axis_name)
    return backend.apply_state(q, fq, state)
  if context_axis_name is not None:
    total = backend.state_sum(k, v, fk)
    before = _exclusive_prefix_over_devices(total, context_axis_name)
    initial_state = before if initial_state is None else initial_state + before
  o, _ = backend.causal(q, k, v, fq, fk, initial_state)
  return o


def _restart_then(earlier, later):
  """Composes two segment-running transitions (restart [B] int32, state): the
  state after both keeps `earlier`'s only if `later` did not restart."""
  (r0, s0), (r1, s1) = earlier, later
  return r0 | r1, jnp.where(r1[:, None, None, None] > 0, s1, s0 + s1)


def _segment_geometry(labels, block_size, axis_name, reverse):
  """Segment starts and relative blocks of a walk, int32 [B, T] each, and the
  previous device's last-block labels (NO_SEGMENT on the first device or
  without axis_name), all in this shard's positions. labels [B, T] in walk order."""
  b, t = block_size, labels.shape[1]
  changes = _segments.run_changes(labels)
  if axis_name is None:
    starts = _segments.starts_from_changes(changes)
    none = jnp.full((labels.shape[0], b), _segments.NO_SEGMENT, jnp.int32)
    return starts, _segments.relative_blocks(starts, b), none, none
  size = jax.lax.axis_size(axis_name)
  index = jax.lax.axis_index(axis_name)
  device = size - 1 - index if reverse else index
  first = device == 0
  prev_last = _shift_over_devices(labels[:, -1], axis_name, 1, reverse)
  changes = changes.at[:, 0].set(first | (labels[:, 0] != prev_last))
  # The start of the segment running into this shard: the last change on the
  # devices before it (global positions; one int per row and device).
  pos = jnp.arange(t, dtype=jnp.int32)
  offset = device * t
  last_change = jnp.where(changes.any(axis=1),
                          jnp.max(jnp.where(changes, pos, 0), axis=1) + offset,
                          _segments.NO_SEGMENT)
  gathered = jax.lax.all_gather(last_change, axis_name)            # [D, B]
  if reverse:
    gathered = jnp.flip(gathered, axis=0)
  before = (jnp.arange(size) < device)[:, None]
  incoming = jnp.max(jnp.where(before, gathered, _segments.NO_SEGMENT), axis=0) - offset
  starts = _segments.starts_from_changes(changes, incoming)
  rel_block = _segments.relative_blocks(starts, b)
  prev = _shift_over_devices((starts[:, -b:], rel_block[:, -b:]), axis_name, 1, reverse)
  prev_starts, prev_rel = (jnp.where(first, _segments.NO_SEGMENT, x - t) for x in prev)
  return starts, rel_block, prev_starts, prev_rel


def _segmented_walk(backend, q, k, v, fq, fk, labels, *, local_exact, strict, reverse,
                    axis_name):
  """One walk (forward, or over the flipped sequence) on a backend, its S(-1)
  and block -1 from the devices before this one. Returns acc [B, T, N, H + 1]."""
  b, t = backend.c.block_size, q.shape[1]
  if reverse:
    q, k, v, fq, fk, labels = (jnp.flip(x, axis=1) for x in (q, k, v, fq, fk, labels))
  starts, rel_block, prev_starts, prev_rel = _segment_geometry(labels, b, axis_name, reverse)
  if axis_name is None:
    previous = _segments.no_previous(k, v, fk, b)._replace(starts=prev_starts,
                                                           rel_block=prev_rel)
    state = backend.zero_state(q, k, fk)
  else:
    prev_k, prev_v, prev_fk = _shift_over_devices(
        tuple(x[:, -b:] for x in (k, v, fk)), axis_name, 1, reverse)
    previous = _segments.Previous(prev_k, prev_v, prev_fk, prev_starts, prev_rel)
    # This shard's transition of the segment-running state for the next one:
    # over block -1 and its blocks but the last, the keys of the segment of
    # the range's last token L, restarting unless L's segment began before it.
    range_starts = jnp.concatenate([prev_starts, starts[:, :t - b]], axis=1)
    s_last = range_starts[:, -1]
    in_last = range_starts == s_last[:, None]

    def masked_sum(kk, vv, ff, mask):
      mask = mask[..., None, None]
      return backend.state_sum(kk, jnp.where(mask, vv, 0), jnp.where(mask, ff, 0))

    total = masked_sum(prev_k, prev_v, prev_fk, in_last[:, :b])
    if t > b:
      total = total + masked_sum(k[:, :t - b], v[:, :t - b], fk[:, :t - b], in_last[:, b:])
    restart = (s_last >= -b).astype(jnp.int32)
    _, state = _exclusive_prefix_over_devices((restart, total), axis_name, _restart_then,
                                              reverse)
  acc = backend.segment_walk(q, k, v, fq, fk, starts, rel_block, state, previous,
                             local_exact=local_exact, strict=strict)
  return jnp.flip(acc, axis=1) if reverse else acc


def run_segmented(backend, q, k, v, fq, fk, labels, *, causal, context_axis_name=None):
  """Attention with packed segments (`_segments.py`) on a backend; T a multiple of
  block_size; labels [B, T] with runs exactly at the segments. Returns o."""
  walk = functools.partial(_segmented_walk, backend, q, k, v, fq, fk, labels,
                           axis_name=context_axis_name)
  if causal:
    acc = walk(local_exact=backend.c.local_exact, strict=False, reverse=False)
  else:
    acc = (walk(local_exact=False, strict=False, reverse=False)
           + walk(local_exact=False, strict=True, reverse=True))
  den = backend.c.bias + acc[..., -1]
  return divide_by_denominator(acc[..., :-1], den[..., None])


def dispatch(implementation, config: Config, fn, *args):
  """fn(backend, *args) on the backend the implementation names; None picks the
  Pallas kernels when lowering for TPU (and the kernel can tile the block) and
  the xla path on every other platform."""
  xla = lambda *a: fn(XlaBackend(config), *a)

  def pallas(*a):
    if not config.interpret:
      a = (require_tpu(a[0]),) + tuple(a[1:])
    return fn(PallasBackend(config), *a)

  if implementation == "xla" or (implementation is None and config.tiles is None):
    return xla(*args)
  if implementation == "pallas":
    return pallas(*args)
  return jax.lax.platform_dependent(*args, tpu=pallas, default=xla)


@functools.partial(jax.jit, static_argnames=("config", "causal", "implementation",
                                             "context_axis_name"))
def _polysketch_attention(q, k, v, q_features, k_features, segment_ids, *, config, causal,
                          implementation, context_axis_name):
  seq_len = q.shape[1]
  padded_len = round_up(seq_len, config.block_size)
  # Zero padding is exact: a zero key has zero exact weight (degree > 0) and
  # zero features, so padded keys add nothing; padded queries are sliced off.
  args = tuple(pad_seq(x, padded_len) for x in (q, k, v, q_features, k_features))
  if segment_ids is not None:
    # The zero padding is one more segment: its label differs from the last id.
    fill = (segment_ids[:, -1:] == 0).astype(segment_ids.dtype)
    labels = jnp.concatenate(
        [segment_ids, jnp.broadcast_to(fill, (fill.shape[0], padded_len - seq_len))], axis=1)
    fn = functools.partial(run_segmented, causal=causal, context_axis_name=context_axis_name)
    args = args + (labels,)
  else:
    fn = functools.partial(run_backend, causal=causal, context_axis_name=context_axis_name)
  return dispatch(implementation, config, fn, *args)[:, :seq_len]


def resolve_config(q, k, q_features, *, degree, block_size, local_exact,
                   normalization_bias, implementation, interpret, tile_config,
                   padded_len=None, symmetric=True, block_may_cover=True):
  """Checks the static arguments and fixes the block and the kernel tiling.

  The block is clamped to the 8-rounded sequence; `block_may_cover` False:
  no block covers the padded sequence (prefill's chunk follows the state's
  incomplete block), so b must tile it; the kernel tiling is resolved
  only where the Pallas kernels may run; `symmetric`: whether the kernels that
  run keep only the symmetric feature pairs (causal, no segments), which sets
  their VMEM estimate. Returns (Config, implementation)."""
  degree = _validation.check_degree(degree)
  block_size = _validation.check_block_size(block_size)
  bias = _validation.check_normalization_bias(normalization_bias)
  local_exact = _validation.check_bool("local_exact", local_exact)
  interpret = _validation.check_interpret(interpret)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if tile_config is not None and not isinstance(tile_config, tpu_config.TileConfig):
    raise TypeError(f"tile_config must be a TileConfig, got {type(tile_config).__name__}")
  if padded_len is None:
    padded_len = round_up(q.shape[1], 8)
    if block_size > padded_len:
      block_size = padded_len
      tile_config = _tiles_for_clamped_block(tile_config, block_size)
  tiles = None
  if implementation != "xla":
    problem = (_kernel_dtype_error(q, q_features)
               or tpu_config.kernel_block_error(block_size,
                                                padded_len if block_may_cover else None))
    if problem and implementation == "pallas":
      raise ValueError(problem)
    if not problem:
      # None falls through to the xla path where the default tiling does not
      # fit the VMEM, the forward's or only the backward's (a gradient traces
      # the TPU branch even where the xla one runs, off TPU too); "pallas" or
      # a TileConfig given asks for the kernels, and raises.
      asks_for_kernels = implementation == "pallas" or tile_config is not None
      try:
        tiles = tpu_config.resolve_tiles(
            tile_config, block_size=block_size, head_dim=q.shape[-1],
            sketch_dim=q_features.shape[-1], dtype=_kernel_dtype(q.dtype),
            feature_dtype=_kernel_dtype(q_features.dtype), group=q.shape[2] // k.shape[2],
            symmetric=symmetric)
      except ValueError:
        if asks_for_kernels:
          raise
      if tiles is not None and tiles.backward_error and not asks_for_kernels:
        tiles = None
  config = Config(degree=degree, block_size=block_size, local_exact=local_exact,
                  bias=bias, interpret=interpret, tiles=tiles)
  return config, implementation


def _tiles_for_clamped_block(tile_config, block_size):
  """tile_config for one block clamped to a short sequence: an explicit local
  tile that does not divide it tiles it whole (a tile that fits the block the
  caller asked for raised "must divide block_size=<the clamped block>")."""
  if tile_config is None:
    return None
  fields = {name: block_size for name in ("local_tile", "dkv_local_tile")
            if getattr(tile_config, name) is not None
            and block_size % min(getattr(tile_config, name), block_size)}
  return dataclasses.replace(tile_config, **fields) if fields else tile_config


KERNEL_DTYPES = ("bfloat16", "float16", "float32")


def _kernel_dtype_error(q, q_features) -> str | None:
  """Why the Pallas kernels cannot take these inputs' dtypes, or None."""
  for name, x in (("q", q), ("q_features", q_features)):
    if jnp.dtype(x.dtype).name not in KERNEL_DTYPES:
      return (f"the Pallas kernels take {name} in {', '.join(KERNEL_DTYPES)} (float16 is "
              f"computed in float32), got {name} of dtype {jnp.dtype(x.dtype).name}: use "
              f"implementation=None or 'xla' for it")
  return None


def _kernel_dtype(dtype):
  """float16 runs the kernels in float32: (q.k)^p and the weights overflow
  float16's range (65504) long before float32's."""
  return jnp.float32 if jnp.dtype(dtype) == jnp.float16 else jnp.dtype(dtype)


def upcast_float16(*arrays):
  """Each float16 array as float32 (`_kernel_dtype`), the others unchanged: any
  of q, k, v and the features may be float16, not only q."""
  return tuple(x.astype(jnp.float32) if x.dtype == jnp.float16 else x for x in arrays)


def polysketch_attention(q, k, v, q_features, k_features, *, degree=4,
                         block_size=256, causal=True, local_exact=True,
                         normalization_bias=1.0, segment_ids=None,
                         context_axis_name=None, implementation=None, interpret=False,
                         tile_config=None):
  """Block-causal PolySketch attention, linear in the sequence length.

  For query i and key j <= i (DESIGN §1.3):

    w_ij = (q_i . k_j)^degree       if block(j) == block(i) and local_exact
    w_ij = (f_q,i . f_k,j)^2        otherwise
    o_i  = sum_j w_ij v_j / (normalization_bias + sum_j w_ij)

  Non-causal attention uses w_ij = (f_q,i . f_k,j)^2 for all j (local_exact
  has no effect there). The sketched weights come from prefix states of size
  sketch_dim^2 x head_dim carried over blocks, so cost and memory grow linearly
  in seq. The op does not normalise q and k: apply a LayerNorm first (the Flax
  layer does), or (q . k)^degree overflows.

  Grouped-query attention: k, v and k_features may have fewer heads
  (num_kv_heads, dividing num_heads); query head n uses kv head
  n // (num_heads // num_kv_heads), as in `jax.nn.dot_product_attention`. The
  prefix state is kept once per kv head; nothing is repeated in memory.

  Args:
    q: [batch, seq, num_heads, head_dim].
    k, v: [batch, seq, num_kv_heads, head_dim]; one floating dtype with q.
    q_features: [batch, seq, num_heads, sketch_dim], sketch features f(q)
      (e.g. from `random_sketch_features` or `learned_sketch_features`).
    k_features: [batch, seq, num_kv_heads, sketch_dim], f(k); one floating
      dtype with q_features.
    degree: p, a positive even int, of the exact local weights.
    block_size: b, a positive multiple of 8. seq need not be a multiple of it
      (inputs are zero-padded internally); a block longer than seq is clamped.
      The Pallas kernels need a multiple of 128 (or one block covering seq):
      `implementation="pallas"` raises for other sizes, `None` then runs the
      xla path on every platform.
    causal: causal (block-causal) attention or full attention.
    local_exact: exact (q.k)^p weights inside each diagonal block.
    normalization_bias: the positive constant in the denominator, in
      float32's normal range.
    segment_ids: None, or int32 [batch, seq]: packed sequences (DESIGN §1.5).
      A segment is a maximal run of equal ids ([0, 0, 1, 1, 0, 0] is three
      segments); a token attends only to tokens of its own segment (earlier
      ones when causal), and blocks are counted from each segment's start, so
      every segment's result equals running it alone. Both backends run a
      walk over the blocks whose state resets at segment starts (`_segments.py`;
      the Pallas forward kernel `_pallas_segments.py`), dispatched as without
      segments (None: the kernels when lowering for TPU and the block tiles).
      Forward and backward are Pallas kernels on that path. Works with
      context_axis_name (a segment may span shards).
    context_axis_name: inside `shard_map` with seq sharded contiguously over
      this mesh axis: every device holds a block-aligned shard (its length a
      multiple of block_size) and the result is that of the whole sequence.
      The shard_map must be built with check_vma=False (so must any shard_map
      around the op): with jax's default, check_vma=True, the op raises.
      Only the states cross devices: r^2 (H + 1) floats per kv head (with
      segment_ids also the previous shard's last block of k, v, k_features).
    implementation: None (the fastest available for the platform: the Pallas
      kernels when lowering for TPU, where they take the block size, the
      dtypes (bfloat16, float16, float32) and fit the VMEM with the default
      tiling, forward and backward; else the xla path), "xla" (blocked pure
      JAX) or "pallas" (the fused TPU kernel; raises where it cannot run).
      Under jax.jit with the inputs sharded over the batch, each device runs
      the kernels on its own rows (XLA cannot partition a Mosaic kernel, so
      each carries its own rule); inputs sharded over another axis are
      gathered first: shard heads and the sequence with
      `sharded_polysketch_attention`.
    interpret: for "pallas": run the kernel in interpret mode on any backend;
      True or a `pltpu.InterpretParams`. Without it, "pallas" needs a TPU (or
      a lowering for TPU, e.g. `jax.export` from a CPU host).
    tile_config: a `TileConfig` (kernel tiling and target generation); None
      uses the defaults of the local TPU generation.

  Returns:
    [batch, seq, num_heads, head_dim] in the dtype of q.

  Precision: states and accumulators are float32 on every path. The xla path
  computes in float32 at full precision (`Precision.HIGHEST`: no TF32 or bf16
  passes on GPU/TPU). The kernels feed the MXU the input dtype (bf16 inputs:
  bf16 operands, f32 accumulation; f32 inputs: f32 at full precision), and keep
  the backward's cancelling state products in float32. float16 inputs are
  computed in float32 on both paths.
  """
  _validation.check_attention_inputs(q, k, v, q_features, k_features)
  _validation.check_nonempty("q", q, "[batch, seq, num_heads, head_dim]")
  causal = _validation.check_bool("causal", causal)
  segment_ids = _validation.check_segment_ids(segment_ids, q)
  if context_axis_name is not None:
    try:
      jax.lax.axis_size(context_axis_name)
    except NameError as e:
      raise ValueError(
          f"context_axis_name={context_axis_name!r} is not a mesh axis of an enclosing "
          "shard_map; call polysketch_attention inside jax.shard_map over that axis "
          "(or use sharded_polysketch_attention)") from e
  _validation.check_unchecked_shard_map(
      "polysketch_attention", dict(q=q, k=k, v=v, q_features=q_features,
                                   k_features=k_features, segment_ids=segment_ids),
      context_axis_name)
  config, implementation = resolve_config(
      q, k, q_features, degree=degree, block_size=block_size, local_exact=local_exact,
      normalization_bias=normalization_bias, implementation=implementation,
      interpret=interpret, tile_config=tile_config,
      padded_len=q.shape[1] if context_axis_name is not None else None,
      symmetric=causal and segment_ids is None)
  if context_axis_name is not None and q.shape[1] % config.block_size:
    raise ValueError(
        f"with context_axis_name={context_axis_name!r} each device's shard of seq must be a "
        f"multiple of block_size={config.block_size}; this shard has seq={q.shape[1]}")
  args = upcast_float16(q, k, v, q_features, k_features)
  out = _polysketch_attention(*args, segment_ids, config=config, causal=causal,
                              implementation=implementation,
                              context_axis_name=context_axis_name)
  return out.astype(q.dtype)
