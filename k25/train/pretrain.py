"""Text language-model pre-training of the K2 decoder on packed documents (the `lm` stage)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from k25.data.pipeline import make_eval_examples, make_train_iterator
from k25.data.synthetic import TASKS
from k25.data.tokenizer import load_tokenizer
from k25.model.config import K2Config
from k25.model.decoder import K2Model
from k25.model.params import count_params
from k25.parallel.vocab import cross_entropy
from k25.train.generate import greedy_decode
from k25.train.init_from import copy_into, latest_params
from k25.train.pipelined_lm import pipeline_settings, pipelined_decoder_loss
from k25.train.retrieval_eval import RetrievalEval
from k25.train.step import StepConfig


def model_config(config: ml_collections.ConfigDict) -> K2Config:
    """K2Config from `config.model`, with errors that name the `config.model.*` field."""
    try:
        return K2Config.from_dict(config.model.to_dict())
    except ValueError as e:
        raise ValueError(f"config.model: {e}") from None


def token_loss_sum(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed next-token cross-entropy over `loss_mask`, number of loss tokens)."""
    ce = cross_entropy(logits, targets)  # optax's formula; also vocab-parallel for vocab-sharded logits
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(ce * mask), jnp.sum(mask)


def lm_loss(model: nnx.Module, batch: dict) -> tuple[jax.Array, dict]:
    """Summed next-token cross-entropy over `loss_mask`; documents never attend across segments."""
    out = model(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    loss, num_tokens = token_loss_sum(out.logits, batch["targets"], batch["loss_mask"])
    return loss, {"num_tokens": num_tokens, "max_attn_logits": out.max_attn_logits,
                  "expert_counts": out.expert_counts, "moe/dropped_tokens": out.dropped_tokens}


class TextLMStage:
    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.model_cfg = model_config(config)
        self.tokenizer = load_tokenizer(config.data.tokenizer)
        if self.tokenizer.vocab_size > self.model_cfg.vocab_size:
            raise ValueError(f"config.model.vocab_size={self.model_cfg.vocab_size} is smaller than the tokenizer's "
                             f"vocabulary ({self.tokenizer.vocab_size}); raise config.model.vocab_size.")
        self.pipeline = pipeline_settings(config, self.model_cfg)
        # Long-context runs: passkey / multi-key retrieval evals, and phases chained by `init_from`
        self.retrieval = RetrievalEval(config.retrieval_eval, self.tokenizer) if config.get("retrieval_eval") else None
        self.init_params = latest_params(config.get("init_from", ""), "config.init_from")

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """A fresh K2Model, or (with `config.init_from`, a finished run's workdir) that run's latest weights,
        e.g. to continue a text model with another sequence length or RoPE scaling (the rope tables are not
        weights, so YaRN applies to the loaded model unchanged)."""
        model = K2Model(self.model_cfg, rngs=rngs)
        if self.init_params:
            copy_into(model, self.init_params, "config.init_from")
        return model

    def param_counts(self) -> dict[str, int]:
        return count_params(self.model_cfg)

    def loss_fn(self, model, batch):
        """The whole model at once, or through the pipeline when mesh.pp > 1 or pipeline.microbatches > 1."""
        if self.pipeline.enabled:
            return pipelined_decoder_loss(model, batch, self.pipeline, token_loss_sum)
        return lm_loss(model, batch)

    def step_config(self) -> StepConfig:
        c = self.config
        return StepConfig(accum_steps=c.optim.accum_steps, qk_clip_tau=c.optim.qk_clip_tau,
                          bias_update_rate=self.model_cfg.bias_update_rate, text_cfg=self.model_cfg)

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        shape = (batch_size, self.config.seq_len)
        return {k: jax.ShapeDtypeStruct(shape, jnp.int32)
                for k in ("input_ids", "targets", "segment_ids", "positions", "loss_mask")}

    def train_iterator(self, seed: int, process_index: int, process_count: int) -> Iterator[dict]:
        c = self.config
        return make_train_iterator(c.data, seed=seed, batch_size=c.batch_size // process_count, seq_len=c.seq_len,
                                   tokenizer=self.tokenizer, process_index=process_index,
                                   process_count=process_count)

    def evaluate(self, model: nnx.Module) -> dict[str, Any]:
        """Greedy exact match per held-out synthetic task, plus the mean."""
        c = self.config
        tok = self.tokenizer
        sets = make_eval_examples(c.data, tok, c.eval_examples)
        graphdef, state = nnx.split(model)

        def logits_fn(ids):
            return nnx.merge(graphdef, state)(ids).logits

        metrics: dict[str, Any] = {}
        for task, examples in sets.items():
            preds = greedy_decode(logits_fn, [e["prompt_ids"] for e in examples], c.eval_max_new_tokens,
                                  tok.pad_id, tok.eos_id)
            score = TASKS[task].score
            hits = [score(tok.decode(p), e) for p, e in zip(preds, examples)]
            metrics[f"eval/{task}_exact"] = float(np.mean(hits))
        if sets:
            metrics["eval/mean_exact"] = float(np.mean([metrics[f"eval/{t}_exact"] for t in sets]))
        if self.retrieval is not None:
            metrics.update(self.retrieval(model))
        return metrics
