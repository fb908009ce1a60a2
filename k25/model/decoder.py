"""The K2 decoder: embeddings, `first_k_dense_replace` dense layers, MoE layers, final norm, LM head.

Layers of each kind are stored stacked along a leading `layers` axis and run with
`jax.lax.scan`, so compile time does not grow with depth and the pipeline can slice stages
out of the stack.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from k25.model.config import K2Config
from k25.model.layers import Embed, Linear, RMSNorm, SwiGLU
from k25.model.mla import MLA, attention_mask
from k25.model.moe import MoE
from k25.model.remat import remat_wrapper
from k25.model.rope import rope_cos_sin
from k25.parallel import vocab as vocab_parallel
from k25.parallel.mesh import VOCAB_SHARD


@struct.dataclass
class DecoderOutput:
    logits: jnp.ndarray  # (batch, seq, vocab) float32
    max_attn_logits: jnp.ndarray  # (num_hidden_layers, heads): max pre-softmax logit, for QK-Clip
    expert_counts: jnp.ndarray  # (num_moe_layers, n_routed_experts): assignments per expert this pass
    # routed assignments dropped by the expert-parallel exchange's capacity (ep_capacity_factor), all layers
    dropped_tokens: jnp.ndarray | None = None


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)); x + ffn(norm(x)), ffn dense SwiGLU or MoE."""

    def __init__(self, cfg: K2Config, *, moe: bool, rngs: nnx.Rngs):
        nkw = dict(eps=cfg.rms_norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **nkw)
        self.self_attn = MLA(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **nkw)
        self.is_moe = moe
        if moe:
            self.mlp = MoE(cfg, rngs=rngs)
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, dtype=cfg.compute_dtype,
                              param_dtype=cfg.weight_dtype, std=cfg.initializer_range, rngs=rngs)

    def __call__(self, x, cos, sin, mask):
        attn, max_logit = self.self_attn(self.input_layernorm(x), cos, sin, mask)
        x = x + attn
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            ffn, counts, dropped = self.mlp.forward(h)
        else:
            ffn, counts, dropped = self.mlp(h), jnp.zeros((0,), jnp.float32), jnp.zeros((), jnp.int32)
        return x + ffn, (max_logit, counts, dropped)


def stacked(n: int, make: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module:
    """n independently initialised copies of a module, parameters stacked on a leading `layers` axis."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(r: nnx.Rngs) -> nnx.Module:
        return make(r)

    return create(rngs)


def scan_layers(stack: nnx.Module, x: jnp.ndarray, *args, remat: Callable | None = None, unroll: bool = False):
    """Run a stacked module layer by layer with lax.scan; returns (x, stacked per-layer aux)."""
    graphdef, state = nnx.split(stack)
    return scan_state(graphdef, (state,), x, *args, remat=remat, unroll=unroll)


def scan_state(graphdef: nnx.GraphDef, states: tuple[Any, ...], x: jnp.ndarray, *args,
               remat: Callable | None = None, unroll: bool = False):
    """`scan_layers` on a split stack (`nnx.merge(graphdef, *states)`); the states may hold any slice of the
    layers, which is how the pipeline runs its chunks (k25/train/pipelined_lm.py) with the same code.

    `unroll` (`K2Config.unroll_layers`) unrolls the scan: the stacked residuals the scan writes in the
    forward and slices in the backward become plain buffers (the moe_25m CPU step: 7.5 -> 6.9 s), at a
    compile time that grows with depth."""

    def body(h, layer_states):
        return nnx.merge(graphdef, *layer_states)(h, *args)

    if remat is not None:
        body = remat(body)
    return jax.lax.scan(body, x, states, unroll=unroll)


class K2Model(nnx.Module):
    def __init__(self, cfg: K2Config, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, std=cfg.initializer_range, rngs=rngs)
        vocab_axis = VOCAB_SHARD if cfg.shard_vocab else "vocab"
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, vocab_axis=vocab_axis, **kw)
        self.dense_layers = (stacked(cfg.first_k_dense_replace, lambda r: DecoderLayer(cfg, moe=False, rngs=r), rngs)
                             if cfg.first_k_dense_replace else None)
        self.moe_layers = (stacked(cfg.num_moe_layers, lambda r: DecoderLayer(cfg, moe=True, rngs=r), rngs)
                           if cfg.num_moe_layers else None)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=cfg.compute_dtype,
                            param_dtype=cfg.weight_dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, ("embed", vocab_axis), **kw)

    def embed(self, input_ids: jnp.ndarray) -> jnp.ndarray:
        return self.embed_tokens(input_ids)

    def inputs(self, input_ids: jnp.ndarray | None = None, *, inputs_embeds: jnp.ndarray | None = None,
               positions: jnp.ndarray | None = None, segment_ids: jnp.ndarray | None = None
               ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """What the layers consume: (hidden (b, s, d), rope cos, rope sin, attention mask (b, 1, s, s))."""
        cfg = self.cfg
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(cfg.compute_dtype)
        b, s = h.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        if segment_ids is None:
            segment_ids = jnp.ones((b, s), jnp.int32)
        cos, sin = rope_cos_sin(positions, cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
        return h, cos, sin, attention_mask(segment_ids)

    def __call__(self, input_ids: jnp.ndarray | None = None, *, inputs_embeds: jnp.ndarray | None = None,
                 positions: jnp.ndarray | None = None, segment_ids: jnp.ndarray | None = None) -> DecoderOutput:
        """input_ids (b, s) int32 (or inputs_embeds (b, s, d)); positions/segment_ids (b, s) for packed rows."""
        cfg = self.cfg
        h, cos, sin, mask = self.inputs(input_ids, inputs_embeds=inputs_embeds, positions=positions,
                                        segment_ids=segment_ids)
        remat = remat_wrapper(cfg.remat, cfg.remat_offload, cfg.fp8_activations)
        max_logits, counts = [], jnp.zeros((0, cfg.n_routed_experts), jnp.float32)
        dropped = jnp.zeros((), jnp.int32)
        if self.dense_layers is not None:
            h, (ml, _, _) = scan_layers(self.dense_layers, h, cos, sin, mask, remat=remat, unroll=cfg.unroll_layers)
            max_logits.append(ml)
        if self.moe_layers is not None:
            h, (ml, counts, drops) = scan_layers(self.moe_layers, h, cos, sin, mask, remat=remat,
                                                 unroll=cfg.unroll_layers)
            max_logits.append(ml)
            dropped = drops.sum()
        return DecoderOutput(logits=self.logits(self.norm(h)), max_attn_logits=jnp.concatenate(max_logits, 0),
                             expert_counts=counts, dropped_tokens=dropped)

    def head_modules(self) -> tuple[RMSNorm, Embed | Linear]:
        """The final norm and the output projection (the embedding table when tied): the loss head."""
        return self.norm, self.embed_tokens if self.cfg.tie_word_embeddings else self.lm_head

    def logits(self, h: jnp.ndarray) -> jnp.ndarray:
        return project_logits(self.head_modules()[1], h)


def project_logits(proj: Embed | Linear, h: jnp.ndarray) -> jnp.ndarray:
    """float32 logits from normed hidden states through the LM head (or the tied embedding table); a
    vocab-sharded head gives vocab-sharded logits (k25.parallel.vocab.project)."""
    if isinstance(proj, Embed):
        return proj.attend(h).astype(jnp.float32)
    if vocab_parallel.is_sharded(proj.kernel):
        return vocab_parallel.project(h, proj.kernel[...], proj.dtype)
    return proj(h).astype(jnp.float32)
