"""Lowering for TPU (Mosaic, no libtpu needed) and the real TPU compiler on CPU.

DESIGN §3.3: `jax.export` for platform "tpu" runs the Mosaic lowering on this
host. §3.4: with libtpu installed (the optional `tpu` extra), compiling for a
`get_topology_desc` device runs Mosaic's own passes (layouts, VMEM limits).
"""
import functools
import importlib.util
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Other processes on a shared host may hold libtpu's lock file.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_polysketch as ps
from pallas_polysketch.sharding import sharded_polysketch_attention
from pallas_polysketch.tpu_config import TileConfig
from helpers import CONTEXT_PARALLEL_CASE, PREFILL_GRADIENT_CASES, TOPOLOGIES, topology_sharding



def _shapes(b, t, n, h, r, dtype, sharding=None, kv_heads=None):
  kw = {} if sharding is None else {"sharding": sharding}
  kv = kv_heads or n
  sds = lambda heads, d: jax.ShapeDtypeStruct((b, t, heads, d), dtype, **kw)
  return [sds(n, h), sds(kv, h), sds(kv, h), sds(n, r), sds(kv, r)]


def _forward(*args, causal=True, local_exact=True, implementation="pallas", tile_config=None,
             block_size=256):
  return ps.polysketch_attention(*args, block_size=block_size, causal=causal,
                                 local_exact=local_exact, implementation=implementation,
                                 tile_config=tile_config)


def _grad(*args, **kw):
  loss = lambda *a: jnp.sum(_forward(*a, **kw).astype(jnp.float32))
  return jax.grad(loss, argnums=tuple(range(5)))(*args)


@pytest.mark.parametrize("h,r", [(64, 16), (64, 32), (64, 64), (128, 16), (128, 32), (128, 64)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_export_for_tpu_lowers_mosaic_kernels(h, r, dtype):
  exported = jax.export.export(jax.jit(_forward), platforms=["tpu"])(
      *_shapes(1, 1024, 4, h, r, dtype))
  text = exported.mlir_module()
  assert "tpu_custom_call" in text
  assert exported.out_avals[0].shape == (1, 1024, 4, h)


@pytest.mark.parametrize("causal,local_exact", [(True, True), (True, False), (False, True)])
def test_export_gradient_for_tpu(causal, local_exact):
  fn = functools.partial(_grad, causal=causal, local_exact=local_exact)
  exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(
      *_shapes(1, 1024, 4, 64, 32, jnp.bfloat16))
  text = exported.mlir_module()
  assert text.count("tpu_custom_call") >= 3  # forward + two backward kernels
  assert [a.shape for a in exported.out_avals] == [(1, 1024, 4, 64)] * 3 + [(1, 1024, 4, 32)] * 2


def test_default_implementation_exports_kernel_for_tpu_and_xla_for_cpu():
  fn = functools.partial(_forward, implementation=None)
  shapes = _shapes(1, 512, 2, 64, 16, jnp.float32)
  tpu_text = jax.export.export(jax.jit(fn), platforms=["tpu"])(*shapes).mlir_module()
  cpu_text = jax.export.export(jax.jit(fn), platforms=["cpu"])(*shapes).mlir_module()
  assert "tpu_custom_call" in tpu_text
  assert "tpu_custom_call" not in cpu_text


# Every (seq, block_size, local_tile) a test runs the kernels on in interpret mode
# (tests/test_pallas_*.py, test_hardening.py, test_inference.py, test_properties.py),
# lowered for TPU here: interpret mode accepts blocks Mosaic rejects.
INTERPRET_CONFIGS = [
    (300, 128, None), (256, 256, 128), (200, 128, None), (130, 128, None), (136, 128, None),
    (160, 128, None), (72, 128, None), (512, 128, None), (1024, 128, None), (512, 256, None),
    (1, 256, None), (129, 256, None), (255, 256, None), (513, 256, None), (200, 256, None),
    (384, 128, None), (64, 64, None), (128, 128, None), (256, 128, None),
    (512, 256, {"local_tile": 256, "dkv_local_tile": 128}),
    (512, 128, {"dq_blocks_per_step": 2, "dkv_blocks_per_step": 2}),
    (512, 128, {"dq_blocks_per_step": 1, "dkv_blocks_per_step": 4, "blocks_per_step": 2}),
    (512, 256, {"generation": "v6e"}),
]


@pytest.mark.parametrize("seq,block,local_tile", INTERPRET_CONFIGS)
def test_every_interpret_block_lowers_for_tpu(seq, block, local_tile):
  config = (TileConfig(**local_tile) if isinstance(local_tile, dict)
            else TileConfig(local_tile=local_tile))
  fn = functools.partial(_grad, block_size=block, tile_config=config)
  exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(
      *_shapes(1, seq, 2, 64, 16, jnp.float32))
  assert exported.mlir_module().count("tpu_custom_call") >= 3


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gqa_and_prefill_lower_for_tpu(kv_heads):
  shapes = _shapes(1, 512, 4, 64, 32, jnp.bfloat16, kv_heads=kv_heads)
  for causal in (True, False):
    exported = jax.export.export(jax.jit(functools.partial(_grad, causal=causal)),
                                 platforms=["tpu"])(*shapes)
    assert exported.mlir_module().count("tpu_custom_call") >= 3
  prefill = lambda *a: ps.prefill(*a, block_size=256, implementation="pallas")
  exported = jax.export.export(jax.jit(prefill), platforms=["tpu"])(*shapes)
  assert "tpu_custom_call" in exported.mlir_module()
  assert exported.out_avals[0].shape == (1, 512, 4, 64)


# --- states in and out: prefill's gradient, context parallelism -------------------
# The programs tests/test_pallas_backward.py and test_sharding.py differentiate in
# interpret mode with a nonzero initial state (and a returned state's cotangent,
# which the dkv kernel takes as a prefetched block index and an HBM operand).

def _prefill_grad(case, tile_config=None):
  """Gradient of a loss of prefill's output and returned S, z, with respect to
  q, k, v, both features and the initial S, z (a DecodeState built in the jit)."""
  _, _, _, _, local_exact, block, _, _, _ = case

  def fn(q, k, v, fq, fk, s0, z0, tail_k, tail_v, tail_fk, fill):
    def loss(q, k, v, fq, fk, s0, z0):
      state = ps.DecodeState(s0, z0, tail_k, tail_v, tail_fk, fill, block_size=block,
                             local_exact=local_exact)
      out, new = ps.prefill(q, k, v, fq, fk, state=state, block_size=block,
                            local_exact=local_exact, implementation="pallas",
                            tile_config=tile_config)
      return (jnp.sum(out.astype(jnp.float32)) + jnp.sum(new.prefix_state)
              + jnp.sum(new.normalizer))
    return jax.grad(loss, argnums=tuple(range(7)))(q, k, v, fq, fk, s0, z0)
  return fn


def _prefill_shapes(case, dtype=jnp.float32, sharding=None):
  heads, kv, h, r, _, block, chunk, prefixes, _ = case
  b = len(prefixes)
  kw = {} if sharding is None else {"sharding": sharding}
  sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, **kw)
  return _shapes(b, chunk, heads, h, r, dtype, sharding, kv_heads=kv) + [
      sds((b, kv, r * r, h), jnp.float32), sds((b, kv, r * r), jnp.float32),
      sds((b, block, kv, h), dtype), sds((b, block, kv, h), dtype),
      sds((b, block, kv, r), dtype), sds((b,), jnp.int32)]


def _context_parallel_grad(mesh, tile_config=None):
  c = CONTEXT_PARALLEL_CASE
  fn = sharded_polysketch_attention(mesh, seq_axis="seq", block_size=c["block"],
                                    local_exact=c["local_exact"], implementation="pallas",
                                    tile_config=tile_config)
  return jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=tuple(range(5)))


def _context_parallel_shapes(mesh, dtype=jnp.float32):
  from jax.sharding import NamedSharding, PartitionSpec
  c = CONTEXT_PARALLEL_CASE
  sharding = NamedSharding(mesh, PartitionSpec(None, "seq"))
  return _shapes(1, c["seq"], c["heads"], c["head_dim"], c["sketch_dim"], dtype, sharding,
                 kv_heads=c["kv_heads"])


@pytest.mark.parametrize("case", list(PREFILL_GRADIENT_CASES))
def test_prefill_gradient_lowers_for_tpu(case):
  exported = jax.export.export(jax.jit(_prefill_grad(PREFILL_GRADIENT_CASES[case])),
                               platforms=["tpu"])(*_prefill_shapes(PREFILL_GRADIENT_CASES[case]))
  text = exported.mlir_module()
  for name in ("polysketch_causal_forward", "polysketch_bwd_dq", "polysketch_bwd_dkv"):
    assert name in text, name


def test_context_parallel_gradient_lowers_for_tpu():
  from jax.sharding import Mesh
  mesh = Mesh(np.array(jax.devices()[:CONTEXT_PARALLEL_CASE["devices"]]), ("seq",))
  exported = jax.export.export(jax.jit(_context_parallel_grad(mesh)), platforms=["tpu"])(
      *_context_parallel_shapes(mesh))
  assert exported.mlir_module().count("tpu_custom_call") >= 5  # fwd, dq, dkv, state sum, its VJP


def _learned_features_grad(x):
  params = ps.learned_sketch_init(jax.random.key(0), head_dim=x.shape[-1], sketch_dim=16)
  features = lambda x: ps.learned_sketch_features(params, x, implementation="pallas")
  return jax.grad(lambda x: jnp.sum(features(x)))(x)


def _x64_cases():
  from jax.sharding import Mesh
  shapes = _shapes(1, 512, 4, 64, 16, jnp.float32, kv_heads=2)
  prefill = PREFILL_GRADIENT_CASES["sketched_gqa"]
  mesh = Mesh(np.array(jax.devices()[:CONTEXT_PARALLEL_CASE["devices"]]), ("seq",))
  return {
      "causal": (_grad, shapes),
      "causal_bf16": (_grad, _shapes(1, 512, 4, 64, 16, jnp.bfloat16, kv_heads=2)),
      "non_causal": (functools.partial(_grad, causal=False), shapes),
      "segments": (_segment_grad, shapes + [_ids_shape(1, 512)]),
      "segments_non_causal": (functools.partial(_segment_grad, causal=False),
                              shapes + [_ids_shape(1, 512)]),
      "prefill_gradient": (_prefill_grad(prefill), _prefill_shapes(prefill)),
      "context_parallel": (_context_parallel_grad(mesh), _context_parallel_shapes(mesh)),
      "learned_features": (_learned_features_grad,
                           [jax.ShapeDtypeStruct((1, 512, 4, 64), jnp.float32)]),
  }


def _kernel_jaxprs(jaxpr):
  """The kernel and index-map jaxprs of every pallas_call in a jaxpr, nested
  ones included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      yield eqn.params["jaxpr"]
      for mapping in eqn.params["grid_mapping"].block_mappings:
        yield getattr(mapping.index_map_jaxpr, "jaxpr", mapping.index_map_jaxpr)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _kernel_jaxprs(sub)


def _wide_values(jaxpr):
  """(primitive, dtype) of the 64-bit values a jaxpr and its sub-jaxprs compute."""
  for eqn in jaxpr.eqns:
    for var in (*eqn.invars, *eqn.outvars):
      dtype = getattr(var.aval, "dtype", None)
      if isinstance(dtype, np.dtype) and dtype.itemsize == 8:   # not semaphores
        yield eqn.primitive.name, str(dtype)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _wide_values(sub)


@pytest.mark.parametrize("case", ["causal", "causal_bf16", "non_causal", "segments",
                                  "segments_non_causal", "prefill_gradient", "context_parallel",
                                  "learned_features"])
def test_x64_keeps_the_kernels_32_bit_and_lowers_them_for_tpu(case):
  """With jax_enable_x64 the kernels (every pass, gradients included) and their
  index maps compute no 64-bit value, and lower for TPU: a Python int or float
  in them had become one (a roll's shift: "'tpu.dynamic_rotate' op operand #1
  must be 32-bit signless integer, but got 'i64'"; a `where`'s 0.0: a libtpu
  abort), which interpret mode runs."""
  fn, shapes = _x64_cases()[case]
  with jax.enable_x64(True):
    kernels = list(_kernel_jaxprs(jax.make_jaxpr(fn)(*shapes).jaxpr))
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*shapes)
  assert kernels and "tpu_custom_call" in exported.mlir_module()
  assert [w for k in kernels for w in _wide_values(k)] == []


@pytest.mark.tpu_compile
def test_libtpu_compiles_with_x64():
  """The XLA around the kernels is 64-bit with jax_enable_x64; libtpu compiles
  it with the kernels (v5e: a gradient and a prefill)."""
  sharding = topology_sharding("v5e")
  config = TileConfig.for_generation("v5e")
  shapes = _shapes(1, 512, 4, 64, 16, jnp.float32, sharding, kv_heads=2)
  prefill = lambda *a: ps.prefill(*a, block_size=256, implementation="pallas",
                                  tile_config=config)
  with jax.enable_x64(True):
    for fn in (functools.partial(_grad, tile_config=config), prefill):
      jax.jit(fn).lower(*shapes).compile()


def test_prefill_gradient_over_vmem_says_why_before_lowering():
  """Where the backward kernels cannot fit (two query heads per kv head at
  H = 128, r = 64 on v4), differentiating prefill raises the tiling's ValueError
  while the gradient is traced, before any kernel is lowered."""
  big_gqa = (4, 2, 128, 64, True, 256, 1024, (300,), None)
  fn = _prefill_grad(big_gqa, TileConfig.for_generation("v4"))
  with pytest.raises(ValueError, match=r"the dq kernel needs about .* MiB of VMEM, over "
                                       r"the v4's 16 MiB"):
    jax.export.export(jax.jit(fn), platforms=["tpu"])(*_prefill_shapes(big_gqa, jnp.bfloat16))


# v5e and v6e (the generations of the speed goals) compile every case in the
# default suite; v4 and v5p compile every case with `-m slow`, and their
# VMEM-bound largest backwards in the default suite
# (test_libtpu_compiles_the_largest_backwards_in_v4_and_v5p_vmem).
EVERY_CASE_GENERATIONS = [
    g if g in ("v5e", "v6e") else pytest.param(g, marks=pytest.mark.slow) for g in TOPOLOGIES]
BIG_PREFILL_GRADIENT_CASE = (2, 2, 128, 64, True, 256, 1024, (300,), None)


@pytest.mark.tpu_compile
@pytest.mark.parametrize("generation", EVERY_CASE_GENERATIONS)
def test_libtpu_compiles_state_gradients(generation):
  """Mosaic's passes accept the backward kernels with states in and out: the
  prefill gradients and the context-parallel gradient the interpret-mode tests
  run (float32, as there), and the prefill gradient at the largest tile set in
  bf16 (H = 128, r = 64, b = 256), which fits v4's 16 MiB of VMEM only because
  the returned state's cotangent stays in HBM (a state-sized input block ran
  out of VMEM by 2.5 MiB there)."""
  from jax.experimental import topologies
  from jax.sharding import Mesh
  sharding = topology_sharding(generation)
  config = TileConfig.for_generation(generation)
  for case in PREFILL_GRADIENT_CASES.values():
    jax.jit(_prefill_grad(case, config)).lower(*_prefill_shapes(case, sharding=sharding)).compile()
  big = BIG_PREFILL_GRADIENT_CASE
  jax.jit(_prefill_grad(big, config)).lower(
      *_prefill_shapes(big, jnp.bfloat16, sharding)).compile()
  topology = topologies.get_topology_desc(TOPOLOGIES[generation], "tpu")
  mesh = Mesh(np.array(topology.devices[:CONTEXT_PARALLEL_CASE["devices"]]), ("seq",))
  jax.jit(_context_parallel_grad(mesh, config)).lower(*_context_parallel_shapes(mesh)).compile()


@pytest.mark.tpu_compile
def test_libtpu_compiles_v6e_stacked_backward_at_the_interpret_shapes():
  """The bf16 gradients the interpret tests run with v6e's tiles (the split
  products stacked, `ResolvedTiles.stack_split_products`): block 128 at
  r = 16 (test_hardening) and block 256 at r = 32 (test_pallas_backward)."""
  sharding = topology_sharding("v6e")
  config = TileConfig(generation="v6e")
  for seq, heads, kv_heads, r, block in ((1024, 2, 2, 16, 128), (512, 2, 2, 32, 256)):
    grad = functools.partial(_grad, block_size=block, tile_config=config)
    shapes = _shapes(1, seq, heads, 64, r, jnp.bfloat16, sharding, kv_heads=kv_heads)
    jax.jit(grad).lower(*shapes).compile()


# The gradients the interpret tests of the backward's normaliser paths run
# (`ResolvedTiles.normaliser_apart`): (generation, seq, heads, kv heads, H, r,
# block, local_tile, dtype).
NORMALISER_INTERPRET_CASES = [
    ("v5e", 512, 4, 2, 128, 16, 256, 128, jnp.float32),   # test_normaliser_apart_and_inside_agree
    ("v6e", 512, 4, 2, 128, 16, 256, 128, jnp.float32),
    ("v6e", 512, 2, 2, 128, 16, 256, None, jnp.bfloat16),  # test_pallas_backward CASES
    ("v5e", 1024, 2, 2, 128, 16, 128, None, jnp.bfloat16),  # test_hardening, H = 128
    ("v5e", 256, 1, 1, 64, 8, 128, None, jnp.float32),      # test_overflow, large state
    ("v5e", 256, 1, 1, 128, 8, 128, None, jnp.float32),     # ... S scaled per block
    ("v5e", 256, 2, 1, 128, 8, 128, None, jnp.float32),     # ... large and small dens
    ("v6e", 256, 2, 1, 128, 8, 128, None, jnp.float32),
]


@pytest.mark.parametrize("case", NORMALISER_INTERPRET_CASES, ids=lambda c: f"{c[0]}-{c[4]}-{c[1]}")
def test_normaliser_interpret_cases_lower_and_compile(case):
  """Lowered for TPU always, and compiled by libtpu for their generation when
  it is installed."""
  gen, seq, heads, kv, h, r, block, local_tile, dtype = case
  config = TileConfig(generation=gen, local_tile=local_tile)
  grad = jax.jit(functools.partial(_grad, block_size=block, tile_config=config))
  exported = jax.export.export(grad, platforms=["tpu"])(
      *_shapes(1, seq, heads, h, r, dtype, kv_heads=kv))
  assert exported.mlir_module().count("tpu_custom_call") >= 3
  if importlib.util.find_spec("libtpu") is None:
    return
  sharding = topology_sharding(gen)
  grad.lower(*_shapes(1, seq, heads, h, r, dtype, sharding, kv_heads=kv)).compile()


@pytest.mark.tpu_compile
@pytest.mark.parametrize("generation", ["v4", "v5p"])
def test_libtpu_compiles_the_largest_backwards_in_v4_and_v5p_vmem(generation):
  """For v4 and v5p, the default suite's part of test_libtpu_compiles_state_gradients
  and test_libtpu_compiles_forward_and_gradient (with `-m slow`): the
  largest tile set's gradient (H = 128, r = 64); on v4 also its prefill
  gradient, which fits v4's 16 MiB of VMEM only with the returned state's
  cotangent in HBM, and two query heads per kv head are refused there, naming
  the dq kernel."""
  sharding = topology_sharding(generation)
  config = TileConfig.for_generation(generation)
  big = _shapes(1, 1024, 2, 128, 64, jnp.bfloat16, sharding)
  jax.jit(functools.partial(_grad, tile_config=config)).lower(*big).compile()
  if generation == "v4":
    jax.jit(_prefill_grad(BIG_PREFILL_GRADIENT_CASE, config)).lower(
        *_prefill_shapes(BIG_PREFILL_GRADIENT_CASE, jnp.bfloat16, sharding)).compile()
    big_gqa = _shapes(1, 1024, 4, 128, 64, jnp.bfloat16, sharding, kv_heads=2)
    with pytest.raises(ValueError, match=r"the dq kernel needs about .* MiB of VMEM, over "
                                         r"the v4's 16 MiB"):
      jax.jit(functools.partial(_grad, tile_config=config)).lower(*big_gqa)


@pytest.mark.tpu_compile
@pytest.mark.parametrize("generation", EVERY_CASE_GENERATIONS)
def test_libtpu_compiles_forward_and_gradient(generation):
  sharding = topology_sharding(generation)
  config = TileConfig.for_generation(generation)
  shapes = _shapes(1, 2048, 4, 64, 32, jnp.bfloat16, sharding)
  for causal in (True, False):
    fwd = jax.jit(functools.partial(_forward, causal=causal, tile_config=config))
    compiled = fwd.lower(*shapes).compile()
    assert compiled.memory_analysis() is not None
  grad = jax.jit(functools.partial(_grad, tile_config=config)).lower(*shapes).compile()
  flops = grad.cost_analysis()
  flops = flops[0] if isinstance(flops, (list, tuple)) else flops
  assert flops["flops"] > 0
  # The largest supported tile set: the forward fits every generation's VMEM.
  big = _shapes(1, 1024, 2, 128, 64, jnp.bfloat16, sharding)
  jax.jit(functools.partial(_forward, tile_config=config)).lower(*big).compile()
  # Its backward compiles everywhere, v4's 16 MiB of VMEM included (libtpu
  # needs 7.7 / 9.7 MiB for dq / dkv there, bench/results/vmem_limits.md) ...
  jax.jit(functools.partial(_grad, tile_config=config)).lower(*big).compile()
  # ... but not with two query heads per kv head on v4, which says why.
  if generation == "v4":
    big_gqa = _shapes(1, 1024, 4, 128, 64, jnp.bfloat16, sharding, kv_heads=2)
    with pytest.raises(ValueError, match=r"the dq kernel needs about .* MiB of VMEM, over "
                                         r"the v4's 16 MiB"):
      jax.jit(functools.partial(_grad, tile_config=config)).lower(*big_gqa)
  # GQA (4 query heads per kv head) and a prefill, which passes states in and out.
  gqa = _shapes(1, 1024, 8, 64, 32, jnp.bfloat16, sharding, kv_heads=2)
  jax.jit(functools.partial(_grad, tile_config=config)).lower(*gqa).compile()
  prefill = lambda *a: ps.prefill(*a, block_size=256, implementation="pallas",
                                  tile_config=config)
  jax.jit(prefill).lower(*gqa).compile()



@pytest.mark.tpu_compile
@pytest.mark.parametrize("input_dtype", [jnp.float16, jnp.float32])
def test_libtpu_compiles_float16_features(input_dtype):
  """float16 features (beside float16 or float32 q, k, v) run the kernels in
  float32: as float16 they reached a Mosaic load it cannot compile ("Invalid
  vector type for load") in the gradient and in prefill. Also at
  test_hardening's float16 interpret shape (T = 300, padded; block 128, r = 16)."""
  sharding = topology_sharding("v5e")
  for t, r, block_size in ((512, 32, 256), (300, 16, 128)):
    shapes = _shapes(1, t, 2, 64, r, input_dtype, sharding)
    shapes = shapes[:3] + [jax.ShapeDtypeStruct(x.shape, jnp.float16, sharding=sharding)
                           for x in shapes[3:]]
    forward = functools.partial(_forward, block_size=block_size)
    grad = functools.partial(_grad, block_size=block_size)
    prefill = lambda *a, b=block_size: ps.prefill(*a, block_size=b, implementation="pallas")
    for fn in (forward, grad, prefill):
      lowered = jax.jit(fn).lower(*shapes)
      assert "tpu_custom_call" in lowered.as_text(), (t, fn)
      lowered.compile()


@pytest.mark.tpu_compile
@pytest.mark.parametrize("generation", ["v5e", "v6e"])
def test_compiled_forward_reads_the_public_layout_without_copies(generation):
  """At the benchmark's head count (12) the forward's kernel operands are
  bitcasts of what the TPU compiler stores for [B, T, N, H] by default (T
  minor for H = 64, [B, N, T, H] for H = 128): no layout copy runs around
  the kernel, with or without GQA. (The default depends on N: for N = 4,
  H = 128 it is row-major [B, T, N, H] and a copy remains; BUILD_NOTES.)"""
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "bench"))
  import bundles
  sharding = topology_sharding(generation)
  config = TileConfig.for_generation(generation)
  for h, r, kv in ((64, 32, None), (128, 64, None), (64, 32, 4)):
    shapes = _shapes(1, 2048, 12, h, r, jnp.bfloat16, sharding, kv_heads=kv)
    compiled = jax.jit(functools.partial(_forward, tile_config=config)).lower(*shapes).compile()
    text = compiled.as_text()
    assert "polysketch_causal_forward" in text
    assert bundles.layout_copies(text) == [], (h, r, kv)

# --- packed segments (_pallas_segments.py) ----------------------------------------

def _ids_shape(b, t, sharding=None):
  kw = {} if sharding is None else {"sharding": sharding}
  return jax.ShapeDtypeStruct((b, t), jnp.int32, **kw)


def _segment_forward(*args, causal=True, local_exact=True, implementation="pallas",
                     tile_config=None, block_size=256):
  *args, ids = args
  return ps.polysketch_attention(*args, segment_ids=ids, block_size=block_size, causal=causal,
                                 local_exact=local_exact, implementation=implementation,
                                 tile_config=tile_config)


def _segment_grad(*args, **kw):
  loss = lambda *a: jnp.sum(_segment_forward(*a, args[-1], **kw).astype(jnp.float32))
  return jax.grad(loss, argnums=tuple(range(5)))(*args[:5])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("causal,local_exact", [(True, True), (True, False), (False, True)])
def test_segment_kernel_exports_for_tpu(causal, local_exact, dtype):
  """The segment walk's kernel lowers through Mosaic: once causal, twice (a
  forward and a strict reverse walk) non-causal; GQA, 2 query heads per kv head."""
  fn = functools.partial(_segment_forward, causal=causal, local_exact=local_exact)
  exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(
      *_shapes(1, 1024, 4, 64, 32, dtype, kv_heads=2), _ids_shape(1, 1024))
  text = exported.mlir_module()
  assert text.count("polysketch_segment_forward") >= (1 if causal else 2)
  assert exported.out_avals[0].shape == (1, 1024, 4, 64)


@pytest.mark.parametrize("causal", [True, False])
def test_segment_gradient_exports_for_tpu(causal):
  fn = functools.partial(_segment_grad, causal=causal)
  exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(
      *_shapes(1, 1024, 4, 64, 32, jnp.bfloat16), _ids_shape(1, 1024))
  text = exported.mlir_module()
  for name in ("polysketch_segment_forward", "polysketch_segment_dq", "polysketch_segment_dkv"):
    assert name in text
  assert [a.shape for a in exported.out_avals] == [(1, 1024, 4, 64)] * 3 + [(1, 1024, 4, 32)] * 2


# Every (seq, block) tests/test_segments.py and test_sharding.py (per shard) run
# the segment kernel on in interpret mode, and one block covering a short seq.
# (heads, kv heads, H, r): (4, 2, 32, 8) unless given; test_overflow.py's
# segments at H = 128 are the last.
SEGMENT_INTERPRET_CONFIGS = [(440, 128), (128, 128), (1, 256), (72, 128), (200, 256),
                             (256, 128, (2, 1, 128, 8))]


@pytest.mark.parametrize("config", SEGMENT_INTERPRET_CONFIGS, ids=str)
def test_every_interpret_segment_block_lowers_for_tpu(config):
  """Lowered for TPU always, and compiled by libtpu for v5e (the tiles the
  interpret tests resolve on CPU) when it is installed."""
  seq, block, (heads, kv, h, r) = (*config, (4, 2, 32, 8))[:3]
  grad = jax.jit(functools.partial(_segment_grad, block_size=block))
  exported = jax.export.export(grad, platforms=["tpu"])(
      *_shapes(2, seq, heads, h, r, jnp.float32, kv_heads=kv), _ids_shape(2, seq))
  assert "polysketch_segment_dkv" in exported.mlir_module()
  if importlib.util.find_spec("libtpu") is None:
    return
  sharding = topology_sharding("v5e")
  lowered = grad.lower(*_shapes(2, seq, heads, h, r, jnp.float32, sharding, kv_heads=kv),
                       _ids_shape(2, seq, sharding))
  assert "polysketch_segment_dkv" in lowered.as_text()
  lowered.compile()


def test_default_implementation_with_segments_exports_kernel_for_tpu_and_xla_for_cpu():
  fn = functools.partial(_segment_forward, implementation=None)
  shapes = _shapes(1, 512, 2, 64, 16, jnp.float32) + [_ids_shape(1, 512)]
  tpu_text = jax.export.export(jax.jit(fn), platforms=["tpu"])(*shapes).mlir_module()
  cpu_text = jax.export.export(jax.jit(fn), platforms=["cpu"])(*shapes).mlir_module()
  assert "polysketch_segment_forward" in tpu_text
  assert "tpu_custom_call" not in cpu_text


@pytest.mark.tpu_compile
@pytest.mark.parametrize("part", ["forward", "gradient", "largest_tiles"])
@pytest.mark.parametrize("generation", ["v5e", pytest.param("v6e", marks=pytest.mark.slow)])
def test_libtpu_compiles_segment_kernel(generation, part):
  """Mosaic's own passes (layouts of the int32 label blocks, VMEM) accept the
  segment kernels: forward causal and not, GQA, bf16 and f32, the gradient
  (dq and dkv kernels), and the largest tile set. In three parts, which xdist
  can run side by side (each compile's time does not depend on T: 2048 and 512
  took the same)."""
  sharding = topology_sharding(generation)
  config = TileConfig.for_generation(generation)
  ids = _ids_shape(1, 2048, sharding)
  if part == "forward":
    # bf16 causal and not; float32 non-causal (float32's causal forward compiles
    # for v5e in the gradients of test_every_interpret_segment_block_lowers_for_tpu)
    for dtype, causal in ((jnp.bfloat16, True), (jnp.bfloat16, False), (jnp.float32, False)):
      shapes = _shapes(1, 2048, 8, 64, 32, dtype, sharding, kv_heads=2)
      fwd = functools.partial(_segment_forward, causal=causal, tile_config=config)
      jax.jit(fwd).lower(*shapes, ids).compile()
  elif part == "gradient":
    grad = functools.partial(_segment_grad, tile_config=config)
    jax.jit(grad).lower(*_shapes(1, 2048, 4, 64, 32, jnp.bfloat16, sharding), ids).compile()
  else:
    big = _shapes(1, 1024, 2, 128, 64, jnp.bfloat16, sharding) + [_ids_shape(1, 1024, sharding)]
    jax.jit(functools.partial(_segment_forward, tile_config=config)).lower(*big).compile()
    jax.jit(functools.partial(_segment_grad, tile_config=config)).lower(*big).compile()
