"""Sequence-, batch- and head-sharded attention on 8 CPU devices (issue 12).

conftest.py sets --xla_force_host_platform_device_count=8 for this process.
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import pallas_polysketch as ps
from pallas_polysketch.sharding import sharded_polysketch_attention
from helpers import BACKENDS, CONTEXT_PARALLEL_CASE, f32_tol, layer_inputs, rel_err

GRAD_RTOL = 2 * 4 * 64 * float(jnp.finfo(jnp.float32).eps)

if len(jax.devices()) < 8:
  pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)",
              allow_module_level=True)


def _mesh(shape, names):
  return Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), names)


MESHES = {
    "seq8": ((8,), ("seq",), dict(seq_axis="seq")),
    "batch2_seq4": ((2, 4), ("batch", "seq"), dict(batch_axis="batch", seq_axis="seq")),
    "heads2_seq4": ((2, 4), ("heads", "seq"), dict(head_axis="heads", seq_axis="seq")),
}


def _packed_ids(seq, block):
  """Two rows of runs that start mid-block and span shards (of `block` tokens
  on 8 devices, 2 blocks on 4), single-token runs, a row whose first run
  covers two whole shards; ids repeat non-contiguously."""
  rows = ([2 * block + 5, 1, block + 7, 1, 1, 3 * block], [1, block - 3, 9, 2 * seq])
  ids = np.zeros((2, seq), np.int32)
  for row, lengths in enumerate(rows):
    cuts = np.cumsum([0] + lengths)
    for n, (s, e) in enumerate(zip(cuts[:-1], cuts[1:])):
      ids[row, s:e] = n % 3
  return jnp.asarray(ids)


def _check(mesh_name, backend, causal, local_exact, heads=4, kv_heads=2, block=128,
           packed=False):
  shape, names, axes = MESHES[mesh_name]
  mesh = _mesh(shape, names)
  seq = 8 * block if "seq8" == mesh_name else 4 * block
  args, cot = layer_inputs(3, 2, seq, heads, kv_heads, 64, 16)
  kw = dict(block_size=block, causal=causal, local_exact=local_exact, **backend)
  sharded = sharded_polysketch_attention(mesh, **axes, **kw)
  single = functools.partial(ps.polysketch_attention, **kw)
  if packed:
    ids = _packed_ids(seq, block)
    sharded = functools.partial(sharded, segment_ids=ids)
    single = functools.partial(single, segment_ids=ids)
  assert rel_err(jax.jit(sharded)(*args), single(*args)) < 1e-5
  loss = lambda f: lambda *a: jnp.sum(f(*a) * cot)
  got = jax.jit(jax.grad(loss(sharded), argnums=tuple(range(5))))(*args)
  want = jax.grad(loss(single), argnums=tuple(range(5)))(*args)
  for name, g, w in zip(("q", "k", "v", "fq", "fk"), got, want):
    if not causal and name in ("q", "k"):
      continue
    assert rel_err(g, w) < GRAD_RTOL, (name, rel_err(g, w))


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("causal,local_exact", [(True, True), (True, False), (False, True)])
def test_sharded_equals_single_device_xla(mesh_name, causal, local_exact):
  _check(mesh_name, BACKENDS["xla"], causal, local_exact, block=16)


# Causal over 8 sequence shards is slow-marked: heads2_seq4 walks 4 (and shards heads).
@pytest.mark.parametrize("mesh_name,causal", [
    pytest.param("seq8", True, marks=pytest.mark.slow), ("seq8", False),
    ("heads2_seq4", True), ("heads2_seq4", False)])
def test_sharded_equals_single_device_pallas(mesh_name, causal):
  _check(mesh_name, BACKENDS["pallas"], causal, True, block=128)


@pytest.mark.parametrize("mesh_name,causal,local_exact", [
    (mesh, *case) if mesh == "seq8" or case == (True, True)
    else pytest.param(mesh, *case, marks=pytest.mark.slow)     # CI time: the seq8 mesh runs all
    for mesh in MESHES for case in [(True, True), (True, False), (False, True)]])
def test_sharded_packed_segments_equal_single_device_xla(mesh_name, causal, local_exact):
  """Segments that span shards and start mid-block: each device gets its
  segment-running state and the previous shard's last block."""
  _check(mesh_name, BACKENDS["xla"], causal, local_exact, block=16, packed=True)


@pytest.mark.parametrize("causal", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_sharded_packed_segments_equal_single_device_pallas(causal):
  _check("seq8", BACKENDS["pallas"], causal, True, block=128, packed=True)


def test_mqa_over_the_sequence_axis():
  _check("seq8", BACKENDS["xla"], True, True, heads=4, kv_heads=1, block=16)


@pytest.mark.parametrize("packed", [False, True])
def test_only_states_cross_devices(packed):
  """The compiled sequence-sharded op passes the shards' states around
  (r^2 (H + 1) floats per kv head, log-depth permutations), never q, k or v;
  packed: also one block of k, v, k_features and a few ints per row."""
  mesh = _mesh((8,), ("seq",))
  block, heads, h, r = 128, 4, 64, 16
  seq = 8 * 2 * block if packed else 8 * block
  fn = sharded_polysketch_attention(mesh, seq_axis="seq", block_size=block,
                                    implementation="xla")
  sharding = NamedSharding(mesh, P(None, "seq", None, None))
  shapes = [jax.ShapeDtypeStruct((1, seq, heads, d), jnp.float32, sharding=sharding)
            for d in (h, h, h, r, r)]
  if packed:
    shapes.append(jax.ShapeDtypeStruct((1, seq), jnp.int32,
                                       sharding=NamedSharding(mesh, P(None, "seq"))))
  grad = jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=tuple(range(5)))
  for f in (fn, grad):
    text = jax.jit(f).lower(*shapes).compile().as_text()
    lines = text.splitlines()
    assert any("collective-permute" in line for line in lines), "the prefix states must move"
    collectives = [line for line in lines if re.search(
        r"= \S+ (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-start)?\(",
        line)]
    assert collectives
    for line in collectives:
      dims = [int(d) for d in re.search(r"\[([0-9,]*)\]", line).group(1).split(",") if d]
      # One state (B, K, H + 1, r(r+1)/2) at a time.
      assert int(np.prod(dims)) <= heads * (h + 1) * r * (r + 1) // 2, line
      assert seq not in dims and seq // 8 not in dims, line


def test_shard_length_must_be_a_multiple_of_the_block():
  mesh = _mesh((8,), ("seq",))
  fn = sharded_polysketch_attention(mesh, seq_axis="seq", block_size=32, implementation="xla")
  args, _ = layer_inputs(0, 1, 8 * 24, 2, 2, 16, 8)
  with pytest.raises(ValueError, match=r"each device's shard of seq must be a multiple of "
                                       r"block_size=32; this shard has seq=24"):
    fn(*args)


def test_own_shard_map_must_not_check_vma():
  """Inside the user's own jax.shard_map (check_vma=True by default), the op
  with context_axis_name (README) and the op or prefill on batch shards failed
  deep in JAX ("scan body function carry input and carry output must have equal
  types"); they now say to build the shard_map with check_vma=False, and
  run with it."""
  mesh = _mesh((8,), ("seq",))
  args, _ = layer_inputs(0, 1, 8 * 16, 2, 2, 16, 8)
  spec = P(None, "seq")
  op = functools.partial(ps.polysketch_attention, block_size=16, implementation="xla",
                         context_axis_name="seq")
  with pytest.raises(ValueError, match=r"check_vma=True .*q varies over mesh axes "
                                       r"\('seq',\).*check_vma=False"):
    jax.shard_map(op, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec)(*args)
  # Replicated inputs: the device prefix is what varies.
  with pytest.raises(ValueError, match=r"context_axis_name varies over mesh axes"):
    jax.shard_map(op, mesh=mesh, in_specs=(P(),) * 5, out_specs=P())(
        *(x[:, :16] for x in args))
  out = jax.shard_map(op, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec,
                      check_vma=False)(*args)
  want = ps.polysketch_attention(*args, block_size=16, implementation="xla")
  assert rel_err(out, want) < 1e-5
  batch = _mesh((2,), ("batch",))
  args, _ = layer_inputs(0, 2, 16, 2, 2, 16, 8)
  for fn in (ps.polysketch_attention, lambda *a, **kw: ps.prefill(*a, **kw)[0]):
    with pytest.raises(ValueError, match=r"check_vma=True .*\('batch',\)"):
      jax.shard_map(lambda *a: fn(*a, block_size=16), mesh=batch,
                    in_specs=(P("batch"),) * 5, out_specs=P("batch"))(*args)
  # prefill with replicated tokens and a batch-sharded state: the state (a
  # DecodeState, a pytree) is what varies
  state = ps.init_decode_state(2, 2, 16, 8, block_size=16)
  with pytest.raises(ValueError, match=r"check_vma=True \(its default; state varies over "
                                       r"mesh axes \('batch',\)"):
    jax.shard_map(lambda s: ps.prefill(*(x[:1] for x in args), state=s, block_size=16)[0],
                  mesh=batch, in_specs=P("batch"), out_specs=P("batch"))(state)


def test_mesh_argument_errors():
  mesh = _mesh((8,), ("seq",))
  with pytest.raises(ValueError, match=r"seq_axis='sequence' is not an axis of the mesh"):
    sharded_polysketch_attention(mesh, seq_axis="sequence")
  with pytest.raises(TypeError, match=r"mesh must be a jax.sharding.Mesh"):
    sharded_polysketch_attention("mesh")


def test_one_mesh_axis_shards_one_dimension():
  """The same mesh axis for two dimensions was refused only at the call, by
  jax's DuplicateSpecError on P('seq', 'seq', None, None), naming no argument."""
  mesh = _mesh((8,), ("seq",))
  with pytest.raises(ValueError, match=r"batch_axis and seq_axis are both 'seq'"):
    sharded_polysketch_attention(mesh, batch_axis="seq", seq_axis="seq")
  with pytest.raises(ValueError, match=r"head_axis and seq_axis are both 'seq'"):
    sharded_polysketch_attention(mesh, head_axis="seq", seq_axis="seq")


def test_segment_ids_go_to_the_returned_function():
  """segment_ids among the op's keyword arguments reached every device whole,
  beside q's shard: a shape error quoting the shard's (2, 8), not the call's."""
  mesh = _mesh((8,), ("seq",))
  with pytest.raises(ValueError, match=r"pass segment_ids to the returned function"):
    sharded_polysketch_attention(mesh, seq_axis="seq", block_size=8,
                                 segment_ids=jnp.zeros((2, 64), jnp.int32))



def test_sharded_inputs_are_checked_on_their_global_shapes():
  """The op's checks run before shard_map splits the inputs: a bad rank was
  shard_map's "in_specs entry which is too long", and a list of segment ids,
  which the op converts, failed there too."""
  mesh = _mesh((8,), ("seq",))
  fn = sharded_polysketch_attention(mesh, seq_axis="seq", block_size=8, implementation="xla")
  args, _ = layer_inputs(0, 2, 64, 2, 1, 16, 8)
  with pytest.raises(ValueError, match=r"q must have rank 4 .* got shape \(64, 2, 16\)"):
    fn(args[0][0], *args[1:])
  with pytest.raises(ValueError, match=r"segment_ids must be \[batch, seq\] = \(2, 64\)"):
    fn(*args, segment_ids=jnp.zeros((2, 32), jnp.int32))
  ids = np.repeat(np.array([[0, 1], [1, 2]], np.int32), 32, axis=1)
  np.testing.assert_array_equal(fn(*args, segment_ids=ids.tolist()),
                                fn(*args, segment_ids=jnp.asarray(ids)))

def test_dimensions_must_divide_over_their_mesh_axes():
  """Checked on the global shapes, naming the dimension and the axis: with
  segment ids, shard_map's own error named "<lambda>'s varargs parameter 'a'"."""
  mesh = _mesh((2, 4), ("batch", "seq"))
  args, _ = layer_inputs(0, 2, 90, 4, 2, 16, 8)
  ids = jnp.zeros((2, 90), jnp.int32)
  fn = sharded_polysketch_attention(mesh, seq_axis="seq", block_size=8, implementation="xla")
  with pytest.raises(ValueError, match=r"seq=90 must be divisible by the 4 devices of "
                                       r"seq_axis='seq'"):
    fn(*args, segment_ids=ids)
  fn = sharded_polysketch_attention(mesh, head_axis="seq", block_size=8, implementation="xla")
  with pytest.raises(ValueError, match=r"num_kv_heads=2 must be divisible by the 4 devices of "
                                       r"head_axis='seq'"):
    fn(*args, segment_ids=ids)
  args, _ = layer_inputs(0, 3, 64, 4, 2, 16, 8)
  fn = sharded_polysketch_attention(mesh, batch_axis="batch", block_size=8,
                                    implementation="xla")
  with pytest.raises(ValueError, match=r"batch=3 must be divisible by the 2 devices of "
                                       r"batch_axis='batch'"):
    fn(*args)


# Packed documents (the default suite's case) shard the segment ids as well.
@pytest.mark.parametrize("packed", [pytest.param(False, marks=pytest.mark.slow), True])
def test_gpt_trains_the_same_with_the_sequence_sharded(packed):
  """A few AdamW steps of the GPT on 8 devices (sequence sharded) and on one:
  the same losses step for step; packed: with documents spanning shards."""
  import optax
  from flax import nnx
  from pallas_polysketch.models.gpt import GPT, GPTConfig
  cfg = GPTConfig(vocab_size=17, num_layers=1, num_heads=4, num_kv_heads=2, embed_dim=32,
                  block_size=16, sketch_dim=8, implementation="xla")
  mesh = _mesh((8,), ("seq",))
  tokens = jax.random.randint(jax.random.key(0), (2, 8 * 16 + 1), 0, 17)
  ids = _packed_ids(8 * 16, 16) if packed else None

  def losses(model):
    opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, tokens):
      def loss_fn(model):
        logits = model(tokens[:, :-1], segment_ids=ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
      loss, grads = nnx.value_and_grad(loss_fn)(model)
      opt.update(model, grads)
      return loss

    return np.array([float(step(model, opt, tokens)) for _ in range(4)])

  single = losses(GPT(cfg, rngs=nnx.Rngs(0)))
  sharded = losses(GPT(cfg, mesh=mesh, mesh_axes=(None, None, "seq"), rngs=nnx.Rngs(0)))
  assert single[-1] < single[0]
  np.testing.assert_allclose(sharded, single, rtol=1e-5)


def test_sharded_pallas_initial_state_sketched_diagonal_h128_gqa():
  """Context parallelism on the Pallas path, at the combination no other test
  reaches: device 1's causal kernels start from device 0's state (an initial
  state in the dq kernel's walk, its cotangent out of the dkv kernel) with a
  sketched diagonal block, H = 128 (q, k, v, dO tokens on rows) and two query
  heads per kv head; values and gradients against the single-device xla path.
  Not vacuous: the shards run alone (no state passed) give gradients far off."""
  c = CONTEXT_PARALLEL_CASE
  mesh = _mesh((c["devices"],), ("seq",))
  h, shard = c["head_dim"], c["seq"] // c["devices"]
  args, cot = layer_inputs(8, 1, c["seq"], c["heads"], c["kv_heads"], h, c["sketch_dim"])
  kw = dict(block_size=c["block"], local_exact=c["local_exact"])
  sharded = sharded_polysketch_attention(mesh, seq_axis="seq", **kw, **BACKENDS["pallas"])
  single = functools.partial(ps.polysketch_attention, **kw, implementation="xla")

  def alone(*a):
    shards = [ps.polysketch_attention(*(x[:, i:i + shard] for x in a), **kw,
                                      implementation="xla") for i in range(0, c["seq"], shard)]
    return jnp.concatenate(shards, axis=1)

  assert rel_err(jax.jit(sharded)(*args), single(*args)) < f32_tol(4, h)
  grads = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * cot),
                                     argnums=tuple(range(5))))(*args)
  got, want, unshared = grads(sharded), grads(single), grads(alone)
  tol = f32_tol(4, h, grad=True)
  for name, g, w, u in zip(("q", "k", "v", "fq", "fk"), got, want, unshared):
    if name in ("q", "k"):     # a sketched diagonal block reads q, k through the features
      np.testing.assert_array_equal(g, 0.0)
      continue
    assert rel_err(u, w) > 100 * tol, name
    assert rel_err(g, w) < tol, (name, rel_err(g, w))


# --- the op itself under jit with batch-sharded inputs ----------------------------

def _collectives(compiled_text):
  """The compiled program's collective ops, tuple-shaped ones included."""
  return [line for line in compiled_text.splitlines() if re.search(
      r"\s(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-start)?\(",
      line)]


@pytest.mark.parametrize("causal,packed", [(True, False), (False, False), (True, True)])
def test_the_op_under_jit_partitions_the_kernels_over_the_batch(causal, packed):
  """Under jax.jit with q, k, v and the features sharded over the batch, the
  Pallas path runs each device's rows on that device: XLA cannot partition a
  Mosaic kernel (jit over a TPU mesh raised "Mosaic kernels cannot be
  automatically partitioned"), so each kernel carries its own rule
  (`_partitioning.batch_partitioned`). The values and gradients equal the
  single-device op's and nothing but the loss is reduced across devices; under
  vmap the kernels are vmapped as before."""
  mesh = _mesh((4, 2), ("data", "model"))
  # each device's kernels at shapes test_tpu_compile.py lowers for TPU (the
  # interpret configurations; the segment kernel's also compiled by libtpu)
  if packed:
    head_dim, seq = 32, 128
    args, cot = layer_inputs(5, 4, seq, 4, 2, head_dim, 8)
    ids = jnp.asarray(np.repeat(np.arange(4) % 3, seq // 4)[None].repeat(4, 0))
  else:
    head_dim, seq = 64, 256
    args, cot = layer_inputs(5, 4, seq, 2, 2, head_dim, 16)
    ids = None
  kw = dict(block_size=128, causal=causal, segment_ids=ids, **BACKENDS["pallas"])
  loss = lambda *a: jnp.sum(ps.polysketch_attention(*a, **kw) * cot)
  value_and_grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(5))))
  want = value_and_grads(*args)
  sharded = [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in args]
  got = value_and_grads(*sharded)
  assert rel_err(got[0], want[0]) < f32_tol(4, head_dim)
  for g, w in zip(got[1], want[1]):
    assert rel_err(g, w) < f32_tol(4, head_dim, grad=True)
    # (non-causal: q and k enter through their features alone; their zero
    # gradients are constants, which XLA may keep replicated)
    assert g.sharding.spec[:1] == ("data",) or not np.any(np.asarray(w))
  for line in _collectives(value_and_grads.lower(*sharded).compile().as_text()):
    assert "all-reduce" in line and re.search(r"= f32\[\] ", line), line   # the loss only
  one = jax.jit(lambda *a: ps.polysketch_attention(*a, **kw))
  stacked = jax.vmap(lambda *a: ps.polysketch_attention(*a, **kw))(*(a[None] for a in args))
  np.testing.assert_array_equal(stacked[0], one(*args))


def test_learned_features_under_jit_partition_over_the_batch():
  """The learned sketch's kernels too; their weights' gradients are summed over
  the batch's devices (one all-reduce of the weight-shaped gradients)."""
  mesh = _mesh((4, 2), ("data", "model"))
  # test_features_kernels.py's interpret configuration (300 tokens, tiles of
  # 128), which libtpu compiles there
  params = ps.learned_sketch_init(jax.random.key(1), head_dim=64, sketch_dim=32)
  x = jax.random.normal(jax.random.key(2), (4, 300, 2, 64))
  tiles = ps.TileConfig(generation="v5e", features_tile=128)
  features = lambda p, x: ps.learned_sketch_features(p, x, tile_config=tiles,
                                                     **BACKENDS["pallas"])
  value_and_grads = jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(features(p, x) ** 2),
                                               argnums=(0, 1)))
  want = value_and_grads(params, x)
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  got = value_and_grads(params, xs)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert rel_err(g, w) < f32_tol(2, 64, grad=True)
  assert got[1][1].sharding.spec[:1] == ("data",)
  collectives = _collectives(value_and_grads.lower(params, xs).compile().as_text())
  assert collectives and all("all-reduce" in line for line in collectives), collectives
