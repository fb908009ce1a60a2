"""Fields every experiment config has (see DESIGN.md), so any can be set from the command line."""

from __future__ import annotations

import dataclasses

import ml_collections

from k25.model.config import K2Config
from k25.train.optimizer import default_optim_config


def model_config_dict(cfg: K2Config) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dataclasses.asdict(cfg))


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "lm"
    c.seed = 0
    c.total_steps = 100
    c.batch_size = 16
    c.seq_len = 128
    c.log_every = 10
    c.eval_every = 0  # 0: evaluate only at the end
    c.eval_examples = 64  # held-out examples per task (0: no evals)
    c.eval_at_start = False  # also evaluate the untrained model (logged at step 0)
    c.eval_max_new_tokens = 8
    c.checkpoint_every = 100
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.max_nonfinite_steps = 10
    c.progress_bar = True
    c.host_data = "slice"  # "slice": each process reads its share; "replicate": all read everything
    c.distributed = False  # call jax.distributed.initialize() (multi-host launches)
    c.optim = default_optim_config()
    c.zero1 = True  # shard optimizer state over the data-parallel ranks (k25.parallel.zero)
    # Decoupled Encoder Process for multimodal steps (k25.parallel.dep, k25.train.multimodal): the vision
    # encoder runs replicated over every device on patch-balanced chunks, outside the backbone's layout, and
    # is recomputed for its backward. Same numbers as end-to-end backprop; lower peak memory, no imbalance.
    c.dep = False
    c.mesh = ml_collections.ConfigDict(dict(pp=1, dp=1, ep=1, devices=0))  # devices: 0 = all
    # memory options of the 1f1b schedule (k25.train.pipelined_lm.PipelineSettings says what each does)
    c.pipeline = ml_collections.ConfigDict(dict(virtual_stages=1, microbatches=1, schedule="gpipe",
                                                regroup_in_compute_dtype=False, grad_sums_over_dp=False,
                                                head_chunks=1))
    return c
