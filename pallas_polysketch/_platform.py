"""`require_tpu`: an identity that only lowers for TPU.

`implementation="pallas"` without interpret mode must fail clearly when lowered
for another platform, and still lower when a CPU host exports or compiles for
TPU; so the check lives in a lowering rule, not in `jax.default_backend()`.
"""
from __future__ import annotations

from jax.extend import core
from jax.interpreters import ad, batching, mlir

_require_tpu_p = core.Primitive("polysketch_require_tpu")


def _impl(x, *, op):
  """Run eagerly (outside jit, as `learned_sketch_features` may be), the check
  is x's devices' platform: an identity let the Pallas call fail off TPU with
  jax's own message. (Not a jit of the primitive: under jax.disable_jit that
  would call this again.)"""
  platforms = sorted({d.platform for d in x.devices()}) if hasattr(x, "devices") else []
  if platforms and platforms != ["tpu"]:
    raise ValueError(_message(op, platforms))
  return x


_require_tpu_p.def_impl(_impl)
_require_tpu_p.def_abstract_eval(lambda x, *, op: x)
ad.deflinear2(_require_tpu_p, lambda ct, _, *, op: [ct])
batching.primitive_batchers[_require_tpu_p] = (
    lambda args, dims, *, op: (_require_tpu_p.bind(*args, op=op), dims[0]))


def _lower_on_tpu(ctx, x, *, op):
  return [x]


def _message(op, platforms):
  return (f"{op}(implementation='pallas') runs the Mosaic TPU kernel "
          f"and cannot be lowered for {', '.join(platforms)}; pass interpret=True to "
          "run the same kernel on this backend, or implementation=None / 'xla' for "
          "the pure-JAX path")


def _lower_elsewhere(ctx, x, *, op):
  platforms = getattr(ctx.module_context, "platforms", None) or ["non-TPU"]
  raise ValueError(_message(op, platforms))


mlir.register_lowering(_require_tpu_p, _lower_elsewhere)
mlir.register_lowering(_require_tpu_p, _lower_on_tpu, platform="tpu")


def require_tpu(x, op: str = "polysketch_attention"):
  """Returns x; lowering for any platform but TPU raises a ValueError naming
  the public function `op`."""
  return _require_tpu_p.bind(x, op=op)
