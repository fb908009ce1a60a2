"""Starting a run from another run's weights: the latest checkpoint's params and buffers, copied into a module.

Used to chain phases (the ViT stage's `init_from` / `init_parts`) and to start the joint K2.5 stage from a
text model (`init_text_from`). The copies are host constants baked into the init function: fine at the
scales that run on one host; a sharded restore would be the path for large towers.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from k25.train.checkpoint import Checkpointer


def latest_params(workdir: str, field: str) -> dict[str, Any]:
    """{"params": ..., "buffers": ...} pure dicts (numpy) of the latest checkpoint under `workdir`, or {} when
    workdir is empty. `field` names the config field in errors."""
    if not workdir:
        return {}
    step = None
    if os.path.isdir(os.path.join(workdir, "checkpoints")):  # (a Checkpointer would create the directory)
        step = Checkpointer(workdir, async_save=False).latest_step()
    if step is None:
        raise ValueError(f"{field}={workdir!r} holds no checkpoint; run the earlier phase there first.")
    path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state")
    state = ocp.StandardCheckpointer().restore(path)
    return jax.device_get({"params": state["params"], "buffers": state.get("buffers", {}) or {}, "path": path})


def copy_into(module: nnx.Module, saved: dict[str, Any], field: str) -> None:
    """Overwrite `module`'s params and buffers with `saved` ({"params", "buffers"} pure dicts) in place,
    after checking every shape (the configs of both runs must build the same module)."""
    _, params, buffers = nnx.split(module, nnx.Param, ...)
    for state, values in ((params, saved["params"]), (buffers, saved.get("buffers", {}))):
        want = jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(state))
        if want != jax.tree.map(lambda x: x.shape, values):
            raise ValueError(f"{field}: the checkpoint's {type(module).__name__} has other shapes than this "
                             "config's; the model config must match the run it starts from.")
        nnx.replace_by_pure_dict(state, values)
        nnx.update(module, state)
