"""A servable model from a path: a k25 run directory or an HF checkpoint directory.

Run directory: the run's `config.json` (written by the training loop) rebuilds the stage's model through the
same `Trainer` that trained it, and the latest orbax checkpoint fills it; the chat format is the run's
tokenizer (`config.data.tokenizer`: "byte" or an HF tokenizer directory). HF directory: `k25.hf.load`
builds the model and the directory's own `tiktoken.model` + `tokenizer_config.json` give the format.
"""

from __future__ import annotations

import json
import os

from flax import nnx

from k25.data.chat import ChatFormat, load_chat_format


def load_run(workdir: str) -> tuple[nnx.Module, ChatFormat]:
    import ml_collections

    from k25.train.checkpoint import Checkpointer
    from k25.train.loop import Trainer

    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    spec = config.get("data", {}).get("tokenizer", "byte") if "data" in config else "byte"
    if "model_config" in config:  # converted by experiments.convert: a model, no training state
        from k25.train.rundir import read_model_run

        return read_model_run(workdir), load_chat_format(spec)
    ckpt = Checkpointer(workdir, async_save=False)
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f"{workdir} has a config.json but no checkpoint under {ckpt.directory}")
    mesh = config.mesh
    mesh.devices = mesh.get("devices", 0) or mesh.pp * mesh.dp * mesh.ep  # restore on the run's mesh shape
    trainer = Trainer(config, workdir)
    state, _, _ = ckpt.restore(trainer.abstract_state)
    return trainer.model(state), load_chat_format(spec)


def load_sampler(path: str, *, max_slots: int, max_len: int, cache_dtype: str = "float32",
                 suppress_placeholders: bool = True):
    """(Sampler, chat format) serving the checkpoint at `path`. With `suppress_placeholders` a K2.5 model's
    sampler never emits a media placeholder (`K25Config.sampled_placeholder_ids`): an answer holding one would
    come back, in the next turn's history, as an image slot with no image."""
    from k25.infer import Sampler

    model, chat = load_checkpoint(path)
    suppress = model.cfg.sampled_placeholder_ids if suppress_placeholders else ()
    return Sampler(model, max_slots=int(max_slots), max_len=int(max_len), cache_dtype=cache_dtype,
                   suppress_ids=suppress), chat


def load_checkpoint(path: str) -> tuple[nnx.Module, ChatFormat]:
    """(model, chat format) of a run directory or an HF directory; a clear error for anything else."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--checkpoint={path} is not a directory; give a k25 run directory (config.json + "
                                "checkpoints/) or an HF checkpoint directory (config.json + safetensors)")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return load_run(path)
    if os.path.exists(os.path.join(path, "config.json")):
        from k25.hf import load

        return load(path), load_chat_format(path)
    raise FileNotFoundError(f"{path} is neither a k25 run directory (no checkpoints/) nor an HF checkpoint "
                            "(no config.json)")
