"""find_nonfinite names the first non-finite input or intermediate and where."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import pallas_polysketch as ps  # noqa: E402
from pallas_polysketch.debug import INPUTS  # noqa: E402

B, T, N, H, R = 2, 40, 3, 16, 8
BLOCK = 16   # blocks [0, 16), [16, 32), [32, 40)
F32_MAX = float(jnp.finfo(jnp.float32).max)


def _layer_norm(x):
  x = x - x.mean(-1, keepdims=True)
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True))


def _inputs(seed=0):
  """Clean numpy inputs: LayerNorm'd q, k, normal v, degree-4 sketch features."""
  rng = np.random.default_rng(seed)
  q, k = (_layer_norm(rng.standard_normal((B, T, N, H))).astype(np.float32)
          for _ in range(2))
  v = rng.standard_normal((B, T, N, H)).astype(np.float32)
  sketch = ps.random_sketch_init(jax.random.key(seed), H, R, degree=4)
  fq, fk = (np.array(ps.random_sketch_features(sketch, jnp.asarray(x))) for x in (q, k))
  return {"q": q, "k": k, "v": v, "q_features": fq, "k_features": fk}


def _find(x, **kwargs):
  kwargs.setdefault("block_size", BLOCK)
  kwargs.setdefault("implementation", "xla")
  return ps.find_nonfinite(*(jnp.asarray(x[name]) for name in INPUTS), **kwargs)


def _where(report):
  return report.tensor, (report.batch, report.seq, report.head), report.index


@pytest.mark.parametrize("causal,local_exact", [(True, True), (True, False), (False, True)])
def test_clean_inputs_report_none(causal, local_exact):
  assert _find(_inputs(), causal=causal, local_exact=local_exact) is None


def test_clean_inputs_report_none_on_the_pallas_path():
  # The kernel tiles a block of 128 or one covering the sequence, not 16.
  assert _find(_inputs(), implementation="pallas", interpret=True, block_size=128) is None


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", INPUTS)
def test_injected_input_is_named_with_its_position(name, bad):
  x = _inputs()
  x[name][1, 23, 2, 5] = bad
  report = _find(x)
  assert _where(report) == (name, (1, 23, 2), 5)
  np.testing.assert_equal(report.value, bad)
  assert f"input {name} is" in str(report) and "[batch 1, seq 23, head 2], entry 5" in str(report)


def test_first_input_in_order_and_first_position_in_batch_seq_head_order():
  x = _inputs()
  x["k"][0, 3, 0, 0] = np.nan
  x["q"][1, 30, 1, 4] = np.inf
  assert _where(_find(x)) == ("q", (1, 30, 1), 4)   # q before k
  x["q"][0, 31, 2, 7] = np.nan
  assert _where(_find(x)) == ("q", (0, 31, 2), 7)   # batch 0 before batch 1


def _huge_exact_pair(x, query, key, head=1):
  """q_query = k_key = 1e6 u (u LayerNorm'd): q.k = 1e12 H, its 4th power is
  inf in float32, while every other pair stays below 1e6 H, i.e. ^4 < 1e30."""
  u = x["q"][0, query, head] / 1.0
  x["q"][0, query, head] = 1e6 * u
  x["k"][0, key, head] = 1e6 * u


def test_overflowing_exact_weight():
  x = _inputs()
  _huge_exact_pair(x, query=21, key=18)   # both in block 1
  report = _find(x)
  assert _where(report) == ("exact_weights", (0, 21, 1), 18)
  assert report.value == np.inf
  assert str(report) == ("exact local weight (q_i . k_j)^p is inf at "
                         "[batch 0, seq 21, head 1], key seq 18")


def test_weights_the_op_does_not_use_do_not_count():
  x = _inputs()
  _huge_exact_pair(x, query=18, key=21)   # key after query: masked
  assert _find(x) is None
  x = _inputs()
  _huge_exact_pair(x, query=21, key=18)
  assert _find(x, local_exact=False) is None   # sketched weights there


@pytest.mark.parametrize("causal", [True, False])
def test_overflowing_sketched_weight(causal):
  x = _inputs()
  x["q_features"][0, 37, 2] = 1e12   # f_q . f_k = 8e24, squared: inf
  x["k_features"][0, 5, 2] = 1e12    # an earlier block
  report = _find(x, causal=causal)
  assert _where(report) == ("sketched_weights", (0, 37, 2), 5)
  assert report.value == np.inf


def test_overflowing_denominator():
  x = _inputs()
  c = 3.5e9                              # c^4 = 1.5e38 < float32 max < 4 c^4
  assert c ** 4 < F32_MAX < 4 * c ** 4
  x["q"][0, 3, 0] = 0.0
  x["q"][0, 3, 0, 0] = c
  x["k"][0, :4, 0] = 0.0
  x["k"][0, :4, 0, 0] = 1.0              # q_3 . k_j = c for j = 0..3
  report = _find(x)
  assert _where(report) == ("denominator", (0, 3, 0), None)
  assert report.value == np.inf


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_overflowing_output(implementation):
  x = _inputs()
  x["q"][0, 0, 1] = 0.0
  x["q"][0, 0, 1, 0] = 2.0
  x["k"][0, 0, 1] = x["q"][0, 0, 1]      # w_00 = 2^4 = 16, finite
  x["v"][0, 0, 1] = 3e38                 # 16 * 3e38 overflows the numerator
  block = 128 if implementation == "pallas" else BLOCK  # a block the kernel tiles
  report = _find(x, implementation=implementation, interpret=True, block_size=block)
  assert _where(report) == ("output", (0, 0, 1), 0)


def _segments(*lengths):
  """segment_ids [B, T]: runs of the given lengths in batch row 0, one segment in row 1."""
  ids = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(lengths)])
  return jnp.asarray(np.stack([ids, np.zeros(T, np.int32)]))


def test_with_segments_only_weights_inside_a_segment_count():
  x = _inputs()
  _huge_exact_pair(x, query=21, key=18)          # block 1 of the sequence
  assert _where(_find(x, segment_ids=_segments(10, 30))) == ("exact_weights", (0, 21, 1), 18)
  assert _find(x, segment_ids=_segments(20, 20)) is None     # key 18 in the first segment
  x = _inputs()
  x["q_features"][0, 37, 2] = 1e12
  x["k_features"][0, 5, 2] = 1e12
  for causal in (True, False):
    assert _find(x, causal=causal, segment_ids=_segments(10, 30)) is None
    assert _find(x, causal=causal, segment_ids=_segments(40)).tensor == "sketched_weights"


def test_with_segments_blocks_count_from_the_segment_start():
  x = _inputs()
  # A segment from token 4: query 21 and key 18 are in one block of the
  # sequence but in blocks 1 and 0 of the segment, so the op weighs them with
  # the (finite) sketched weight.
  _huge_exact_pair(x, query=21, key=18)
  assert _find(x) is not None
  assert _find(x, segment_ids=_segments(4, 36)) is None
  # A segment from token 10: query 21 and key 14 are in blocks 1 and 0 of the
  # sequence, in block 0 of the segment: the exact weight is used.
  x = _inputs()
  _huge_exact_pair(x, query=21, key=14)
  assert _find(x) is None
  assert _where(_find(x, segment_ids=_segments(10, 30))) == ("exact_weights", (0, 21, 1), 14)


def test_with_segments_the_output_is_the_ops_with_them():
  x = _inputs()
  x["q"][0, 5, 1] = 0.0                  # query 5 gives key 5 weight 0
  x["v"][0, 5, 1] = 3e38                 # every later query's numerator overflows
  assert _find(x).tensor == "output"
  assert _find(x, segment_ids=_segments(6, 34)) is None     # later queries: another segment


def test_bad_arguments_raise_naming_them():
  x = _inputs()
  with pytest.raises(ValueError, match="degree"):
    _find(x, degree=3)
  with pytest.raises(ValueError, match="block_size"):
    _find(x, block_size=12)
  with pytest.raises(ValueError, match=r"segment_ids must be \[batch, seq\] = \(2, 40\)"):
    _find(x, segment_ids=jnp.zeros((2, 39), jnp.int32))
  x["k_features"] = x["k_features"][:, :, :, :4]
  with pytest.raises(ValueError, match="same sketch_dim"):
    _find(x)


def test_the_ops_arguments_are_checked_before_any_report():
  """A bad implementation, interpret or tile_config was only refused by the op
  at the end: with a non-finite input it was ignored and the input reported."""
  x = _inputs()
  x["q"][0, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match=r"implementation must be one of .*'triton'"):
    _find(x, implementation="triton")
  with pytest.raises(TypeError, match=r"interpret must be a bool.*'no'"):
    _find(x, interpret="no")
  with pytest.raises(TypeError, match=r"tile_config must be a TileConfig, got dict"):
    _find(x, tile_config={})
  assert _find(x).tensor == "q"


def test_empty_sequence_raises_naming_q():
  """Was numpy's "attempt to get argmax of an empty sequence"."""
  x = {name: a[:, :0] for name, a in _inputs().items()}
  with pytest.raises(ValueError, match=r"q has an empty axis: shape \(2, 0,"):
    _find(x)
