"""Sketches (DESIGN §1.2): shapes, the identity at degree 2, unbiasedness."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_polysketch as ps
from pallas_polysketch import ref

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


@pytest.mark.parametrize("degree", [4, 8])
def test_random_sketch_is_unbiased(degree):
  """Averaged over independent sketches, <f(x), f(y)> -> <x, y>^(degree/2).

  The sample mean of n i.i.d. draws is within 5 standard errors of its
  expectation (a 5-sigma bound: the seed is fixed, so the test is
  deterministic, and a biased sketch such as the 1/r scaling, G1 = G2, or one
  S_m shared by both branches lands tens of standard errors away).
  """
  r, n = 8, 20000
  x, ys, dots = _unit_pairs()
  points = jnp.asarray(np.concatenate([x[None], ys]), jnp.float32)  # [4, H]

  @jax.jit
  @jax.vmap
  def inner_products(key):
    params = ps.random_sketch_init(key, H, sketch_dim=r, degree=degree)
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


def test_learned_sketch_formula():
  """f(x) = sqrt(r) tanh(g1(x) * g2(x) / sqrt(r)), with each g written out in NumPy."""
  r = 4
  params = ps.learned_sketch_init(jax.random.key(5), H, sketch_dim=r)
  rng = np.random.default_rng(6)
  params = jax.tree_util.tree_map(  # non-trivial LayerNorm parameters
      lambda p: p + 0.1 * rng.standard_normal(p.shape).astype(np.float32), params)
  x = rng.standard_normal((5, H))

  def gelu(z):  # jax.nn.gelu's default tanh approximation
    return 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))

  def branch(blocks, z):
    for p in blocks:
      p = {name: np.asarray(a, np.float64) for name, a in p.items()}
      mu = z.mean(-1, keepdims=True)
      var = ((z - mu) ** 2).mean(-1, keepdims=True)
      z = (z - mu) / np.sqrt(var + 1e-5) * p["ln_scale"] + p["ln_bias"]
      z = gelu(z @ p["w_in"]) @ p["w_out"]
    return z

  want = math.sqrt(r) * np.tanh(branch(params["branch1"], x) * branch(params["branch2"], x)
                                / math.sqrt(r))
  got = jax.jit(ps.learned_sketch_features)(params, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
