"""Kernel tiling for the PolySketch Pallas TPU kernels, with per-generation defaults.

`TileConfig` holds the knobs that change speed and VMEM use but never the
math (the semantic block size b is an argument of the op itself). Defaults per
generation come from each chip's VMEM size and MXU width.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_polysketch import _validation

MiB = 1 << 20
# Rows appended below V^T: one row of ones carries the normaliser z through the
# same matmuls as the state S, padded to the 16-row bf16 sublane tile.
NORMALISER_ROWS = 16


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  """Public figures of one TPU generation (per chip unless noted).

  Sources (checked for the roofline model, bench/ROOFLINE.md):
  - peak bf16 FLOP/s, HBM bandwidth and TensorCores per chip: the Google Cloud
    TPU system-architecture pages, https://cloud.google.com/tpu/docs/v4 (275
    TFLOP/s, 1200 GBps, two TensorCores), .../docs/v5e (197 TFLOP/s, 819 GBps,
    one TensorCore), .../docs/v5p (459 TFLOP/s, 2765 GBps; 8 cores on a 4-chip
    2x2x1 slice: two TensorCores) and .../docs/v6e (918 TFLOP/s, 1638 GBps, one
    TensorCore with two 256x256 MXUs).
  - mxu_width: 128x128 MXUs up to v5p, 256x256 on v6e (same pages).
  - vmem_bytes: per TensorCore, from JAX's own table of TPU facts
    (`jax._src.pallas.mosaic.tpu_info`, rendered as the Pallas "TPU Hardware
    Reference", https://docs.jax.dev/en/latest/pallas/tpu/hardware.html):
    16 MiB on v4, 128 MiB on v5e, 64 MiB on v5p, 128 MiB on v6e. The Cloud
    pages do not publish VMEM. (Earlier values here, 32 MiB for v4 and 95 MiB
    for v5p, were wrong; the TPU compiler does not check vmem_limit_bytes
    against them on a CPU host, so only real hardware would have caught it.)
  - default_scoped_vmem_bytes: the compiler's default scoped-VMEM limit, 16 MiB
    (32 MiB on v6e), as observed in compile failures (DESIGN §2).
  - clock_hz: not on the Cloud pages; the value that makes peak = TensorCores x
    MXUs x 128^2 MACs x 2 x clock for v4 (1050 MHz), v5e (1.5 GHz) and v5p
    (1.75 GHz); v6e's is unpublished (1.75 GHz is an estimate; with the two
    documented 256^2 MXUs the peak would need 3.5 GHz). Nothing depends on it.
  """
  name: str
  tensorcores_per_chip: int
  peak_bf16_flops_per_chip: float
  hbm_bytes_per_s_per_chip: float
  clock_hz: float
  mxu_width: int
  vmem_bytes: int               # physical VMEM per TensorCore
  default_scoped_vmem_bytes: int  # what a kernel may use without vmem_limit_bytes
  bf16_vpu: bool = False          # the vector unit computes in bf16 natively
  # Default diagonal-block tile of the backward (the dkv kernel's; None: the
  # MXU width), chosen with the static schedule (bench/TPU_SCHEDULE.md).
  dkv_local_tile: int | None = None
  # Tokens a grid step of the learned sketch's feature kernels takes
  # (`TileConfig.features_tile`): the larger the tile, the more of the
  # kernels' long matmul -> GELU -> matmul chain overlaps (features of q and
  # k at 4k on v5e, an earlier version of the kernels: 128 tokens 3.49 Mcyc,
  # 256 2.34, 512 1.67, 1024 1.45; bench/TPU_SCHEDULE.md). v4 takes 512:
  # its VMEM is 16 MiB.
  features_tile: int = 1024
  # Blocks the causal kernels walk per grid step (`TileConfig.blocks_per_step`,
  # `dq_blocks_per_step`, `dkv_blocks_per_step`).
  forward_blocks_per_step: int = 1
  dq_blocks_per_step: int = 1
  dkv_blocks_per_step: int = 1
  # The dq kernel's blocks per step where H fills whole MXU passes (H = 128 on
  # 128-wide MXUs; None: dq_blocks_per_step).
  wide_head_dq_blocks_per_step: int | None = None

  @property
  def peak_bf16_flops(self) -> float:
    return self.peak_bf16_flops_per_chip / self.tensorcores_per_chip

  @property
  def hbm_bytes_per_s(self) -> float:
    return self.hbm_bytes_per_s_per_chip / self.tensorcores_per_chip


GENERATIONS = {
    # Blocks per grid step, forward / dq / dkv (`TileConfig.blocks_per_step`):
    # a step's fixed pipeline work (DMA set-up, ~120 bundles) is shared and the
    # blocks' MXU and vector work overlap. Chosen with the static schedule at
    # H = 64, r = 32, b = 256 (bundles per block, 1 -> the count here; 2k
    # compiles, bench/TPU_SCHEDULE.md): v4 1185 -> 948 / 2588 -> 2336 / 3657 ->
    # 3379; v5e 927 -> 747 / 1384 -> 1182 / dkv 2451 (2 a step: 2468, 4: 2506);
    # v5p 990 -> 774 / 1398 -> 1275 / dkv 2507 (4: 2510); v6e 730 -> 530 /
    # 1152 -> 860 / 1919 -> 1510 (4 a step: 572 / 922 / 1598).
    # v4 keeps one block a step in the backward: 4 cut its dq and dkv bundles
    # too, but needed more VMEM than the estimate (fitted at 1) allows for.
    # At H = 128, r = 64 its dq kernel takes 4 (fits; fwd + bwd at 32k 27.55 ->
    # 26.96 Mcyc, 2 a step 27.01; the dkv kernel's 2 a step or 256 tiles
    # cost more: 28.75, 27.68).
    "v4": TpuGeneration("v4", 2, 275e12, 1200e9, 1050e6, 128, 16 * MiB, 16 * MiB,
                        forward_blocks_per_step=4, wide_head_dq_blocks_per_step=4,
                        features_tile=512),
    # Since the dkv kernel forms the diagonal block's dQ too, 128 tiles suit it
    # on v5e at H = 64 (its grid step 2451 bundles against 2546 in 256 tiles);
    # at H = 128, 256 tiles are 3.6% faster (10711 against 11113): pass
    # TileConfig(dkv_local_tile=256) there (bench/TPU_SCHEDULE.md).
    # At H = 128, r = 64 v5e's dq kernel takes 4 blocks a step (3564 bundles a
    # block against 3788 with 8; 914 against 823 at H = 64).
    "v5e": TpuGeneration("v5e", 1, 197e12, 819e9, 1500e6, 128, 128 * MiB, 16 * MiB,
                         forward_blocks_per_step=4, dq_blocks_per_step=8,
                         wide_head_dq_blocks_per_step=4),
    "v5p": TpuGeneration("v5p", 2, 459e12, 2765e9, 1750e6, 128, 64 * MiB, 16 * MiB,
                         forward_blocks_per_step=4, dq_blocks_per_step=4),
    "v6e": TpuGeneration("v6e", 1, 918e12, 1638e9, 1750e6, 256, 128 * MiB, 32 * MiB,
                         bf16_vpu=True, forward_blocks_per_step=8, dq_blocks_per_step=8,
                         dkv_blocks_per_step=8),
}
DEFAULT_GENERATION = "v5e"


def detect_generation() -> str | None:
  """The generation of the first local TPU device, or None without a TPU."""
  try:
    devices = jax.devices("tpu")
  except RuntimeError:
    return None
  kind = devices[0].device_kind.lower() if devices else ""
  for needle, name in (("v6", "v6e"), ("v5 lite", "v5e"), ("v5e", "v5e"),
                       ("v5p", "v5p"), ("v5", "v5p"), ("v4", "v4")):
    if needle in kind:
      return name
  return None


@dataclasses.dataclass(frozen=True)
class TileConfig:
  """Tiling of the PolySketch kernels; none of it changes the result.

  Attributes:
    local_tile: side of the square tiles the exact diagonal block is computed
      in; tiles above the diagonal are skipped, so a block of b = 2 * local_tile
      does 3/4 of the b x b work. Must divide block_size and be a multiple of
      128 (the lane width) or equal block_size; a larger one is capped at
      block_size (which a short sequence clamps; one that does not divide the
      clamped block takes the whole block). None: the MXU width, capped at
      block_size.
    vmem_limit_bytes: scoped VMEM the kernel may use. None: the generation's
      default when the estimate fits in it, else the estimate plus headroom.
    generation: the TPU generation the defaults and VMEM checks are for ("v4",
      "v5e", "v5p", "v6e"). None: the local TPU's, or v5e without a TPU (e.g.
      when exporting from a CPU host).
    bf16_phi: in the forward kernels, form phi = f (x) f of bf16 features in
      bf16 (bit-identical to forming it in f32 and rounding). None: where the
      VPU has bf16 (v6e: 6% fewer forward cycles in the static schedule; on
      v5e it costs 11% more).
    dkv_local_tile: the diagonal-block tile of the backward (the dkv kernel,
      walking backward, forms the diagonal block's dQ, dK and dV; the dq
      kernel has only the sketched prefix), with the rules of `local_tile`.
      None: `local_tile` if that is set, else the generation's default.
    blocks_per_step: how many blocks the causal forward kernel walks per grid
      step, in order (the largest divisor of the number of blocks up to this
      is used): the step's fixed pipeline work is shared and the blocks' work
      overlaps. None: the generation's default (`GENERATIONS`), halved until the
      kernel fits the VMEM budget.
    dq_blocks_per_step, dkv_blocks_per_step: the same for the backward's dq
      and dkv kernels. None: `blocks_per_step` if that is set, else the
      generation's default.
    features_tile: tokens a grid step of the learned sketch's feature kernels
      (`learned_sketch_features`) takes; a multiple of 128. None: the
      generation's default (1024; 512 on v4), capped at the sequence length
      rounded up to 128.
    bf16_gelu: the learned sketch's feature kernels compute GELU and its
      slope in bf16 for bf16 inputs (the matmuls accumulate in float32 either
      way). Unlike the other fields this rounds differently: the features
      stay within bf16's error of the float32 function (tests/
      test_features_kernels.py). None: where the VPU has bf16 (v6e: 21% fewer
      static cycles for the features' forward + VJP).
  """
  local_tile: int | None = None
  vmem_limit_bytes: int | None = None
  generation: str | None = None
  bf16_phi: bool | None = None
  dkv_local_tile: int | None = None
  blocks_per_step: int | None = None
  dq_blocks_per_step: int | None = None
  dkv_blocks_per_step: int | None = None
  features_tile: int | None = None
  bf16_gelu: bool | None = None

  def __post_init__(self):
    if self.generation is not None:
      get_generation(self.generation)
    # Sizes as Python ints (a NumPy int is fine; a float, bool or string is not).
    for name in ("local_tile", "dkv_local_tile", "blocks_per_step", "dq_blocks_per_step",
                 "dkv_blocks_per_step", "vmem_limit_bytes", "features_tile"):
      value = getattr(self, name)
      if value is None:
        continue
      value = _validation.check_positive_int(name, value)
      if name.endswith("local_tile") and value % 8:
        raise ValueError(f"{name} must be a positive multiple of 8, got {value!r}")
      if name == "features_tile" and value % 128:
        raise ValueError(f"features_tile must be a positive multiple of 128 (the lane "
                         f"width), got {value!r}")
      object.__setattr__(self, name, value)
    for name in ("bf16_phi", "bf16_gelu"):
      if getattr(self, name) is not None:
        _validation.check_bool(name, getattr(self, name))

  @classmethod
  def for_generation(cls, generation: str) -> "TileConfig":
    """The default tiling for a generation ("v4", "v5e", "v5p", "v6e"): its
    tiles are left to `resolve_tiles`' defaults, so a block the MXU width does
    not divide (one block covering a short sequence) takes the block as its
    tile, as with TileConfig(generation=...). (Explicit tiles there raised.)"""
    return cls(generation=get_generation(generation).name)


def get_generation(name: str | None) -> TpuGeneration:
  if name is None:
    name = detect_generation() or DEFAULT_GENERATION
  if not isinstance(name, str) or name not in GENERATIONS:
    raise ValueError(f"unknown TPU generation {name!r}; known: {sorted(GENERATIONS)}")
  return GENERATIONS[name]


@dataclasses.dataclass(frozen=True)
class ResolvedTiles:
  """A TileConfig checked against one problem: what the kernels actually use."""
  local_tile: int                         # the forward kernel
  vmem_limit_bytes: int | None            # the forward kernel
  vmem_estimate_bytes: int                # the forward kernel
  bf16_phi: bool = False
  backward_vmem_limit_bytes: int | None = None    # the other backward kernels
  backward_vmem_estimate_bytes: int = 0           # the larger of dq's and dkv's
  dkv_local_tile: int | None = None       # None: local_tile
  # Blocks per grid step, before fitting the number of blocks (`blocks_per_step`).
  blocks_per_step: int = 1                # the forward kernel's
  dq_blocks_per_step: int = 1
  dkv_blocks_per_step: int = 1
  dq_vmem_limit_bytes: int | None = None
  dkv_vmem_limit_bytes: int | None = None
  # The causal backward's split bf16 products as one product stacked along the
  # contraction (`_pallas_common.split_dot`): 256-wide MXUs (v6e).
  stack_split_products: bool = False
  # The causal backward's state updates keep the normaliser out of the MXU
  # (z's and rho's updates as float32 lane sums on the VPU) where H fills
  # whole passes of the MXU: the 16 normaliser rows would take a pass of
  # their own (v5e, H = 128, r = 64, bundles a block: the dq kernel's update
  # 531 fewer, the dkv kernel's carry update 1795 fewer; on v6e, where
  # H + 16 = 144 fits one 256-wide pass, the lane sums cost more than they
  # save; BUILD_NOTES).
  normaliser_apart: bool = False
  # The causal backward's phi shares one float32 piece between the rotations
  # by 4 of two feature tiles (`_pallas_common.rot_plan`: r (r + 1) / 2 rows,
  # 528 at r = 32 instead of 544) on 128-wide MXUs; on v6e the dkv kernel's
  # selects measured slower and needed more scoped VMEM than its default.
  merged_rotations: bool = True
  # Why the backward kernels do not fit, raised when a gradient is traced (a
  # forward-only call, e.g. inference, may still run this tiling).
  backward_error: str | None = None

  def check_backward(self) -> None:
    if self.backward_error:
      raise ValueError(self.backward_error)


@dataclasses.dataclass(frozen=True)
class FeatureTiles:
  """A TileConfig resolved for the learned sketch's feature kernels."""
  tile: int                       # tokens a grid step
  bf16_gelu: bool
  vmem_limit_bytes: int | None
  mxu_width: int                  # the generation's: `_pallas_features.bias_on_mxu`


def feature_vmem_estimate(tile: int, dtype, *, hidden_dim: int, head_dim: int,
                          sketch_dim: int) -> int:
  """Scoped VMEM the learned sketch's feature kernels (the VJP, the larger)
  need at `tile` tokens a step: their activations, some 34 values per hidden
  unit of a token in the input's dtype. Fitted to compiles at H = 64, r = 32,
  hidden 256 on v5e (the least limit that compiled, in MiB, at 256 / 512 /
  1024 tokens: bf16 6 / 10 / 18, float32 10 / 18 / 36)."""
  itemsize = jnp.dtype(dtype).itemsize
  return tile * itemsize * (34 * hidden_dim + 8 * (head_dim + sketch_dim)) + 2 * MiB


def resolve_feature_tiles(config: TileConfig | None, seq_len: int, dtype, *, hidden_dim: int,
                          head_dim: int, sketch_dim: int) -> FeatureTiles:
  """The feature kernels' tiling for x [B, seq_len, N, head_dim] of `dtype`: the
  configured or default tile, capped at seq_len rounded up to 128, halved
  (a default one) until its VMEM estimate fits; raises ValueError if none does."""
  config = config or TileConfig()
  gen = get_generation(config.generation)
  tile = min(config.features_tile or gen.features_tile, -(-seq_len // 128) * 128)
  budget = config.vmem_limit_bytes or gen.vmem_bytes
  estimate = lambda t: feature_vmem_estimate(t, dtype, hidden_dim=hidden_dim,
                                             head_dim=head_dim, sketch_dim=sketch_dim)
  while config.features_tile is None and tile > 128 and estimate(tile) > budget:
    tile //= 2
  if estimate(tile) > budget:
    source = ("vmem_limit_bytes" if config.vmem_limit_bytes else
              f"the {gen.name}'s {gen.vmem_bytes // MiB} MiB of VMEM")
    raise ValueError(
        f"the learned sketch's feature kernels need about {estimate(tile) / MiB:.1f} MiB of "
        f"VMEM at features_tile={tile} (hidden_dim={hidden_dim}, "
        f"{jnp.dtype(dtype).name}), over {source} ({budget / MiB:.1f} MiB): use a smaller "
        f"TileConfig.features_tile or implementation='xla'")
  limit = config.vmem_limit_bytes
  if limit is None and estimate(tile) > gen.default_scoped_vmem_bytes:
    limit = min(int(1.1 * estimate(tile)), gen.vmem_bytes)
  bf16_gelu = gen.bf16_vpu if config.bf16_gelu is None else config.bf16_gelu
  return FeatureTiles(tile=tile, bf16_gelu=bf16_gelu, vmem_limit_bytes=limit,
                      mxu_width=gen.mxu_width)


def kernel_block_error(block_size: int, padded_len: int | None) -> str | None:
  """Why the TPU kernels cannot tile this block, or None if they can.

  Feature and value blocks put the b tokens on the 128 lanes, and Mosaic needs
  a block's last dim to be a multiple of 128 or the whole array dim: so b must
  be a multiple of 128, or one block must cover the (8-padded) sequence.
  padded_len None: no block covers the sequence (prefill's chunk follows the
  state's incomplete block).
  """
  if block_size % 128 == 0 or padded_len is not None and block_size >= padded_len:
    return None
  cover = ("" if padded_len is None
           else f", or cover the whole sequence (>= {padded_len})")
  return (f"block_size={block_size} cannot be tiled by the TPU kernel: it must be a "
          f"multiple of 128 (the lane width){cover}; use implementation='xla' for other "
          "multiples of 8")


def _tile_bytes(shape, dtype) -> int:
  """VMEM bytes of one tile: last dim padded to 128 lanes, the one before to the
  sublane tile (8 rows of 32 bits, so 16 for bf16)."""
  item = jnp.dtype(dtype).itemsize
  *lead, rows, cols = (1,) * (2 - len(shape)) + tuple(shape)
  sub = 8 * max(1, 4 // item)
  count = 1
  for d in lead:
    count *= d
  return count * (-(-rows // sub) * sub) * (-(-cols // 128) * 128) * item


def _buffers(*tiles) -> int:
  """Pipelined blocks are double-buffered."""
  return 2 * sum(_tile_bytes(shape, dtype) for shape, dtype in tiles)


def vmem_estimates(block_size: int, head_dim: int, sketch_dim: int, dtype, feature_dtype,
                   *, group: int = 1, local_tile: int | None = None,
                   dkv_local_tile: int | None = None,
                   state_io: bool = False, symmetric: bool = True,
                   blocks_per_step: int = 1, dq_blocks_per_step: int = 1,
                   dkv_blocks_per_step: int = 1) -> dict[str, int]:
  """Bytes of VMEM each kernel needs: {"forward", "dq", "dkv"}.

  Pipelined blocks (double-buffered, padded to the (sublane, 128) tile), the
  local tiles (the forward's and the dkv kernel's, dkv_local_tile defaulting to
  local_tile), and the state-sized and phi-sized scratch and temporaries over
  the feature pairs the kernels hold.
  symmetric: the causal kernels without segments, which keep one row per
    pair of phi's symmetric pieces (`rot_pairs`: 544 or 576 at r = 32),
    counted here as len(sym_pairs(r)) (640), the bound the fit was made
    with. False: the segment and non-causal
    kernels, which hold all r^2 pairs.
  state_io: a state block passed in or out (prefill, context parallelism).
  blocks_per_step, dq_blocks_per_step, dkv_blocks_per_step: blocks per grid
    step of each kernel (its pipelined blocks hold that many blocks).
  """
  from pallas_polysketch._pallas_common import sym_pairs  # (it imports this module)
  b, h, r, g = block_size, head_dim, sketch_dim, group
  pairs, rows = (len(sym_pairs(r)) if symmetric else r * r), head_dim + NORMALISER_ROWS
  local_bytes = lambda lt: 4 * _tile_bytes((lt or block_size,) * 2, jnp.float32)
  f32, mm, ft = jnp.float32, dtype, feature_dtype
  state_fwd = _tile_bytes((rows, pairs), f32)     # [S^T; z^T]
  state_bwd = _tile_bytes((pairs, rows), f32)     # [S, z]: rows on the lanes
  phi = pairs * b * 4                             # one phi^T in float32
  state_in = 2 * state_bwd if state_io else 0
  bs = b * blocks_per_step          # the tokens of a grid step's pipelined blocks
  forward = (_buffers(((g, bs, h), mm), ((bs, h), mm), ((h, bs), mm), ((g, r, bs), ft),
                      ((r, bs), ft), ((g, h, bs), f32), ((g, 1, bs), f32))
             + _tile_bytes((rows, b), f32) + local_bytes(local_tile)
             + (4 * state_fwd if state_io else 0))
  # dq: v, the features, dnum^T and dden in; df_q out.
  bs = b * dq_blocks_per_step
  dq = (_buffers(((bs, h), mm), ((h, bs), mm), ((g, r, bs), ft), ((r, bs), ft),
                 ((g, bs, r), ft), ((bs, r), ft), ((g, h, bs), f32), ((g, 1, bs), f32),
                 ((g, r, bs), f32))
        + state_in)
  # dkv: the diagonal block's dQ (out, and its float32 accumulators) beside dK, dV.
  bs = b * dkv_blocks_per_step
  dkv = (_buffers(((g, bs, h), mm), ((bs, h), mm), ((bs, h), mm), ((h, bs), mm),
                  ((g, r, bs), ft), ((r, bs), ft), ((g, bs, r), ft), ((bs, r), ft),
                  ((g, bs, h), mm), ((g, h, bs), f32), ((g, bs, h), mm), ((g, 2, bs), f32),
                  ((bs, max(h, r)), mm), ((bs, h), mm), ((r, bs), f32),
                  ((g, bs, max(h, r)), mm))
         + _tile_bytes((g, b, max(h, r)), f32)
         + local_bytes(dkv_local_tile or local_tile) + 2 * state_in)
  if symmetric:
    # Scratch and temporaries, two coefficients per kernel fitted as an upper
    # bound, with 20% to spare, to the least VMEM limit libtpu 0.0.42.1
    # compiles each kernel under (found by bisection, `bench/vmem_limits.py`)
    # at (H, r, b, G) from (64, 16, 256, 1) to (128, 64, 256, 2) on v4, v5e
    # and v6e; see BUILD_NOTES. dq refitted (2026-12-04) when its diagonal
    # block moved to the dkv kernel. The forward's grid step walking 4 blocks
    # on v5e and v6e (2026-12-04): only its pipelined blocks grow (above); the
    # estimate stays 1.7-7x over the need there (bench/results/vmem_limits.md).
    forward += 0.5 * state_fwd + 4.75 * phi
    dq += 1.75 * state_bwd + 2.75 * g * phi
    dkv += 2.5 * state_bwd + 1.75 * g * phi
  else:
    # The state scratch, phi in f32 and the matmul dtype and the state in the
    # matmul dtype; in the backward, the float32 state products' bf16 parts
    # (Mosaic splits the f32 operands), fitted as an upper bound to what
    # libtpu 0.0.42.1 reported for the v5e dq kernel when every kernel held
    # all r^2 pairs: 4.1 / 6.0 / 16.3 / 22.6 / 21.9 / 7.9 MiB at (H, r, b, G)
    # = (64, 32, 256, 1), (128, 32, 256, 1), (64, 64, 256, 1), (128, 64, 256, 1),
    # (128, 64, 128, 1), (64, 32, 256, 4); see BUILD_NOTES.
    item = jnp.dtype(dtype).itemsize
    forward += state_fwd + pairs * b * (4 + 2 * item) + _tile_bytes((rows, pairs), mm)
    temps = 5.5 * state_bwd + 1.5 * g * phi
    dq += temps
    dkv += temps
  return {"forward": int(forward), "dq": int(dq), "dkv": int(dkv)}


def resolve_tiles(config: TileConfig | None, *, block_size: int, head_dim: int,
                  sketch_dim: int, dtype, feature_dtype, group: int = 1,
                  symmetric: bool = True) -> ResolvedTiles:
  """Fills defaults and checks the tiling fits; raises ValueError naming the limit.

  The default local tile (the MXU width) shrinks to the block when it does not
  divide it (e.g. a single short block); an explicit `local_tile` must divide it.
  """
  config = config or TileConfig()
  gen = get_generation(config.generation)

  def tile(name, default):
    explicit = getattr(config, name)
    lt = min(explicit or default, block_size)
    if block_size % lt:
      if explicit is not None:
        raise ValueError(f"TileConfig.{name}={lt} must divide block_size={block_size}")
      lt = block_size
    if lt != block_size and lt % 128:
      raise ValueError(
          f"TileConfig.{name}={lt} must be a multiple of 128 (the lane "
          f"width) when smaller than block_size={block_size}")
    return lt

  local_tile = tile("local_tile", gen.mxu_width)
  dkv_local_tile = tile("dkv_local_tile",
                        config.local_tile or gen.dkv_local_tile or gen.mxu_width)
  # Blocks per grid step: the given ones (None: the generation's default)...
  given = dict(blocks_per_step=config.blocks_per_step,
               dq_blocks_per_step=config.dq_blocks_per_step or config.blocks_per_step,
               dkv_blocks_per_step=config.dkv_blocks_per_step or config.blocks_per_step)
  counts = {name: given[name] or getattr(gen, name if name != "blocks_per_step"
                                         else "forward_blocks_per_step")
            for name in given}
  if given["dq_blocks_per_step"] is None and head_dim % gen.mxu_width == 0:
    counts["dq_blocks_per_step"] = (gen.wide_head_dq_blocks_per_step
                                    or counts["dq_blocks_per_step"])
  estimate = lambda: vmem_estimates(block_size, head_dim, sketch_dim, dtype, feature_dtype,
                                    group=group, local_tile=local_tile,
                                    dkv_local_tile=dkv_local_tile, symmetric=symmetric,
                                    **counts)
  estimates = estimate()
  limit = config.vmem_limit_bytes
  budget = limit or gen.vmem_bytes
  # ... a default count halved until its kernel fits (a given one is kept: it
  # fails below if it does not fit).
  count_of = {"forward": "blocks_per_step", "dq": "dq_blocks_per_step",
              "dkv": "dkv_blocks_per_step"}
  for kernel, name in count_of.items():
    while given[name] is None and counts[name] > 1 and estimates[kernel] > budget:
      counts[name] //= 2
      estimates = estimate()
  errors = {}
  for kernel, estimate in estimates.items():
    if estimate > budget:
      source = ("vmem_limit_bytes" if limit else
                f"the {gen.name}'s {gen.vmem_bytes // MiB} MiB of VMEM")
      errors[kernel] = (
          f"block_size={block_size}, sketch_dim={sketch_dim}, head_dim={head_dim}, "
          f"{group} query head(s) per kv head ({jnp.dtype(dtype).name}): the {kernel} "
          f"kernel needs about {estimate / MiB:.1f} MiB of VMEM, over {source} "
          f"({budget / MiB:.1f} MiB) with {counts[count_of[kernel]]} block(s) a grid "
          f"step: use a smaller block_size or sketch_dim"
          + (f", or a smaller TileConfig.{count_of[kernel]}" if counts[count_of[kernel]] > 1
             else ""))
  if "forward" in errors:
    raise ValueError(errors["forward"])

  def limit_for(estimate):
    if limit is not None or estimate <= gen.default_scoped_vmem_bytes:
      return limit
    return min(int(1.25 * estimate) + 2 * MiB, gen.vmem_bytes)

  backward = max(estimates["dq"], estimates["dkv"])
  bf16_phi = gen.bf16_vpu if config.bf16_phi is None else bool(config.bf16_phi)
  return ResolvedTiles(local_tile=local_tile,
                       vmem_limit_bytes=limit_for(estimates["forward"]),
                       vmem_estimate_bytes=estimates["forward"], bf16_phi=bf16_phi,
                       backward_vmem_limit_bytes=limit_for(backward),
                       backward_vmem_estimate_bytes=backward,
                       dkv_local_tile=dkv_local_tile, **counts,
                       dq_vmem_limit_bytes=limit_for(estimates["dq"]),
                       dkv_vmem_limit_bytes=limit_for(estimates["dkv"]),
                       stack_split_products=gen.mxu_width >= 256,
                       normaliser_apart=head_dim % gen.mxu_width == 0,
                       merged_rotations=gen.mxu_width < 256,
                       backward_error=errors.get("dq") or errors.get("dkv"))
