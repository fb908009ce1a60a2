"""Small pre-LN transformer text towers for CoCa-style ViT training: a bidirectional text encoder (the
contrastive tower) and a causal captioning decoder that cross-attends to vision tokens.

They exist only to train MoonViT (report §4.3, "ViT Training Stage"); the K2 decoder is the language model
of the K2.5 model proper. Parameters carry logical axes like the rest of k25: txt_layers for the stack
(kept off `layers`, which the mesh maps to pipeline stages of the K2 decoder), embed, vocab, mlp, norm.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from k25.model.decoder import scan_layers
from k25.model.layers import param
from k25.model.moonvit import DenseBias, LayerNorm


@dataclasses.dataclass(frozen=True)
class TextTowerConfig:
    """Width, depth and vocabulary shared by the text encoder and the captioning decoder."""

    vocab_size: int = 264  # the byte tokenizer's
    max_len: int = 48  # learned positions
    hidden_size: int = 96
    num_heads: int = 4
    mlp_dim: int = 256
    encoder_layers: int = 2
    decoder_layers: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"
    param_dtype: str = "float32"

    def validate(self) -> TextTowerConfig:
        for name in ("vocab_size", "max_len", "hidden_size", "num_heads", "mlp_dim", "encoder_layers",
                     "decoder_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TextTowerConfig: {name}={getattr(self, name)} must be positive.")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"TextTowerConfig: hidden_size={self.hidden_size} must be divisible by "
                             f"num_heads={self.num_heads}.")
        return self

    def kw(self, rngs: nnx.Rngs) -> dict:
        return {"dtype": jnp.dtype(self.dtype), "param_dtype": jnp.dtype(self.param_dtype),
                "std": self.initializer_range, "rngs": rngs}

    def norm(self, dim: int, rngs: nnx.Rngs) -> LayerNorm:
        return LayerNorm(dim, eps=self.layer_norm_eps, dtype=jnp.dtype(self.dtype),
                         param_dtype=jnp.dtype(self.param_dtype), rngs=rngs)


class Attention(nnx.Module):
    """Multi-head attention of queries x (b, s, d) over keys/values from `kv` (b, m, d_kv)."""

    def __init__(self, cfg: TextTowerConfig, kv_dim: int, *, rngs: nnx.Rngs):
        d, kw = cfg.hidden_size, cfg.kw(rngs)
        self.q_proj = DenseBias(d, d, ("embed", "heads_q"), **kw)
        self.k_proj = DenseBias(kv_dim, d, (None, "heads_q"), **kw)
        self.v_proj = DenseBias(kv_dim, d, (None, "heads_q"), **kw)
        self.o_proj = DenseBias(d, d, ("heads_q", "embed"), **kw)
        self.num_heads = cfg.num_heads

    def __call__(self, x: jnp.ndarray, kv: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
        """mask (b, 1, s, m) bool, True where a query may attend to a key."""
        b, s, d = x.shape
        heads = lambda t: t.reshape(t.shape[0], t.shape[1], self.num_heads, d // self.num_heads)
        out = jax.nn.dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(kv)), heads(self.v_proj(kv)),
                                           mask=mask)
        return self.o_proj(out.reshape(b, s, d))


class Block(nnx.Module):
    """Pre-LN: self-attention, then (decoder only) cross-attention to the vision tokens, then a GELU MLP."""

    def __init__(self, cfg: TextTowerConfig, cross_dim: int | None, *, rngs: nnx.Rngs):
        kw = cfg.kw(rngs)
        self.norm1 = cfg.norm(cfg.hidden_size, rngs)
        self.attn = Attention(cfg, cfg.hidden_size, rngs=rngs)
        self.cross_norm = cfg.norm(cfg.hidden_size, rngs) if cross_dim else None
        self.cross = Attention(cfg, cross_dim, rngs=rngs) if cross_dim else None
        self.norm2 = cfg.norm(cfg.hidden_size, rngs)
        self.fc1 = DenseBias(cfg.hidden_size, cfg.mlp_dim, ("embed", "mlp"), **kw)
        self.fc2 = DenseBias(cfg.mlp_dim, cfg.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x, mask, memory=None, memory_mask=None):
        h = self.norm1(x)
        x = x + self.attn(h, h, mask)
        if self.cross is not None:
            x = x + self.cross(self.cross_norm(x), memory, memory_mask)
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=True)), None


def _stack(cfg: TextTowerConfig, n: int, cross_dim: int | None, rngs: nnx.Rngs) -> Block:
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "txt_layers"})
    def create(r: nnx.Rngs) -> Block:
        return Block(cfg, cross_dim, rngs=r)

    return create(rngs)


class _Embedding(nnx.Module):
    """Token table plus learned absolute positions."""

    def __init__(self, cfg: TextTowerConfig, rngs: nnx.Rngs):
        self.token_embedding = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                                     jnp.dtype(cfg.param_dtype), cfg.initializer_range)
        self.position_embedding = param(rngs, (cfg.max_len, cfg.hidden_size), (None, "embed"),
                                        jnp.dtype(cfg.param_dtype), cfg.initializer_range)
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, ids: jnp.ndarray) -> jnp.ndarray:
        if ids.shape[1] > self.position_embedding.shape[0]:
            raise ValueError(f"text of {ids.shape[1]} tokens exceeds the tower's max_len="
                             f"{self.position_embedding.shape[0]}.")
        x = jnp.take(self.token_embedding[...], ids, axis=0) + self.position_embedding[: ids.shape[1]]
        return x.astype(self.dtype)


class TextEncoder(nnx.Module):
    """Bidirectional over the real tokens; the output is the masked mean of the final states, projected."""

    def __init__(self, cfg: TextTowerConfig, out_dim: int, *, rngs: nnx.Rngs):
        cfg.validate()
        self.embed = _Embedding(cfg, rngs)
        self.layers = _stack(cfg, cfg.encoder_layers, None, rngs)
        self.final_norm = cfg.norm(cfg.hidden_size, rngs)
        self.head = DenseBias(cfg.hidden_size, out_dim, ("embed", None), **cfg.kw(rngs))

    def __call__(self, ids: jnp.ndarray, text_mask: jnp.ndarray) -> jnp.ndarray:
        """ids, text_mask (b, s) -> (b, out_dim) unnormalised."""
        valid = text_mask.astype(bool)
        mask = (valid[:, None, :, None] & valid[:, None, None, :]) | jnp.eye(ids.shape[1], dtype=bool)
        h, _ = scan_layers(self.layers, self.embed(ids), mask)
        h = self.final_norm(h).astype(jnp.float32)
        w = valid.astype(jnp.float32)[..., None]
        return self.head(jnp.sum(h * w, 1) / jnp.maximum(jnp.sum(w, 1), 1.0))


class TextDecoder(nnx.Module):
    """Causal captioner conditioned on vision tokens by cross-attention; logits tied to the token table."""

    def __init__(self, cfg: TextTowerConfig, memory_dim: int, *, rngs: nnx.Rngs):
        cfg.validate()
        self.embed = _Embedding(cfg, rngs)
        self.layers = _stack(cfg, cfg.decoder_layers, memory_dim, rngs)
        self.final_norm = cfg.norm(cfg.hidden_size, rngs)

    def __call__(self, ids: jnp.ndarray, memory: jnp.ndarray) -> jnp.ndarray:
        """ids (b, s), memory (b, m, memory_dim) -> logits (b, s, vocab) float32."""
        b, s = ids.shape
        causal = jnp.tril(jnp.ones((s, s), bool))[None, None]
        memory_mask = jnp.ones((b, 1, s, memory.shape[1]), bool)
        h, _ = scan_layers(self.layers, self.embed(ids), causal, memory, memory_mask)
        h = self.final_norm(h)
        return jnp.dot(h, self.embed.token_embedding[...].T.astype(h.dtype)).astype(jnp.float32)
