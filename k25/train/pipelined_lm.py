"""The K2 decoder's training loss run through the pipeline (k25/parallel/pipeline.py), with config checks.

The decoder is cut where its stacks allow: embedding, the `first_k_dense_replace` dense layers and the first
`num_moe_layers mod (pp * virtual_stages)` MoE layers run before the pipeline (on every stage, one microbatch
at a time and recomputed in the backward: `_run_prologue`); the remaining MoE layers are the pipeline's p*v
chunks; the final norm, LM head and loss run on the last stage per microbatch. For K2 (1 dense + 60 MoE
layers) on 16 stages, v=1, that is the dense layer and 12 MoE layers before and 48 in the pipeline; the
leftover layers stay out of the stages so that no stage gets more layers than another. Every piece calls the
decoder's own modules (`K2Model.inputs`, `scan_state` over slices of the stacked layers,
`K2Model.head_modules`), so there is one implementation of the model math. The pieces before the pipeline are
differentiated by the surrounding `jax.value_and_grad` (the pipeline is an ordinary differentiable function
for gpipe, a `custom_vjp` carrying its own 1F1B gradients otherwise), so `k25.train.step` needs nothing
pipeline-specific.

The statistics the step needs come out exactly as in the unpipelined run: per-layer max attention logits
(QK-Clip) are maxima over microbatches, expert counts (bias balancing) sums of integers.

Note on layout: parameters keep the stored order (layer axis sharded over `pp` in contiguous blocks, or, for
a stack whose layers do not divide into the stages, `pp` on another dimension: k25.parallel.mesh.storage_spec);
the pipeline regroups them so chunk r*p + s sits on stage s. With virtual_stages=1 this is the stored layout;
with v > 1 XLA moves (v-1)/v of the pipelined layers' weights between stages each step (and the gradients
back), a cost a layout that stores layers in chunk order would avoid.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import PartitionSpec as P

from k25.model.config import K2Config
from k25.model.decoder import K2Model, project_logits, scan_state
from k25.model.remat import remat_wrapper
from k25.parallel import schedule as sched
from k25.parallel.mesh import BATCH_AXES, storage_spec
from k25.parallel.pipeline import pipeline_loss

TokenLoss = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class PipelineSettings:
    """`config.mesh.pp` and `config.pipeline.*`, checked against the model and the batch."""

    stages: int = 1
    virtual: int = 1
    microbatches: int = 1
    schedule: str = "gpipe"
    # 1f1b: the stages' regrouped copy of the routed-expert weights is built in the compute dtype
    # (`pipeline.regroup_in_compute_dtype`; see `pipeline_loss`'s `regroup_dtypes`)
    regroup_in_compute_dtype: bool = False
    # 1f1b: the stages' gradient sums of the regrouped stacks stay sharded over `dp` (ZeRO-2;
    # `pipeline.grad_sums_over_dp`, see `pipeline_loss`'s `grad_shard_axis`)
    grad_sums_over_dp: bool = False
    # the loss head runs over each microbatch's sequence in this many pieces, each recomputed in the backward
    # (`pipeline.head_chunks`): only one piece's logits and gathered hidden states are live at a time
    head_chunks: int = 1

    @property
    def enabled(self) -> bool:
        """The pipelined loss is used when there is more than one stage or more than one microbatch."""
        return self.stages > 1 or self.microbatches > 1

    def build(self) -> sched.Schedule:
        return sched.build(self.schedule, self.stages, self.virtual, self.microbatches)


def pipeline_settings(config: ml_collections.ConfigDict, model_cfg: K2Config) -> PipelineSettings:
    """Settings from the config; ValueError naming the field and the fix when they cannot work."""
    pipe = config.get("pipeline", ml_collections.ConfigDict())
    s = PipelineSettings(stages=int(config.mesh.pp), virtual=int(pipe.get("virtual_stages", 1)),
                         microbatches=int(pipe.get("microbatches", 1)), schedule=str(pipe.get("schedule", "gpipe")),
                         regroup_in_compute_dtype=bool(pipe.get("regroup_in_compute_dtype", False)),
                         grad_sums_over_dp=bool(pipe.get("grad_sums_over_dp", False)),
                         head_chunks=int(pipe.get("head_chunks", 1)))
    sched.validate(s.schedule, s.stages, s.virtual, s.microbatches)
    if s.head_chunks < 1 or config.seq_len % s.head_chunks:
        raise ValueError(f"config.pipeline.head_chunks={s.head_chunks} must be >= 1 and divide config.seq_len="
                         f"{config.seq_len}; pick a divisor of the sequence length (1 = the whole sequence).")
    if s.grad_sums_over_dp and s.schedule != "1f1b":
        raise ValueError("config.pipeline.grad_sums_over_dp needs config.pipeline.schedule='1f1b' (under gpipe "
                         "autodiff owns the gradient sums); set the schedule or drop the flag.")
    if not s.enabled:
        return s
    chunks = s.stages * s.virtual
    if model_cfg.num_moe_layers < chunks:
        raise ValueError(
            f"config.model has {model_cfg.num_moe_layers} MoE layers (num_hidden_layers - first_k_dense_replace), "
            f"fewer than the mesh.pp * pipeline.virtual_stages = {chunks} pipeline chunks that need one each; "
            "lower config.mesh.pp or config.pipeline.virtual_stages, or raise config.model.num_hidden_layers.")
    data = int(config.mesh.dp) * int(config.mesh.ep)
    accum = int(config.optim.get("accum_steps", 1))
    rows = config.batch_size // accum
    if config.batch_size % accum or rows % (s.microbatches * data):
        raise ValueError(
            f"config.batch_size={config.batch_size} (per accumulation step: {config.batch_size / accum:g} rows, "
            f"optim.accum_steps={accum}) must split into pipeline.microbatches={s.microbatches} microbatches "
            f"that each divide over the mesh.dp * mesh.ep = {data} data ranks, i.e. be a multiple of "
            f"{s.microbatches * data * accum}; change config.batch_size or config.pipeline.microbatches.")
    return s


def microbatched(tree: Any, m: int) -> Any:
    """(B, ...) -> (m, B/m, ...), microbatch j = rows j, j+m, j+2m, ...

    Strided rather than contiguous: each data rank holds a contiguous block of B/n rows, so every
    microbatch takes B/(n*m) rows from every rank and nothing moves between devices.
    """
    def split(a: jax.Array) -> jax.Array:
        a = jnp.swapaxes(a.reshape(a.shape[0] // m, m, *a.shape[1:]), 0, 1)
        mesh = jax.sharding.get_abstract_mesh()
        axes = tuple(ax for ax in BATCH_AXES if not mesh.empty and ax in mesh.axis_names and mesh.shape[ax] > 1)
        return jax.lax.with_sharding_constraint(a, P(None, axes)) if axes else a

    return jax.tree.map(split, tree)


def _storage_specs(state: nnx.State) -> Any:
    """Each leaf's stored PartitionSpec on the ambient mesh (k25.parallel.mesh.storage_spec, the rule that
    placed it), so the pipeline can regroup stacks stored with `pp` off their layer axis; None without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    leaves, treedef = jax.tree.flatten(state)
    if mesh.empty or "pp" not in mesh.axis_names:
        return jax.tree.unflatten(treedef, [None] * len(leaves))
    logical = jax.tree.leaves(nnx.get_partition_spec(state), is_leaf=lambda x: isinstance(x, P))
    return jax.tree.unflatten(treedef, [storage_spec(a.shape, tuple(spec), mesh) for a, spec in zip(leaves, logical)])


def _keys(path: Any) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def _run_prologue(stacks: list, x: jax.Array, side: tuple, unroll: bool = False
                  ) -> tuple[jax.Array, tuple[jax.Array, Any, jax.Array]]:
    """The dense layers and the leftover MoE layers, one pipeline microbatch at a time.

    They run on every stage, before the pipeline. Taking the whole accumulation batch at once would keep
    every layer's residuals for all m microbatches (and size the expert all-to-all buffers for m times
    the tokens); instead `lax.map` goes over the microbatches, each one checkpointed whole (only its
    input is kept) and recomputed layer by layer (`full` remat) in the backward. Returns (outputs (m, ...),
    (max attention logits (layers, heads) over microbatches, expert counts (moe layers, E) summed or None,
    dropped assignments summed)).
    """
    per_layer = remat_wrapper("full")

    @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
    def one(args: tuple) -> tuple[jax.Array, tuple]:
        h, side_i = args
        mls, cs, dropped = [], [], jnp.zeros((), jnp.int32)
        for graphdef, states, is_moe in stacks:
            h, (ml, c, d) = scan_state(graphdef, states, h, *side_i, remat=per_layer, unroll=unroll)
            mls.append(ml)
            cs += [c] if is_moe else []
            dropped = dropped + d.sum()
        return h, (jnp.concatenate(mls, 0), jnp.concatenate(cs, 0) if cs else None, dropped)

    y, (ml, c, d) = jax.lax.map(one, (x, side))
    return y, (ml.max(0), None if c is None else c.sum(0), d.sum())


def pipelined_decoder_loss(model: K2Model, batch: dict, settings: PipelineSettings, token_loss: TokenLoss,
                           *, with_activity: bool = False) -> tuple[jax.Array, dict]:
    """Like `lm_loss`: (summed token loss, {num_tokens, max_attn_logits, expert_counts}), through the pipeline.

    `token_loss(logits, targets, loss_mask) -> (loss_sum, num_tokens)`. `with_activity` adds
    `pipeline/activity` (stages, ticks): the op each stage ran at each tick.
    """
    cfg = model.cfg
    p, v, m = settings.stages, settings.virtual, settings.microbatches
    remat = remat_wrapper(cfg.remat, cfg.remat_offload, cfg.fp8_activations)
    h, cos, sin, mask = model.inputs(batch["input_ids"], positions=batch["positions"],
                                     segment_ids=batch["segment_ids"])
    x, side, data = microbatched((h, (cos, sin, mask), {k: batch[k] for k in ("targets", "loss_mask")}), m)
    graphdef, params, buffers = nnx.split(model.moe_layers, nnx.Param, ...)
    storage = (_storage_specs(params), _storage_specs(buffers))
    before = cfg.num_moe_layers % (p * v)
    prologue = []  # (graphdef, states, is_moe): the layers that run before the pipeline
    if model.dense_layers is not None:
        dense_def, dense_state = nnx.split(model.dense_layers)
        prologue.append((dense_def, (dense_state,), False))
    if before:
        # one split of each stack, not two slices: its transpose is one concatenate of the two gradients, where
        # two slices' were zero pads added together (XLA kept their select masks live through the step)
        leaves, treedef = jax.tree.flatten((params, buffers))
        parts = [jnp.split(a, [before]) for a in leaves]
        prologue.append((graphdef, treedef.unflatten([a for a, _ in parts]), True))
        params, buffers = treedef.unflatten([b for _, b in parts])
    max_logits, counts, dropped = [], [], jnp.zeros((), jnp.int32)
    if prologue:
        x, (ml, c, dropped) = _run_prologue(prologue, x, side, cfg.unroll_layers)
        max_logits.append(ml)
        counts += [c] if c is not None else []

    def stage_fn(p_chunk: Any, b_chunk: Any, x: jax.Array, side: tuple) -> tuple[jax.Array, dict]:
        y, (ml, c, d) = scan_state(graphdef, (p_chunk, b_chunk), x, *side, remat=remat, unroll=cfg.unroll_layers)
        return y, {"max_attn_logits": ml, "expert_counts": c, "dropped_tokens": d}

    head_def, head_params, head_rest = nnx.split(model.head_modules(), nnx.Param, ...)

    def head_loss(hp: Any, y: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        norm, proj = nnx.merge(head_def, hp, head_rest)
        return token_loss(project_logits(proj, norm(y)), targets, loss_mask)

    def head_fn(hp: Any, y: jax.Array, data: dict) -> tuple[jax.Array, dict]:
        n, inputs = settings.head_chunks, (y, data["targets"], data["loss_mask"])
        if n == 1:
            loss, num_tokens = head_loss(hp, *inputs)
        else:  # (rows, seq, ...) -> (n, rows, seq/n, ...): the pieces keep the rows' sharding over the data ranks
            pieces = [jnp.moveaxis(a.reshape(a.shape[0], n, a.shape[1] // n, *a.shape[2:]), 1, 0) for a in inputs]

            def piece(acc: tuple, xs: list) -> tuple[tuple, None]:
                loss, num_tokens = jax.checkpoint(head_loss)(hp, *xs)
                return (acc[0] + loss, acc[1] + num_tokens), None

            zero = jnp.zeros((), jnp.float32)
            (loss, num_tokens), _ = jax.lax.scan(piece, (zero, zero), pieces)
        return loss, {"num_tokens": num_tokens}

    regroup_dtypes = None
    if settings.regroup_in_compute_dtype and settings.schedule == "1f1b":
        # the routed experts' kernels are only used cast to the rows' (compute) dtype (grouped_gemm)
        regroup_dtypes = jax.tree_util.tree_map_with_path(
            lambda path, _: cfg.compute_dtype if "experts" in _keys(path) else None, params)
    loss, aux = pipeline_loss(settings.build(), stage_fn, head_fn, params, buffers, head_params, x, side, data,
                              storage=storage, offload=cfg.remat_offload, regroup_dtypes=regroup_dtypes,
                              grad_shard_axis="dp" if settings.grad_sums_over_dp else None)
    out = {"num_tokens": aux["num_tokens"],
           "max_attn_logits": jnp.concatenate([*max_logits, aux["max_attn_logits"]], 0),
           "expert_counts": jnp.concatenate([*counts, aux["expert_counts"]], 0),
           "moe/dropped_tokens": dropped + aux["dropped_tokens"].sum()}
    if with_activity:
        out["pipeline/activity"] = aux["pipeline/activity"]
    return loss, out
