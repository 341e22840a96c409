"""Counting a model's multiply-accumulates (the papers' "FLOPs") from its jaxpr.

`count_macs` traces ``model.apply(params, x, train=False)`` with abstract shapes
only (``jax.eval_shape`` for the parameters, ``jax.jit(...).trace`` on
``ShapeDtypeStruct`` inputs: nothing is allocated or compiled) and sums the
multiply-accumulates of every ``dot_general`` and ``conv_general_dilated``,
walking nested jaxprs (jit/pjit, custom_jvp/custom_vjp calls, closed calls,
remat, scan bodies × their length, while bodies once, the largest cond branch).
Elementwise work (GELU, LayerNorm, softmax, the shift, pooling) is not counted:
this is how the S²-MLP, S²-MLPv2, ViP and Mixer papers count.

`xla_flops` is XLA's own estimate (``cost_analysis()['flops']`` of the compiled
forward), which also counts elementwise work; half of it should be a few percent
above `count_macs`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import ClosedJaxpr, Jaxpr

from s2mlp.models import abstract_params


def _sub_jaxprs(params: dict[str, Any]):
    """The jaxprs among an equation's parameters (each a value or a tuple/list of values)."""
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, (Jaxpr, ClosedJaxpr)):
                yield item


def _dot_macs(eqn) -> int:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs_shape = eqn.invars[0].aval.shape
    return math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs_shape[d] for d in lhs_contract)


def _conv_macs(eqn) -> int:
    # The kernel's dims are rhs_spec = (out features, in features, *spatial); its in-feature size is already
    # in_channels / feature_group_count, so each output sums over its in-feature and spatial dims.
    rhs_spec, rhs_shape = eqn.params["dimension_numbers"].rhs_spec, eqn.invars[1].aval.shape
    return math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs_shape[d] for d in rhs_spec[1:])


def jaxpr_macs(jaxpr) -> int:
    """Multiply-accumulates of the dots and convolutions in `jaxpr` (Jaxpr or ClosedJaxpr)."""
    jaxpr = jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_macs(eqn)
        elif name == "conv_general_dilated":
            total += _conv_macs(eqn)
        elif name == "cond":
            total += max(jaxpr_macs(b) for b in eqn.params["branches"])
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_macs(eqn.params["jaxpr"])
        elif name == "while":
            # No static trip count: count one iteration of the body and its condition.
            total += jaxpr_macs(eqn.params["body_jaxpr"]) + jaxpr_macs(eqn.params["cond_jaxpr"])
        else:
            total += sum(jaxpr_macs(sub) for sub in _sub_jaxprs(eqn.params))
    return total


# Backend (LLVM) optimisation off: about half the CPU compile time, and the HLO that
# cost_analysis() reads is the same (its passes still run), so the flops are identical.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _trace(model, image_size: int, batch: int):
    """``jax.jit(forward).trace`` on abstract (batch, S, S, 3) inputs: the jaxpr, ready to lower; nothing allocated."""
    params = {"params": abstract_params(model, image_size)}
    x = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    return jax.jit(lambda p, images: model.apply(p, images, train=False)).trace(params, x)


def count_macs(model, image_size: int = 224, batch: int = 1) -> int:
    """Multiply-accumulates of `model`'s eval forward on a (batch, S, S, 3) input."""
    return jaxpr_macs(_trace(model, image_size, batch).jaxpr)


def cost_flops(cost: Any) -> float:
    """``cost_analysis()``'s 'flops' across JAX versions (a dict, or a list of one dict per program)."""
    if isinstance(cost, (list, tuple)):
        return float(sum(c.get("flops", 0.0) for c in cost if c))
    return float(cost["flops"])


def xla_flops(model, image_size: int = 224, batch: int = 1) -> float:
    """XLA's flop estimate of the compiled eval forward (counts elementwise work too)."""
    return cost_flops(_trace(model, image_size, batch).lower().compile(FAST_COMPILE).cost_analysis())


def macs_and_xla_flops(model, image_size: int = 224, batch: int = 1) -> tuple[int, float]:
    """`count_macs` and `xla_flops` from one trace (compiling once)."""
    traced = _trace(model, image_size, batch)
    return jaxpr_macs(traced.jaxpr), cost_flops(traced.lower().compile(FAST_COMPILE).cost_analysis())
