"""PolySketch attention on a device mesh: batch, head and sequence sharding.

A Pallas call cannot be partitioned automatically, so the sharded op wraps it
in `shard_map`: each device runs the op on its block of [batch, seq, heads]; with
the sequence sharded, the devices exchange only their prefix states
(`polysketch_attention(..., context_axis_name=...)`, DESIGN §1.5):
r^2 (H + 1) floats per kv head and device, independent of the sequence length,
where ring attention moves all of K and V. With packed segments, also the last
block of k, v and k_features and a few ints per row go to the next device.
"""
from __future__ import annotations

import functools

from jax.sharding import Mesh, PartitionSpec

from pallas_polysketch import _compat, _validation
from pallas_polysketch.attention import polysketch_attention


def sharded_polysketch_attention(mesh: Mesh, *, batch_axis=None, head_axis=None,
                                 seq_axis=None, **op_kwargs):
  """`polysketch_attention` for inputs sharded over `mesh`.

  Args:
    mesh: the device mesh.
    batch_axis, head_axis, seq_axis: mesh axis names (or None) that shard the
      batch, the heads (query and kv heads alike: the kv heads must divide
      evenly too, so each device keeps whole groups) and the sequence
      (contiguously; each device's shard must be a multiple of block_size).
    **op_kwargs: the keyword arguments of `polysketch_attention` but
      context_axis_name (seq_axis sets it) and segment_ids (an argument of the
      returned function); either raises a ValueError.

  Returns:
    fn(q, k, v, q_features, k_features, segment_ids=None) -> out, all
    [batch, seq, heads, D] with PartitionSpec(batch_axis, seq_axis, head_axis,
    None); segment_ids [batch, seq] with PartitionSpec(batch_axis, seq_axis)
    (a segment may span shards). Usable under jit: no input is all-gathered.
  """
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  for name, axis in (("batch_axis", batch_axis), ("head_axis", head_axis),
                     ("seq_axis", seq_axis)):
    if axis is not None and axis not in mesh.axis_names:
      raise ValueError(f"{name}={axis!r} is not an axis of the mesh {mesh.axis_names}")
  named = [(name, axis) for name, axis in (("batch_axis", batch_axis), ("head_axis", head_axis),
                                          ("seq_axis", seq_axis)) if axis is not None]
  for i, (name, axis) in enumerate(named):
    for other, other_axis in named[i + 1:]:
      if axis == other_axis:
        raise ValueError(f"{name} and {other} are both {axis!r}: a mesh axis can shard only "
                         "one of batch, heads and seq")
  if "context_axis_name" in op_kwargs:
    raise ValueError("pass the sequence axis as seq_axis, not context_axis_name")
  if "segment_ids" in op_kwargs:
    raise ValueError("pass segment_ids to the returned function (sharded as the inputs), "
                     "not to sharded_polysketch_attention")
  spec = PartitionSpec(batch_axis, seq_axis, head_axis, None)
  local = functools.partial(polysketch_attention, context_axis_name=seq_axis, **op_kwargs)
  plain = _compat.shard_map(local, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec)
  packed = _compat.shard_map(
      lambda *a: local(*a[:5], segment_ids=a[5]), mesh=mesh,
      in_specs=(spec,) * 5 + (PartitionSpec(batch_axis, seq_axis),), out_specs=spec)

  def sharded(q, k, v, q_features, k_features, segment_ids=None):
    # On the global shapes, before shard_map splits them (its own errors name
    # in_specs, not the argument; a list of ids is converted as by the op).
    _validation.check_attention_inputs(q, k, v, q_features, k_features)
    segment_ids = _validation.check_segment_ids(segment_ids, q)
    for name, axis, dims in (
        ("batch_axis", batch_axis, (("batch", q.shape[0]),)),
        ("seq_axis", seq_axis, (("seq", q.shape[1]),)),
        ("head_axis", head_axis, (("num_heads", q.shape[2]), ("num_kv_heads", k.shape[2])))):
      for what, n in dims if axis is not None else ():
        if n % mesh.shape[axis]:
          raise ValueError(
              f"{what}={n} must be divisible by the {mesh.shape[axis]} devices of "
              f"{name}={axis!r}: each device holds an equal part (q {tuple(q.shape)}, "
              f"k {tuple(k.shape)})")
    if segment_ids is None:
      return plain(q, k, v, q_features, k_features)
    return packed(q, k, v, q_features, k_features, segment_ids)

  return sharded
