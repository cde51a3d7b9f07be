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
import pytest

import pallas_polysketch as ps
from pallas_polysketch.tpu_config import TileConfig

TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}


def _shapes(b, t, n, h, r, dtype, sharding=None):
  kw = {} if sharding is None else {"sharding": sharding}
  return ([jax.ShapeDtypeStruct((b, t, n, h), dtype, **kw)] * 3
          + [jax.ShapeDtypeStruct((b, t, n, r), dtype, **kw)] * 2)


def _forward(*args, causal=True, local_exact=True, implementation="pallas", tile_config=None):
  return ps.polysketch_attention(*args, block_size=256, causal=causal, local_exact=local_exact,
                                 implementation=implementation, tile_config=tile_config)


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


def _topology_device(generation):
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install 'pallas_polysketch[tpu]')")
  from jax.experimental import topologies
  try:
    topology = topologies.get_topology_desc(TOPOLOGIES[generation], "tpu")
  except Exception as e:  # pragma: no cover - depends on the host's libtpu
    pytest.skip(f"libtpu could not describe {generation}: {e}")
  return topology.devices[0]


@pytest.mark.tpu_compile
@pytest.mark.parametrize("generation", list(TOPOLOGIES))
def test_libtpu_compiles_forward_and_gradient(generation):
  from jax.sharding import SingleDeviceSharding
  sharding = SingleDeviceSharding(_topology_device(generation))
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
  # The largest supported tile set also fits this generation's VMEM.
  big = _shapes(1, 1024, 2, 128, 64, jnp.bfloat16, sharding)
  jax.jit(functools.partial(_forward, tile_config=config)).lower(*big).compile()
