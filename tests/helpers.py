"""Helpers shared by the test modules (importable: pyproject puts tests/ on the path)."""
import jax
import jax.numpy as jnp
import numpy as np


# Both backends of the op, for tests parametrised over them (tokamax style).
BACKENDS = {
    "xla": dict(implementation="xla"),
    "pallas": dict(implementation="pallas", interpret=True),
}


def layer_norm(x):
  """Per head vector: zero mean, unit variance, as the layer's LayerNorm (no affine)."""
  x = x - x.mean(-1, keepdims=True)
  return x / jnp.sqrt((x * x).mean(-1, keepdims=True) + 1e-5)


def layer_inputs(seed, batch, seq, heads, kv_heads, head_dim, sketch_dim, *, degree=4,
                  dtype=jnp.float32, v_mean=0.0, v_spread=1.0):
  """q, k, v, f_q, f_k at the magnitudes the Flax layer produces: q, k LayerNorm'd
  (|q|^2 = H, so (q.k)^p reaches H^p and denominators are >> 1), features from
  the random sketch of that degree; v = v_mean + v_spread * N(0, 1). Also a
  cotangent [B, T, N, H]."""
  import pallas_polysketch as ps
  ks = jax.random.split(jax.random.key(seed), 5)
  q = layer_norm(jax.random.normal(ks[0], (batch, seq, heads, head_dim)))
  k = layer_norm(jax.random.normal(ks[1], (batch, seq, kv_heads, head_dim)))
  v = v_mean + v_spread * jax.random.normal(ks[2], (batch, seq, kv_heads, head_dim))
  sketch = ps.random_sketch_init(ks[3], head_dim, sketch_dim, degree)
  fq, fk = ps.random_sketch_features(sketch, q), ps.random_sketch_features(sketch, k)
  cot = jax.random.normal(ks[4], (batch, seq, heads, head_dim))
  return tuple(x.astype(dtype) for x in (q, k, v, fq, fk)), cot


# Prefill from a nonzero DecodeState differentiated through its output and the
# returned state (tests/test_pallas_backward.py, in interpret mode), and the
# same programs lowered and compiled for TPU (tests/test_tpu_compile.py).
PREFILL_GRADIENT_CASES = {
    # name: (heads, kv_heads, head_dim, sketch_dim, local_exact, block, chunk, prefixes,
    #        scales of the cotangents of the returned S and z)
    # A sketched diagonal block, GQA; fills 44 and 100, so the returned state is
    # that at block 0 (row 0: the initial state itself) and block 1 (of 2).
    # r = 16: 192 symmetric pairs, so the dkv kernel copies the state's cotangent
    # into VMEM in two chunks (INJECT_CHUNK = 128), the second one partial.
    "sketched_gqa": (2, 1, 64, 16, False, 128, 40, (300, 356), (1e-5, 1e-4)),
    # H = 128: q, k, v, dO, dq, dk, dv tokens on rows; state at blocks 1, 2 of 3.
    "h128_gqa": (2, 1, 128, 16, True, 128, 200, (300, 356), (3e-6, 4e-5)),
}
# Context parallelism on the Pallas path with an initial state, a sketched
# diagonal block, H = 128 and GQA (tests/test_sharding.py; test_tpu_compile.py).
CONTEXT_PARALLEL_CASE = dict(devices=2, seq=512, heads=2, kv_heads=1, head_dim=128,
                             sketch_dim=16, local_exact=False, block=128)


# float32 tolerances derived from the dtype (tests/test_hardening.py's header):
# (q.k)^p multiplies the relative error of q.k (at most H * eps for a length-H
# dot product) by p, so outputs are good to about p H eps32 of their scale, and
# gradients, through one more product of the same kind, to 2 p H eps32.
EPS32 = float(jnp.finfo(jnp.float32).eps)


def f32_tol(degree, head_dim, grad=False):
  return (2 if grad else 1) * degree * head_dim * EPS32


def rel_err(got, want):
  """max |got - want| / max |want| in float64."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300))


def load_bench(name):
  """bench/NAME.py as a module (bench/ is not installed); registered in
  sys.modules first, where dataclasses look their module up."""
  import importlib.util
  import pathlib
  import sys
  path = pathlib.Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod
  spec.loader.exec_module(mod)
  return mod


# libtpu's topologies for compiling on this host (tests/test_tpu_compile.py,
# tests/test_features_kernels.py).
TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}


def topology_device(generation):
  """A device of the generation's libtpu topology; skips the test without libtpu."""
  import importlib.util
  import pytest
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install 'pallas_polysketch[tpu]')")
  from jax.experimental import topologies
  try:
    topology = topologies.get_topology_desc(TOPOLOGIES[generation], "tpu")
  except Exception as e:  # pragma: no cover - depends on the host's libtpu
    pytest.skip(f"libtpu could not describe {generation}: {e}")
  return topology.devices[0]


def topology_sharding(generation):
  """A single-device sharding on `topology_device(generation)`."""
  return jax.sharding.make_single_device_sharding(topology_device(generation))
