"""The small text-LM run config the runtime and parallelism tests share (tiny_lm's smoke run, shrunk)."""

import ml_collections

from experiments import tiny_lm


def small_lm_config(*, layers: int, batch: int, seq_len: int, total_steps: int = 3, checkpoint_every: int = 100,
                    hidden: int = 64) -> ml_collections.ConfigDict:
    """Logs every step, no evals, synchronous checkpoints (so a test can read them right after a run)."""
    c = tiny_lm.get_config("smoke")
    c.model.num_hidden_layers = layers
    c.model.hidden_size = hidden
    c.batch_size, c.seq_len = batch, seq_len
    c.total_steps, c.log_every, c.checkpoint_every = total_steps, 1, checkpoint_every
    c.eval_examples = 0
    c.async_checkpoints = False
    return c
