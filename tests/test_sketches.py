"""Sketches (DESIGN §1.2): shapes, the identity at degree 2, unbiasedness."""
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_polysketch as ps
from pallas_polysketch import ref

from helpers import EPS32

H = 8


def _unit_pairs():
  """Unit x and three unit y with <x, y> = 0.9, -0.7, 0: returns (x [H], ys [3, H], dots)."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal(H)
  x /= np.linalg.norm(x)
  u = rng.standard_normal(H)
  u -= (u @ x) * x
  u /= np.linalg.norm(u)
  dots = np.array([0.9, -0.7, 0.0])
  ys = dots[:, None] * x + np.sqrt(1 - dots[:, None] ** 2) * u
  return x, ys, dots


@pytest.mark.parametrize("sketch_type", ["gaussian", "hadamard"])
@pytest.mark.parametrize("degree", [4, 8])
def test_random_sketch_is_unbiased(degree, sketch_type):
  """Averaged over independent sketches, <f(x), f(y)> -> <x, y>^(degree/2).

  The sample mean of n i.i.d. draws is within 5 standard errors of its
  expectation (a 5-sigma bound: the seed is fixed, so the test is
  deterministic, and a biased sketch such as the 1/r scaling, G1 = G2, or one
  S_m shared by both branches lands tens of standard errors away). The
  hadamard sketch (H = 8 and r = 8 are powers of two) is hadamard at both
  levels of degree 8.
  """
  r, n = 8, 20000
  x, ys, dots = _unit_pairs()
  points = jnp.asarray(np.concatenate([x[None], ys]), jnp.float32)  # [4, H]

  @jax.jit
  @jax.vmap
  def inner_products(key):
    params = ps.random_sketch_init(key, H, sketch_dim=r, degree=degree,
                                   sketch_type=sketch_type)
    f = ps.random_sketch_features(params, points)  # [4, r]
    return f[1:] @ f[0]  # [3]

  samples = np.asarray(inner_products(jax.random.split(jax.random.key(degree), n)),
                       np.float64)
  mean, stderr = samples.mean(axis=0), samples.std(axis=0, ddof=1) / math.sqrt(n)
  target = dots ** (degree // 2)
  assert np.all(np.abs(mean - target) <= 5 * stderr), (mean, target, stderr)
  # The bound is tight enough to mean something: well below the largest target.
  assert 5 * stderr[0] < 0.2 * abs(target[0])


@pytest.mark.parametrize("degree,r", [(4, 8), (8, 8), (16, 4)])
def test_random_sketch_shapes(degree, r):
  params = ps.random_sketch_init(jax.random.key(0), H, sketch_dim=r, degree=degree)
  x = jnp.ones((2, 5, 3, H))
  f = ps.random_sketch_features(params, x)
  assert f.shape == (2, 5, 3, r) and f.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(f)))
  # Algorithm 1: log2(degree) - 1 levels of Gaussian matrices, head_dim -> r
  # at the bottom and r -> r above.
  leaves = jax.tree_util.tree_leaves(params)
  assert len(leaves) == 2 * (degree // 2 - 1)
  assert params["g1"].shape == params["g2"].shape == ((H if degree == 4 else r), r)
  for leaf in leaves:
    assert leaf.dtype == jnp.float32 and leaf.shape[1] == r


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_random_sketch_degree2_is_identity():
  params = ps.random_sketch_init(jax.random.key(0), H, sketch_dim=32, degree=2)
  assert params == {}
  x = _normal(1, (2, 5, 3, H))
  f = ps.random_sketch_features(params, x)
  assert f.shape == x.shape
  np.testing.assert_array_equal(f, x)


def test_random_sketch_degree4_formula():
  """f(x) = (x G1 * x G2) / sqrt(r), written out."""
  r = 8
  params = ps.random_sketch_init(jax.random.key(3), H, sketch_dim=r, degree=4)
  x = np.random.default_rng(4).standard_normal((6, H))
  g1, g2 = (np.asarray(params[name], np.float64) for name in ("g1", "g2"))
  assert np.std(g1) == pytest.approx(1.0, abs=0.25)  # standard normal entries
  assert not np.allclose(g1, g2)
  want = (x @ g1) * (x @ g2) / math.sqrt(r)
  got = ps.random_sketch_features(params, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_random_sketch_keys_differ():
  a = ps.random_sketch_init(jax.random.key(0), H, sketch_dim=8, degree=8)
  b = ps.random_sketch_init(jax.random.key(1), H, sketch_dim=8, degree=8)
  assert not np.allclose(a["g1"], b["g1"])
  # The two branches of one level are independent draws.
  assert not np.allclose(a["left"]["g1"], a["right"]["g1"])


def test_self_tensor():
  f, g = _normal(0, (2, 3, 5)), _normal(1, (2, 3, 5))
  phi_f, phi_g = ps.self_tensor(f), ps.self_tensor(g)
  assert phi_f.shape == (2, 3, 25)
  fn = np.asarray(f)
  np.testing.assert_allclose(phi_f[1, 2].reshape(5, 5), np.outer(fn[1, 2], fn[1, 2]), rtol=1e-6)
  # <phi(f), phi(g)> = <f, g>^2
  np.testing.assert_allclose(jnp.sum(phi_f * phi_g, -1), jnp.sum(f * g, -1) ** 2,
                             rtol=1e-4, atol=1e-5)
  assert ref.self_tensor is ps.self_tensor


@pytest.mark.parametrize("params", [None, [], ()])
def test_random_sketch_features_refuses_params_that_are_not_a_dict(params):
  """None, [] or () were taken as degree 2's {}: x came back as its features."""
  with pytest.raises(ValueError, match=r"params is not a random sketch.*got " + type(params).__name__):
    ps.random_sketch_features(params, jnp.ones((2, H)))


def test_self_tensor_converts_a_list_and_names_a_scalars_shape():
  """A list was refused as "features must have rank >= 1 ..., got shape None"."""
  np.testing.assert_array_equal(ps.self_tensor([1.0, 2.0]), [1.0, 2.0, 2.0, 4.0])
  with pytest.raises(ValueError, match=r"rank >= 1 \(\[\.\.\., r\]\), got shape \(\)"):
    ps.self_tensor(3.0)


def test_learned_sketch_shapes_and_bounds():
  r = 4
  params = ps.learned_sketch_init(jax.random.key(0), H, sketch_dim=r)
  assert params["branch1"][0]["w_in"].shape == (H, 8 * r)
  assert params["branch1"][0]["w_out"].shape == (8 * r, r)
  assert params["branch1"][1]["w_in"].shape == (r, 8 * r)
  x = 3.0 * _normal(1, (2, 7, 3, H))
  f = jax.jit(ps.learned_sketch_features)(params, x)
  assert f.shape == (2, 7, 3, r) and f.dtype == jnp.float32
  # f = sqrt(r) tanh(.): bounded by sqrt(r), and not constant.
  assert float(jnp.max(jnp.abs(f))) <= math.sqrt(r) + 1e-6
  assert float(jnp.std(f)) > 1e-2
  # One map for q and k: the kernel <f(x), f(y)> is symmetric by construction,
  # and the two branches have their own parameters.
  assert not np.allclose(params["branch1"][0]["w_in"], params["branch2"][0]["w_in"])
  narrow = ps.learned_sketch_init(jax.random.key(0), H, sketch_dim=r, hidden_dim=2 * r)
  assert [b[i][w].shape for b in (narrow["branch1"], narrow["branch2"]) for i in (0, 1)
          for w in ("w_in", "w_out")] == [(H, 2 * r), (2 * r, r), (r, 2 * r), (2 * r, r)] * 2
  assert ps.learned_sketch_features(narrow, x).shape == (2, 7, 3, r)


def test_sketches_of_an_empty_input_are_empty():
  """The learned sketch raised ZeroDivisionError on an empty x (a reshape to -1);
  so did the layer on an empty batch or sequence, before the op's own error."""
  for init, apply in ((ps.learned_sketch_init, ps.learned_sketch_features),
                      (ps.random_sketch_init, ps.random_sketch_features)):
    params = init(jax.random.key(0), H, 4)
    for shape in ((0, 3, H), (2, 0, H)):
      assert apply(params, jnp.zeros(shape)).shape == shape[:-1] + (4,)


def _gelu64(z):
  """jax.nn.gelu's default tanh approximation in float64."""
  return 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))


@pytest.mark.parametrize("hidden_dim", [None, 12])
def test_learned_sketch_formula(hidden_dim):
  """f(x) = sqrt(r) tanh(g1(x) * g2(x) / sqrt(r)), with each g written out in
  NumPy; at the default hidden width 8r and a narrower one."""
  r = 4
  params = ps.learned_sketch_init(jax.random.key(5), H, sketch_dim=r, hidden_dim=hidden_dim)
  assert params["branch2"][1]["w_in"].shape == (r, hidden_dim or 8 * r)
  rng = np.random.default_rng(6)
  params = jax.tree_util.tree_map(  # non-trivial LayerNorm parameters
      lambda p: p + 0.1 * rng.standard_normal(p.shape).astype(np.float32), params)
  x = rng.standard_normal((2, 5, H))   # leading dims: computed as one [10, H] matrix

  def branch(blocks, z):
    for p in blocks:
      p = {name: np.asarray(a, np.float64) for name, a in p.items()}
      mu = z.mean(-1, keepdims=True)
      var = ((z - mu) ** 2).mean(-1, keepdims=True)
      z = (z - mu) / np.sqrt(var + 1e-5) * p["ln_scale"] + p["ln_bias"]
      z = _gelu64(z @ p["w_in"]) @ p["w_out"]
    return z

  want = math.sqrt(r) * np.tanh(branch(params["branch1"], x) * branch(params["branch2"], x)
                                / math.sqrt(r))
  got = jax.jit(ps.learned_sketch_features)(params, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _perturbed_learned_params(seed, r=4, hidden_dim=12):
  params = ps.learned_sketch_init(jax.random.key(seed), H, sketch_dim=r, hidden_dim=hidden_dim)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: p + 0.1 * rng.standard_normal(p.shape).astype(np.float32), params)


def test_learned_sketch_of_float64_is_float64_accurate():
  """float64 x (x64 enabled) computes in float64, as the attention ops do: the
  LayerNorms and GELUs were float32 (1.9e-7 off a float64 evaluation)."""
  with jax.enable_x64(True):
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64),
                                    _perturbed_learned_params(7))
    x = np.random.default_rng(8).standard_normal((3, 2, H))
    got = ps.learned_sketch_features(params, jnp.asarray(x))
    assert got.dtype == jnp.float64
    from pallas_polysketch import sketches
    def branch(blocks, z):                # the unfused blocks, each in float64
      for p in blocks:
        z = sketches._dense_block(p, z)
      return z
    g1, g2 = (np.asarray(branch(params[b], jnp.asarray(x))) for b in ("branch1", "branch2"))
    want = 2.0 * np.tanh(g1 * g2 / 2.0)   # sqrt(r) = 2
    # float64 rounding through a few dot products of width <= 12
    assert np.max(np.abs(np.asarray(got) - want)) < 1e-12 * max(np.max(np.abs(want)), 1.0)


def test_learned_sketch_folds_bf16_parameters_in_float32():
  """bf16-stored parameters (a layer with param_dtype=bfloat16) were folded
  (LayerNorm scale into the Dense kernel) in bf16: float32 inputs got bf16
  accuracy (2.6e-3 on the xla path, 3.7e-3 on the kernels, which take the
  same folded weights). Now the same values stored as float32 give the same
  features."""
  from pallas_polysketch import sketches
  bf16 = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), _perturbed_learned_params(9))
  f32 = jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), bf16)
  for got, want in zip(sketches._folded_weights(bf16), sketches._folded_weights(f32)):
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, want)
  x = jax.random.normal(jax.random.key(10), (2, 16, 2, H))
  np.testing.assert_array_equal(ps.learned_sketch_features(bf16, x, implementation="xla"),
                                ps.learned_sketch_features(f32, x, implementation="xla"))


def test_sketch_features_check_x():
  learned = ps.learned_sketch_init(jax.random.key(0), H, 4)
  random = ps.random_sketch_init(jax.random.key(0), H, 4, degree=4)
  # an integer x went through the learned sketch rounded to integers: zeros out
  with pytest.raises(TypeError, match=r"x must have a floating dtype, got int32"):
    ps.learned_sketch_features(learned, jnp.ones((2, H), jnp.int32))
  for fn, params in ((ps.learned_sketch_features, learned), (ps.random_sketch_features, random)):
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., head_dim\] \(rank >= 1\)"):
      fn(params, jnp.float32(1.0))                 # was an IndexError
    x = np.random.default_rng(0).standard_normal(H).astype(np.float32)
    np.testing.assert_array_equal(fn(params, list(x)), fn(params, jnp.asarray(x)))  # was an AttributeError


def test_sketch_inits_check_the_key():
  """An int seed in place of the key failed inside JAX ("invalid PRNG key data"),
  naming no argument; typed and legacy uint32[2] keys are taken."""
  for init in (ps.random_sketch_init, ps.learned_sketch_init):
    for bad in (0, None, jax.random.split(jax.random.key(0), 2)):
      with pytest.raises(TypeError, match=r"key must be a PRNG key \(jax\.random\.key\(seed\)\)"):
        init(bad, H, 4)
    jax.tree.map(np.testing.assert_array_equal, init(jax.random.PRNGKey(3), H, 4),
                 init(jax.random.wrap_key_data(jax.random.PRNGKey(3)), H, 4))


def test_learned_sketch_tpu_form_is_the_same_function():
  """On TPU x keeps its [B, T, N, H] shape (no layout copy); elsewhere it is
  one [M, H] matrix. The two forms are the same function, values and every
  gradient, to float32 rounding."""
  from pallas_polysketch import sketches
  r = 4
  params = ps.learned_sketch_init(jax.random.key(7), H, sketch_dim=r)
  params = jax.tree_util.tree_map(
      lambda p: p + 0.1 * _normal(p.size, p.shape), params)
  x = 3.0 * _normal(8, (2, 6, 3, H))
  cot = _normal(9, (2, 6, 3, r))

  def loss(fn):
    return lambda p, x: jnp.sum(fn(p, x) * cot)

  tpu_form = jax.jit(sketches._learned_features)
  default = jax.jit(ps.learned_sketch_features)      # CPU: the matrix form
  np.testing.assert_allclose(tpu_form(params, x), default(params, x), rtol=1e-5, atol=1e-6)
  g_tpu = jax.jit(jax.grad(loss(sketches._learned_features), (0, 1)))(params, x)
  g_cpu = jax.jit(jax.grad(loss(ps.learned_sketch_features), (0, 1)))(params, x)
  for a, b in zip(jax.tree_util.tree_leaves(g_tpu), jax.tree_util.tree_leaves(g_cpu)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def _half_ulp(dtype, want):
  """Half a unit in the last place of `want` in `dtype` (normal range)."""
  mant = jnp.finfo(dtype).nmant
  return 0.5 * 2.0 ** (np.floor(np.log2(np.maximum(np.abs(want), 1e-30))) - mant)


_GELU_AND_VJP = """
import sys
import jax, jax.numpy as jnp, numpy as np
from pallas_polysketch import sketches
dtype = jnp.dtype(sys.argv[2])
data = np.load(sys.argv[1])
y, vjp = jax.vjp(sketches._twice_gelu, jnp.asarray(data["x"], dtype))
(dx,) = vjp(jnp.asarray(data["dy"], dtype))
assert y.dtype == dtype and dx.dtype == dtype, (y.dtype, dx.dtype)
np.savez(sys.argv[1], y=np.asarray(y.astype(jnp.float32)), dx=np.asarray(dx.astype(jnp.float32)))
"""


def _gelu_and_vjp_with_xla_defaults(x, dy, dtype, tmp_path):
  """`sketches._twice_gelu` of x and its VJP of dy, in dtype, computed in a
  fresh process with XLA's default CPU emitters: the test session runs with
  the legacy ones (tests/conftest.py: they compile faster), whose float32
  tanh is a few ulps less accurate than this test's bound (up to 3.5e-6 over
  it, at |x| near 2); a user's program gets the default."""
  path = tmp_path / "gelu.npz"
  np.savez(path, x=x, dy=dy)
  flags = re.sub(r"--xla_cpu_use_fusion_emitters=\S*", "", os.environ.get("XLA_FLAGS", ""))
  env = dict(os.environ, XLA_FLAGS=flags)
  subprocess.run([sys.executable, "-c", _GELU_AND_VJP, str(path), jnp.dtype(dtype).name],
                 env=env, check=True)
  out = np.load(path)
  return out["y"].astype(np.float64), out["dx"].astype(np.float64)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_learned_sketch_gelu_and_its_written_out_vjp(dtype, tmp_path):
  """The sketch's 2 GELU (float32 arithmetic, derivative written out) against
  float64 NumPy: the value and x's cotangent rounded once to the dtype, the
  derivative against a central difference of the float64 formula."""
  x = np.concatenate([np.linspace(-9, 9, 4001), 4.0 * np.random.default_rng(3).standard_normal(4000)])
  x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)   # representable in dtype
  dy = np.asarray(jnp.asarray(np.random.default_rng(4).standard_normal(x.size), dtype)
                  .astype(jnp.float32), np.float64)
  y, dx = _gelu_and_vjp_with_xla_defaults(x, dy, dtype, tmp_path)
  h = 1e-6
  want_y = 2 * _gelu64(x)
  want_dx = 2 * (_gelu64(x + h) - _gelu64(x - h)) / (2 * h) * dy
  # float32 arithmetic inside: a few float32 ulps of slack, then one rounding to dtype.
  f32_slack = 16 * EPS32
  for got, want, scale in ((y, want_y, np.abs(x)), (dx, want_dx, np.abs(dy) * (1 + np.abs(x)))):
    bound = (_half_ulp(dtype, want) if dtype == jnp.bfloat16 else 0) + f32_slack * (scale + 1e-30) + 1e-12
    assert np.all(np.abs(got - want) <= bound), float(np.max(np.abs(got - want) - bound))


@pytest.mark.parametrize("implementation", [None, "xla"])
def test_learned_sketch_keeps_the_shape_when_lowered_for_tpu(implementation):
  """Exported for TPU the features never reshape x to a matrix (a layout copy
  there), through the Pallas kernels (None) or XLA's fusions; exported for
  CPU they do (faster weight gradients there)."""
  import re
  params = ps.learned_sketch_init(jax.random.key(0), 64, sketch_dim=32)
  x = jax.ShapeDtypeStruct((1, 256, 4, 64), jnp.bfloat16)
  fn = jax.jit(jax.grad(lambda p, x: jnp.sum(
      ps.learned_sketch_features(p, x, implementation=implementation)), (0, 1)))

  def reshapes(platform):
    text = jax.export.export(fn, platforms=[platform])(params, x).mlir_module()
    return re.findall(r"stablehlo.reshape[^\n]*tensor<1x256x4x64x[bf]\w+>", text)

  assert reshapes("tpu") == []
  assert reshapes("cpu")


# ----------------------------------------------------------------------------
# Hadamard sketch and the official scaling.
# ----------------------------------------------------------------------------

def _sylvester(d):
  """The d x d Sylvester Hadamard matrix (= scipy.linalg.hadamard(d))."""
  h = np.ones((1, 1))
  while h.shape[0] < d:
    h = np.block([[h, h], [h, -h]])
  return h


@pytest.mark.parametrize("degree,r", [(4, 8), (8, 8), (8, 4), (16, 4)])
def test_hadamard_sketch_shapes(degree, r):
  params = ps.random_sketch_init(jax.random.key(0), H, sketch_dim=r, degree=degree,
                                 sketch_type="hadamard")

  def check(level, d_in):  # a pytree of arrays: +-1 float32 signs, int32 indices
    assert set(level) == {"signs1", "cols1", "signs2", "cols2", "left", "right"}
    for i in "12":
      signs, cols = np.asarray(level["signs" + i]), np.asarray(level["cols" + i])
      assert signs.dtype == np.float32 and signs.shape == (d_in,)
      assert set(np.unique(signs)) <= {-1.0, 1.0}
      assert cols.dtype == np.int32 and cols.shape == (r,)
      assert 0 <= cols.min() and cols.max() < d_in
    for child in (level["left"], level["right"]):
      if child:
        check(child, H if not child["left"] else r)

  check(params, H if degree == 4 else r)
  assert len(jax.tree_util.tree_leaves(params)) == 4 * (degree // 2 - 1)
  x = jnp.ones((2, 5, 3, H))
  f = jax.jit(ps.random_sketch_features)(params, x)
  assert f.shape == (2, 5, 3, r) and f.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(f)))


def test_hadamard_sketch_degree4_formula():
  """f(x) = (x D1 H[:, c1] * x D2 H[:, c2]) / sqrt(r), H the Sylvester matrix."""
  r, d = 8, 16
  params = ps.random_sketch_init(jax.random.key(3), d, sketch_dim=r, degree=4,
                                 sketch_type="hadamard")
  x = np.random.default_rng(4).standard_normal((6, d))
  h = _sylvester(d)
  m1, m2 = (np.asarray(params["signs" + i], np.float64)[:, None]
            * h[:, np.asarray(params["cols" + i])] for i in "12")
  assert not np.array_equal(m1, m2)
  want = (x @ m1) * (x @ m2) / math.sqrt(r)
  got = ps.random_sketch_features(params, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # scaling="official": the paper's code, (x M1 / sqrt(r)) * (x M2 / sqrt(r))
  got = ps.random_sketch_features(params, jnp.asarray(x, jnp.float32), scaling="official")
  np.testing.assert_allclose(got, (x @ m1 / math.sqrt(r)) * (x @ m2 / math.sqrt(r)),
                             rtol=1e-5, atol=1e-5)


def test_sylvester_is_scipy_hadamard():
  scipy_linalg = pytest.importorskip("scipy.linalg")
  np.testing.assert_array_equal(_sylvester(16), scipy_linalg.hadamard(16))


def test_hadamard_signs_and_columns_vary():
  a = ps.random_sketch_init(jax.random.key(0), 64, sketch_dim=32, degree=8,
                            sketch_type="hadamard")
  b = ps.random_sketch_init(jax.random.key(1), 64, sketch_dim=32, degree=8,
                            sketch_type="hadamard")
  assert not np.array_equal(a["left"]["signs1"], b["left"]["signs1"])
  assert not np.array_equal(a["left"]["cols1"], b["left"]["cols1"])
  for level in (a, a["left"]):  # independent branches and matrices
    assert not np.array_equal(level["signs1"], level["signs2"])
    assert not np.array_equal(level["cols1"], level["cols2"])
  assert not np.array_equal(a["left"]["cols1"], a["right"]["cols1"])
  # both signs occur, and the columns are drawn from all of range(d_in)
  assert set(np.unique(a["left"]["signs1"])) == {-1.0, 1.0}
  assert np.asarray(a["left"]["cols1"]).max() >= 32


@pytest.mark.parametrize("sketch_type", ["gaussian", "hadamard"])
@pytest.mark.parametrize("degree", [2, 4, 8, 16])
def test_official_scaling_constant(degree, sketch_type):
  """scaling="official" divides by r instead of sqrt(r) at every level, so

    S_2^off = r^(-1/2) S_2,   S_2m^off = c_m^2 r^(-1/2) S_2m  (c_m: S_m^off = c_m S_m)

  and f = S_(p/2) gets c = r^(-(p/2 - 1)/2): r^-1/2 at degree 4, r^-3/2 at 8,
  r^-7/2 at 16, and 1 at degree 2 (no level).
  """
  r = 4
  params = ps.random_sketch_init(jax.random.key(7), H, sketch_dim=r, degree=degree,
                                 sketch_type=sketch_type)
  x = _normal(8, (5, H))
  unbiased = np.asarray(ps.random_sketch_features(params, x), np.float64)
  official = np.asarray(ps.random_sketch_features(params, x, scaling="official"), np.float64)
  c = {2: 1.0, 4: r ** -0.5, 8: r ** -1.5, 16: r ** -3.5}[degree]
  assert c == r ** (-(degree // 2 - 1) / 2)
  np.testing.assert_allclose(official, c * unbiased, rtol=1e-5, atol=1e-7 * np.abs(unbiased).max())
  if degree > 2:
    assert not np.allclose(official, unbiased)
  explicit = ps.random_sketch_features(params, x, scaling="unbiased")
  np.testing.assert_array_equal(explicit, unbiased.astype(np.float32))


def test_hadamard_sketch_refuses_float_column_indices():
  """A params tree cast whole to bfloat16 rounded the odd column indices above
  256 to other Hadamard columns (features 600 off at head_dim 512, silently);
  the indices must stay integers."""
  params = ps.random_sketch_init(jax.random.key(0), 512, sketch_dim=16, degree=4,
                                 sketch_type="hadamard")
  x = jnp.ones((2, 512), jnp.float32)
  cast = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  with pytest.raises(TypeError, match=r"params cols1 .* integer dtype.*got bfloat16"):
    ps.random_sketch_features(cast, x)
  floating = jax.tree.map(
      lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
  np.testing.assert_allclose(ps.random_sketch_features(floating, x),
                             ps.random_sketch_features(params, x), rtol=1e-6)
