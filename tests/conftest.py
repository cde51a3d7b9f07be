"""Shared test set-up: CPU only, small random inputs.

The tests run on CPU. libtpu (the optional `tpu` extra) is installed for
compile checks, and without JAX_PLATFORMS jax would try to open a TPU.
"""
import importlib.metadata
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 8 CPU devices for the sharding tests (tests/test_sharding.py); every other
# test runs on the first.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

# XLA's CPU backend without LLVM's optimisation passes: the tests' programs
# (interpret-mode kernels above all) are compile-bound, and compiling at
# level 0 took 36% less time in tests/test_pallas_backward.py. The tolerances
# are derived from the dtype, and the suite passes at either level. libtpu's
# compiles (test_tpu_compile.py, v5e) took the same time with it.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
# And, on jaxlib 0.10 (CI's), without XLA's newer CPU fusion emitters: the
# legacy emitter compiles the interpret-mode kernels' programs about twice as
# fast (one GQA gradient test, 21.6 -> 10.8 s; the default suite's test
# time 2728 -> 1724 s). Its float32 tanh is a few ulps less accurate, which
# only the GELU accuracy test resolves (test_sketches.py runs that one in a
# fresh process with the default emitters). jaxlib 0.11 and 0.12 abort on the
# flag (they dropped it).
if ("xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]
    and importlib.metadata.version("jaxlib").startswith("0.10.")):
  os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"

import importlib.util  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402  (after JAX_PLATFORMS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

if importlib.util.find_spec("pallas_polysketch.ref") is None:
  # `ref/` is installed as pallas_polysketch.ref; a source directory that comes
  # first on sys.path (e.g. `python -m pytest` from the root with a
  # non-editable install) has no such subpackage.
  import pallas_polysketch

  pytest.exit(
      f"pallas_polysketch was imported from {pallas_polysketch.__path__[0]}, which has "
      "no `ref` subpackage: run the installed package's tests with `.venv/bin/pytest` "
      "(not `python -m pytest` from the source root), or `pip install -e .`", returncode=4)


def _make_qkv(seed, batch, seq, heads, head_dim, dtype=jnp.float32):
  """q, k, v with q.k of order 1, so (q.k)^p stays O(1) and no weight dominates."""
  rng = np.random.default_rng(seed)
  scale = head_dim ** -0.25
  q, k, v = (rng.standard_normal((batch, seq, heads, head_dim)) for _ in range(3))
  return (jnp.asarray(q * scale, dtype), jnp.asarray(k * scale, dtype),
          jnp.asarray(v, dtype))


@pytest.fixture
def make_qkv():
  """make_qkv(seed, batch, seq, heads, head_dim, dtype=float32) -> (q, k, v)."""
  return _make_qkv


@pytest.fixture
def make_inputs():
  """make_inputs(seed, batch, seq, heads, head_dim, sketch_dim, dtype=float32)
  -> (q, k, v, q_features, k_features) with degree-4 random-sketch features."""
  import pallas_polysketch as ps

  def make(seed, batch, seq, heads, head_dim, sketch_dim, dtype=jnp.float32):
    q, k, v = _make_qkv(seed, batch, seq, heads, head_dim, dtype)
    params = ps.random_sketch_init(jax.random.key(seed), head_dim, sketch_dim, degree=4)
    fq = ps.random_sketch_features(params, q.astype(jnp.float32)).astype(dtype)
    fk = ps.random_sketch_features(params, k.astype(jnp.float32)).astype(dtype)
    return q, k, v, fq, fk

  return make



@pytest.fixture
def layer_inputs():
  """layer_inputs(seed, batch, seq, heads, kv_heads, head_dim, sketch_dim, *,
  degree=4, dtype=float32, v_mean=0, v_spread=1) -> ((q, k, v, fq, fk), cotangent)."""
  from helpers import layer_inputs as make
  return make


# Hypothesis profiles (tests/test_properties.py). "ci", the default: few
# examples, derandomised so every CI run draws the same ones, no deadline (a
# draw compiles new shapes). "slow": many more, randomised, failures saved in
# .hypothesis/ and replayed first. HYPOTHESIS_PROFILE=slow selects it for
# every property test, and `pytest -m slow` runs the slow-marked variants,
# which use it.
try:
  from hypothesis import HealthCheck, settings  # noqa: E402
except ImportError:  # the `test` extra brings it; other tests run without it
  pass
else:
  settings.register_profile(
      "ci", max_examples=12, deadline=None, derandomize=True, database=None,
      print_blob=True, suppress_health_check=[HealthCheck.too_slow])
  settings.register_profile(
      "slow", max_examples=200, deadline=None, print_blob=True,
      suppress_health_check=[HealthCheck.too_slow])
  settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
  """Frees each test file's compiled programs when it ends. An xdist worker
  that kept them grew past 6 GB and twice died in XLA's CPU compiler
  (segmentation fault, tests/test_sharding.py) late in the suite; the file
  passes alone (BUILD_NOTES, "Tests")."""
  yield
  jax.clear_caches()



# One persistent compilation cache per test session, shared by its xdist
# workers and the processes tests start (the benchmarks' parallel jobs): a
# program compiled again (in another module, after _drop_compiled_programs,
# by another bench.main call or in another worker) is read back instead.
# The controller (or the only process, with -n 0) makes an empty directory
# and removes it when the session ends, so nothing carries over between runs;
# the workers, started after pytest_configure, inherit it through the
# environment. The cache's key holds the backend's platform and version, the
# XLA flags and, for libtpu's compiles, the topology, so a CPU program never
# answers for a TPU one.

def pytest_configure(config):
  if not hasattr(config, "workerinput"):  # not an xdist worker
    cache_dir = tempfile.mkdtemp(prefix="pallas_polysketch-jax-cache-")
    config.add_cleanup(lambda: shutil.rmtree(cache_dir, ignore_errors=True))
    # Every program, however quick to compile or small (jax's defaults skip
    # those under 1 s).
    os.environ.update(JAX_COMPILATION_CACHE_DIR=cache_dir,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  # libtpu's compile-only client writes its entries but cannot read them back
  # (jax warns and compiles again): every libtpu compile test still compiles.
  config.addinivalue_line(
      "filterwarnings", "ignore:Error reading persistent compilation cache entry for "
      ".*PjRtCompiler must be constructed with a Client:UserWarning")
