"""The published Kimi K2 text model (1.04T total / 32B activated) for planning and scaled runs.

    python -m experiments.run --config=experiments/k2_full.py --workdir=DIR --dry_run
builds the run abstractly (no weights allocated), lowers one training step and writes DIR/plan.json.
ARG: "" (bf16 compute over f32 parameters, 4096 context, one device's mesh), "layout": the published
training layout of the report's appendix C on 512 devices: 16-way pipeline with virtual stages under
interleaved 1F1B, 16-way expert parallelism, 2-way ZeRO-1 data parallelism, or "stage": that layout's pipeline
stage at reduced depth on one 8-accelerator host (see `STAGE`). Plan the layout on one CPU host with
emulated devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=512 JAX_PLATFORMS=cpu \
      python -m experiments.run --config=experiments/k2_full.py:layout --workdir=DIR --dry_run --compile

Layout choices the seeds leave open (see BUILD_NOTES.md): virtual_stages=3 puts one MoE layer in each of
the 48 pipeline chunks (60 = 3*16 + 12; the dense layer and 12 MoE layers run before the pipeline on every
stage, a microbatch at a time); 16 microbatches (interleaving needs a multiple of pp) and 32 accumulation
steps, so each of the 32 data ranks holds one 4096-token sequence per microbatch; selective recomputation
as in the report; query-chunked attention and an expert-exchange capacity of 2x the average, which a
static-shape plan needs. The 60-layer stacks are stored with pp on their hidden dimension
(k25.parallel.mesh.storage_spec) and the embedding and LM head with their vocab over all devices
(model.shard_vocab), so parameters and ZeRO-1 state take 27 GB per device; BUILD_NOTES.md has the compiled
figures (67.9 GB per device with these settings, 79.9 GB with full recomputation and no offload).
"""

from __future__ import annotations

from experiments.common import base_config, model_config_dict
from k25.data.pipeline import default_data_config
from k25.model.config import k2_full

# "stage": what one device of the layout holds and runs for its pipeline stage, on 8 devices (pp2 x dp2 x ep2)
# instead of 512, so an accelerator host can measure a stage's real peak memory next to XLA's compiled figure.
# Kept per device as in the layout: full-width layers, 24 routed experts per ep rank (48 = 24 x ep2, top-8),
# one MoE layer per pipeline chunk with v = 3 (so a stage's chunks hold the layout's 3 x 24 experts), ZeRO-1
# over dp = 2, 4096-token sequences, one per data rank per microbatch, every memory setting of the layout.
# Reduced: depth 8 (the dense layer, 1 MoE layer before the pipeline instead of 12, 6 in it instead of 48),
# 4 microbatches and 2 accumulation steps instead of 16 and 32, and 2 stages, so fewer 1F1B slots are in flight.
STAGE = dict(pp=2, dp=2, ep=2, layers=8, experts=48, microbatches=4, accum_steps=2)


def get_config(arg: str | None = None):
    if arg not in (None, "", "layout", "stage"):
        raise ValueError(f"k2_full: unknown ARG {arg!r}; use '', 'layout' or 'stage'.")
    c = base_config()
    c.model = model_config_dict(k2_full())  # dtype bfloat16, param_dtype float32
    c.data = default_data_config()
    c.data.tokenizer = "byte"  # replace with the K2 tokenizer file for real data: --config.data.tokenizer=PATH
    c.seq_len = 4096
    c.batch_size = 16384  # 67M tokens per step (K2's pre-training batch)
    c.total_steps = 1000
    c.optim.lr = 2e-4
    c.optim.schedule = "wsd"
    c.optim.warmup_steps = 500
    c.optim.qk_clip_tau = 100.0
    c.eval_examples = 0
    if arg in ("layout", "stage"):
        c.mesh.update(pp=16, dp=2, ep=16)
        c.pipeline.update(virtual_stages=3, microbatches=16, schedule="1f1b")
        c.optim.accum_steps = 32
        # the Muon momentum stored in bf16 (7.9 -> 4.0 GB per device; the step still computes it in f32 and
        # rounds once when storing it, as DeepSeek-V3 stores its AdamW moments)
        c.optim.muon_mu_dtype = "bfloat16"
        c.model.remat = "selective"
        # report App. C: the residuals the 1F1B slots hold are stored in float8 (16-bit activations only, see
        # k25/model/remat.py) and parked in pinned host memory between a unit's forward and its backward
        c.model.fp8_activations = True
        c.model.remat_offload = True
        # the stages' regrouped copy of the expert weights in bf16 (they are only used cast to bf16); their
        # gradients are still summed and regrouped in f32
        c.pipeline.regroup_in_compute_dtype = True
        # the stages' f32 gradient sums of the expert stacks sharded over dp (ZeRO-2) instead of replicated
        c.pipeline.grad_sums_over_dp = True
        # the loss head over each microbatch's sequence in 4 recomputed pieces: the vocab-parallel head gathers a
        # microbatch's hidden states over the 32 data ranks, and one piece's logits are live instead of all
        c.pipeline.head_chunks = 4
        # the embedding table and LM head stored vocab-sharded over all 512 devices instead of replicated
        # (2 x 4.7 GB); lookup and loss head work on vocab slices (k25/parallel/vocab.py)
        c.model.shard_vocab = True
        # expert all-to-all: each rank pair gets twice its average routed rows instead of the dropless worst
        # case of ep*min(k, E/ep)/k = 16x; the report's system is dropless with ragged buffers, a static-shape
        # plan needs a bound
        c.model.ep_capacity_factor = 2.0
        # query blocks of 512 rows: the backward recomputes each block's scores instead of keeping
        # (64, 4096, 4096) float32 logits per sequence per layer
        c.model.attention_chunk = 512
    if arg == "stage":
        c.mesh.update(pp=STAGE["pp"], dp=STAGE["dp"], ep=STAGE["ep"])
        c.model.num_hidden_layers, c.model.n_routed_experts = STAGE["layers"], STAGE["experts"]
        c.pipeline.microbatches, c.optim.accum_steps = STAGE["microbatches"], STAGE["accum_steps"]
        c.batch_size = STAGE["microbatches"] * STAGE["accum_steps"] * STAGE["dp"] * STAGE["ep"]
    return c
