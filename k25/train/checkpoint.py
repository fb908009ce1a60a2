"""Orbax checkpoints of the training state and the data iterator, under DIR/checkpoints/.

Each step directory holds three items: `state` (the TrainState pytree), `data` (the grain
iterator state, JSON) and `meta` (step and the run's config, JSON). Restoring checks the saved
state against the abstract state of the current config, so a config change or a damaged file is
reported with the path and the reason instead of silently training from scratch.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used; the message names the file and why."""


class Checkpointer:
    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, meta: dict, *, force: bool = False) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, dict]:
        """(state, data iterator state, meta) of `step` (default: latest), laid out like `abstract_state`."""
        step = self.latest_step() if step is None else step
        where = os.path.join(self.directory, str(step))
        for item in ("state", "data", "meta"):
            if not os.path.isdir(os.path.join(where, item)):
                raise CheckpointError(f"checkpoint {where} is incomplete: item directory '{item}' is missing "
                                      "(was the save interrupted?). Delete that step directory to resume from "
                                      "the previous checkpoint.")
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types; re-raise with the path and the cause
            raise CheckpointError(f"cannot restore checkpoint {where}: {type(e).__name__}: {e}. If the config "
                                  "changed (model shape, optimizer), use a new --workdir.") from e
        _check_shapes(restored["state"], abstract_state, where)
        return restored["state"], restored["data"], restored["meta"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _check_shapes(got: Any, want: Any, where: str) -> None:
    flat_got = dict(jax.tree_util.tree_leaves_with_path(got))
    for path, leaf in jax.tree_util.tree_leaves_with_path(want):
        g = flat_got.get(path)
        if g is None or tuple(g.shape) != tuple(leaf.shape):
            raise CheckpointError(f"checkpoint {where}/state: {jax.tree_util.keystr(path)} has shape "
                                  f"{None if g is None else g.shape}, the current config needs {leaf.shape}. "
                                  "Use a new --workdir for a different config.")


def config_json(config: Any) -> str:
    return json.dumps(config.to_dict() if hasattr(config, "to_dict") else dict(config), default=str)
