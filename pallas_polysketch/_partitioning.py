"""The Pallas kernels under `jax.jit` with inputs sharded over the batch.

XLA cannot partition a Mosaic kernel (a TPU custom call): jit over a mesh
raised "Mosaic kernels cannot be automatically partitioned. Please wrap the
call in a shard_map." `batch_partitioned` gives each kernel function a
partitioning rule instead (`custom_partitioning`): every device runs it on its
own rows of the batch, with everything else of the arguments whole (an input
sharded over another axis is gathered first; `sharded_polysketch_attention`
shards heads and the sequence without that). On one device, and inside a
shard_map, the function runs as it is, and so does one with effects (the TPU
interpreter's callbacks). Under `vmap` the function is vmapped as it is
(`custom_partitioning` has no batching rule).
"""
from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec


def _factors(prefix: str, ndim: int, batched: bool) -> list[str]:
  return (["b"] if batched else []) + [f"{prefix}{i}" for i in range(int(batched), ndim)]


def batch_partitioned(*, unbatched: tuple[str, ...] = (), summed: tuple[int, ...] = ()):
  """Decorates fn(*args, **kwargs) whose array arguments all have the batch as
  their first axis, but those (pytrees) named in `unbatched`; its results (a
  pytree, or a tuple of them) too, but the results at the positions in `summed`
  (sums over the batch, added over the devices of the batch)."""
  def decorate(fn):
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
      arguments = signature.bind(*args, **kwargs).arguments
      arrays, batched, slots = [], [], []
      for name, value in arguments.items():
        leaves, treedef = jax.tree_util.tree_flatten(value)
        marks = []
        for leaf in leaves:
          if isinstance(leaf, jax.Array):
            marks.append(len(arrays))
            arrays.append(leaf)
            batched.append(name not in unbatched)
          else:
            marks.append(None)
        slots.append((name, treedef, leaves, marks))
      if not any(batched):
        return fn(*args, **kwargs)

      def call(*dynamic):
        rebuilt = {}
        for name, treedef, leaves, marks in slots:
          rebuilt[name] = jax.tree_util.tree_unflatten(
              treedef, [leaf if m is None else dynamic[m] for leaf, m in zip(leaves, marks)])
        return fn(**rebuilt)

      # custom_partitioning (jax 0.12) refuses a function with constants, such
      # as fn's numpy index arrays: they become operands of their own, whole on
      # every device (the partitioned function traces fn again and ignores them).
      closed, result_shape = jax.make_jaxpr(call, return_shape=True)(*arrays)
      if closed.effects:
        # the TPU interpreter's ordered callbacks, which custom_partitioning
        # cannot lower (and a test tool needs no partitioning)
        return fn(*args, **kwargs)
      consts = [jnp.asarray(c) for c in closed.consts]
      operands = consts + arrays
      operand_batched = [False] * len(consts) + batched
      out_tree = jax.tree_util.tree_structure(result_shape)

      def call_with_consts(*values):
        out = jax.core.eval_jaxpr(closed.jaxpr, values[:len(consts)], *values[len(consts):])
        return jax.tree_util.tree_unflatten(out_tree, out)

      # a leaf of a result in `summed` holds no batch axis
      parts = result_shape if isinstance(result_shape, tuple) else (result_shape,)
      flat_results = [(leaf, i not in summed) for i, part in enumerate(parts)
                      for leaf in jax.tree_util.tree_leaves(part)]

      def specs(mesh_axes, shapes):
        return [PartitionSpec(mesh_axes if is_batched else None, *(None,) * (s.ndim - 1))
                if s.ndim else PartitionSpec() for s, is_batched in shapes]

      def result_shardings(mesh, mesh_axes):
        return jax.tree_util.tree_unflatten(
            out_tree, [NamedSharding(mesh, s) for s in specs(mesh_axes, flat_results)])

      def first_batch_axes(arg_shapes):
        for shape, is_batched in zip(arg_shapes, operand_batched):
          if is_batched and shape.sharding is not None:
            spec = shape.sharding.spec
            return spec[0] if len(spec) else None
        return None

      def partition(mesh, arg_shapes, result_shape_):
        del result_shape_
        mesh_axes = first_batch_axes(arg_shapes)
        arg_shardings = tuple(NamedSharding(mesh, s) for s in specs(
            mesh_axes, list(zip(operands, operand_batched))))

        def lower(*values):
          out = call(*values[len(consts):])
          if summed and mesh_axes is not None:
            out = tuple(jax.tree_util.tree_map(lambda x: jax.lax.psum(x, mesh_axes), o)
                        if i in summed else o for i, o in enumerate(out))
          return out
        return mesh, lower, result_shardings(mesh, mesh_axes), arg_shardings

      def infer(mesh, arg_shapes, result_shape_):
        del result_shape_
        return result_shardings(mesh, first_batch_axes(arg_shapes))

      operand_factors = ", ".join(" ".join(_factors(f"a{i}_", a.ndim, b)) for i, (a, b)
                                  in enumerate(zip(operands, operand_batched)))
      result_factors = ", ".join(" ".join(_factors(f"r{j}_", leaf.ndim, is_batched))
                                 for j, (leaf, is_batched) in enumerate(flat_results))
      rule = f"{operand_factors} -> {result_factors}"
      # in order of first use: Shardy wants the special factors' indices sorted
      others = tuple(dict.fromkeys(f for f in rule.replace(",", " ").split()
                                   if f not in ("b", "->")))
      partitioned = custom_partitioning(call_with_consts)
      partitioned.def_partition(partition=partition, infer_sharding_from_operands=infer,
                                sharding_rule=rule, need_replication_factors=others)

      @jax.custom_batching.custom_vmap
      def run(*values):
        return partitioned(*values)

      @run.def_vmap
      def _run_vmap(axis_size, in_batched, *values):
        del axis_size
        axes = [0 if b else None for b in in_batched[len(consts):]]
        out = jax.vmap(call, in_axes=axes)(*values[len(consts):])
        return out, jax.tree_util.tree_map(lambda _: True, out)

      return run(*operands)
    return wrapped
  return decorate
