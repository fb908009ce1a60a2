"""The training state: plain pytrees only, so jit shardings, orbax and the pipeline all see arrays.

The model's NNX graph (static structure) is kept apart as `graphdef`; `params` holds the
gradient-trained `nnx.Param`s, `buffers` everything else the model carries (the MoE routing
correction biases, updated by the balancing rule rather than by gradients).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


@struct.dataclass
class TrainState:
    step: jnp.ndarray  # int32 scalar: optimizer steps taken
    params: Any  # pure dict of nnx.Param values
    buffers: Any  # pure dict of the remaining model variables (routing biases)
    opt_state: Any
    nonfinite_streak: jnp.ndarray  # int32: consecutive skipped (non-finite) steps
    nonfinite_total: jnp.ndarray  # int32: all skipped steps


@struct.dataclass
class ModelDef:
    """The static half of a model: its NNX graph and State templates to rebuild it from pure dicts."""

    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    params_template: nnx.State = struct.field(pytree_node=False)
    buffers_template: nnx.State = struct.field(pytree_node=False)

    def merge(self, params: dict, buffers: dict) -> nnx.Module:
        """A model whose variables are `params` / `buffers` (pure dicts); works on traced values."""
        p = jax.tree.map(lambda x: x, self.params_template)
        b = jax.tree.map(lambda x: x, self.buffers_template)
        nnx.replace_by_pure_dict(p, params)
        nnx.replace_by_pure_dict(b, buffers)
        return nnx.merge(self.graphdef, p, b)


def split_model(model: nnx.Module) -> tuple[ModelDef, dict, dict]:
    """(ModelDef, params pure dict, buffers pure dict) of an NNX model."""
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (params, buffers))
    return ModelDef(graphdef, *abstract), nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)


def init_state(params: dict, buffers: dict, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, buffers=buffers,
                      opt_state=optimizer.init(params), nonfinite_streak=jnp.zeros((), jnp.int32),
                      nonfinite_total=jnp.zeros((), jnp.int32))
