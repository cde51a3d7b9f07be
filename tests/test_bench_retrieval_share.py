"""bench/retrieval_share.py: the weight a kernel puts on the matching key."""
import json

import numpy as np
import pytest

from helpers import load_bench


@pytest.fixture(scope="module")
def bench():
  return load_bench("retrieval_share")


def test_weights_of_the_exact_kernels_on_orthogonal_keys(bench):
  h = 16
  q = np.zeros(h); q[0] = np.sqrt(h)
  keys = np.stack([q, np.roll(q, 1), np.roll(q, 2)])     # the match, then two orthogonal keys
  np.testing.assert_allclose(bench.weights("polynomial", q, keys), [h ** 4, 0.0, 0.0])
  w = bench.weights("softmax", q, keys)
  np.testing.assert_allclose(w[0] / w.sum(), np.exp(np.sqrt(h)) / (np.exp(np.sqrt(h)) + 2))


def test_sketched_weights_are_squared_feature_products(bench):
  import jax
  h, r = 16, 8
  rng = np.random.default_rng(0)
  q, keys = rng.standard_normal(h), rng.standard_normal((5, h))
  for kind in bench.SKETCHED:
    features = bench.make_features(kind, h, r, jax.random.PRNGKey(1))
    fq = np.asarray(features(q.astype(np.float32)), np.float64)
    fk = np.asarray(features(keys.astype(np.float32)), np.float64)
    assert fq.shape == (r,)
    np.testing.assert_allclose(bench.weights(kind, q, keys, features), (fk @ fq) ** 2, rtol=1e-6)


def test_shares_alone_are_one_and_a_random_sketch_shares_as_r_over_r_plus_cn(bench):
  for kind in bench.KINDS:
    np.testing.assert_allclose(bench.match_shares(kind, 16, 0, 8, trials=2), 1.0)
  small = bench.match_shares("gaussian", 32, 48, 8, trials=40).mean()
  large = bench.match_shares("gaussian", 32, 48, 128, trials=40).mean()
  exact = bench.match_shares("polynomial", 32, 48, trials=40).mean()
  # r / (r + c N) with c about 1: r = 8 -> ~0.14, r = 128 -> ~0.7; exact H^2 / (H^2 + 3 N) = 0.88
  assert small < 0.3 < 0.5 < large < exact
  assert abs(exact - 32 ** 2 / (32 ** 2 + 3 * 48)) < 0.05


def test_weight_scales_against_the_exact_kernel(bench):
  h, r = 32, 16
  gauss = bench.weight_scales("gaussian", h, r, num_keys=256, trials=4)
  # unbiased: E <S q, S k>^2 = (q . k)^4 + a variance of about |q|^4 |k|^4 / r, so an
  # independent key gets about 1 + H^2 / (3 r) times the exact mean weight (3 H^2); the
  # match about its exact weight H^4
  assert 0.5 < gauss["other_ratio"] / (1 + h ** 2 / (3 * r)) < 2
  assert 0.5 < gauss["match_ratio"] < 3
  learned = bench.weight_scales("learned", h, r, num_keys=256, trials=4)
  # the learned sketch at initialisation: features of order 1, weights of order r,
  # against the exact kernel's 3 H^2 and H^4
  assert learned["other_ratio"] < 1e-2 and learned["match_ratio"] < 1e-3


def test_main_writes_the_table(bench, tmp_path):
  rows = bench.main(["--head-dim", "16", "--others", "4", "8", "--sketch-dims", "8",
                     "--trials", "3", "--out-dir", str(tmp_path), "--tag", "tiny"])
  assert {(r["kind"], r["others"]) for r in rows} == {
      (k, n) for k in bench.KINDS for n in (4, 8)}
  assert all("c" in r for r in rows if r["kind"] in ("gaussian", "hadamard"))
  report = json.loads((tmp_path / "retrieval_share-tiny.json").read_text())
  assert report["rows"] == rows and report["head_dim"] == 16
  md = (tmp_path / "retrieval_share-tiny.md").read_text()
  for kind in bench.KINDS:
    assert f"| {kind} |" in md
  assert {(x["kind"], x["sketch_dim"]) for x in report["scales"]} == {
      (k, 8) for k in bench.SKETCHED}
  assert "independent key" in md
