"""Held-out evals of the ViT training stage: image->text retrieval R@1 and greedy caption exact match.

Retrieval pools held-out samples with pairwise distinct texts (round-robin over the tasks, images and videos
alike), so each image has exactly one correct text among `len(pool)` candidates and chance is 1/len(pool).
The CoCa model ranks texts by embedding similarity; a captioning-only model (K2.5 phases) ranks them by the
mean log-likelihood of each text given the image, the generative form of the same question.

Models are used through jitted functions of (params state, arrays); each eval pads its chunks to one size so
repeated evals reuse the compiled code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from k25.data.synthetic.text import exact_match
from k25.data.vision import Sample, VisionTextData
from k25.model.coca import encode_in_packs
from k25.train.generate import greedy_decode


def retrieval_pool(eval_samples: dict[str, list[Sample]], size: int) -> list[Sample]:
    """Up to `size` held-out samples with distinct texts, taken round-robin over the tasks."""
    pool: list[Sample] = []
    seen: set[str] = set()
    queues = [list(v) for v in eval_samples.values()]
    while len(pool) < size and any(queues):
        for q in queues:
            while q:
                s = q.pop(0)
                if s.text not in seen:
                    seen.add(s.text)
                    pool.append(s)
                    break
            if len(pool) == size:
                break
    return pool


def recall_at_1(scores: np.ndarray) -> float:
    """Fraction of rows (images) whose best-scoring column (text) is their own."""
    return float(np.mean(np.argmax(scores, axis=1) == np.arange(scores.shape[0])))


def by_shape(samples: Sequence[Sample]) -> list[list[int]]:
    """Indices of `samples` grouped by frame shape (images, videos): one static grid per group."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s.frames.shape, []).append(i)
    return list(groups.values())


def _chunked(fn: Callable[[np.ndarray], jax.Array], pixels: np.ndarray, chunk: int) -> np.ndarray:
    """fn over fixed-size chunks of the leading axis (the last one zero-padded), concatenated."""
    outs = []
    for start in range(0, len(pixels), chunk):
        part = pixels[start:start + chunk]
        padded = np.concatenate([part, np.zeros((chunk - len(part), *part.shape[1:]), part.dtype)])
        outs.append(np.asarray(fn(padded))[: len(part)])
    return np.concatenate(outs)


class Evaluator:
    """Retrieval and captioning evals for a CoCa (`kind="coca"`) or K2.5 (`kind="k25"`) model."""

    def __init__(self, data: VisionTextData, kind: str, pool_size: int, examples_per_task: int, pack_size: int,
                 max_patches_per_call: int = 4096):
        self.data, self.kind, self.pack_size = data, kind, pack_size
        self.pool = retrieval_pool(data.eval_samples, pool_size)
        self.caption_sets = {t: s[:examples_per_task] for t, s in data.eval_samples.items()}
        self.max_patches = max_patches_per_call
        self._jit: dict[str, Callable] = {}

    # ------------------------------------------------------------------------------------ vision tokens
    def _tokens_fn(self, graphdef: nnx.GraphDef) -> Callable:
        if "tokens" not in self._jit:
            def tokens(state, px):
                model = nnx.merge(graphdef, state)
                if self.kind == "coca":
                    return model.vision_tokens(px)
                return encode_in_packs(model.encode_media, px, self.pack_size)

            self._jit["tokens"] = jax.jit(tokens)
        return self._jit["tokens"]

    def vision_tokens(self, model: nnx.Module, samples: Sequence[Sample]) -> np.ndarray:
        """(n, tokens, D) for same-shaped samples: CoCa's vision tokens or K2.5's projected LLM tokens."""
        graphdef, state = nnx.split(model)
        pixels = np.stack([self.data.encode_pixels(s) for s in samples])
        chunk = max(self.pack_size, self.max_patches // int(np.prod(pixels.shape[1:4])) // self.pack_size
                    * self.pack_size)
        chunk = min(chunk, -(-len(samples) // self.pack_size) * self.pack_size)
        fn = self._tokens_fn(graphdef)
        return _chunked(lambda px: fn(state, px), pixels, chunk)

    # ------------------------------------------------------------------------------------------ metrics
    def retrieval_scores(self, model: nnx.Module) -> np.ndarray:
        """(n, n) image-by-text scores over the pool."""
        n = len(self.pool)
        texts = [self.data.encode_text(s) for s in self.pool]
        ids = jnp.asarray(np.stack([t["text_ids"] for t in texts]))
        mask = jnp.asarray(np.stack([t["text_mask"] for t in texts]))
        scores = np.zeros((n, n), np.float32)
        text_emb = model.text_embedding(ids, mask) if self.kind == "coca" else None
        for group in by_shape(self.pool):
            tokens = jnp.asarray(self.vision_tokens(model, [self.pool[i] for i in group]))
            if text_emb is not None:
                rows = jnp.dot(model.image_embedding(tokens), text_emb.T)
            else:
                rows = jnp.stack([self._text_loglik(model, tokens[k], ids, mask) for k in range(len(group))])
            scores[group] = np.asarray(rows)
        return scores

    def _text_loglik(self, model: nnx.Module, prefix: jnp.ndarray, ids: jnp.ndarray, mask: jnp.ndarray
                     ) -> jnp.ndarray:
        """Mean log p(text tokens after bos | image) of every candidate text, one image's LLM tokens as prefix."""
        if "loglik" not in self._jit:
            graphdef = nnx.graphdef(model)

            def loglik(state, prefix, ids, mask):
                lm = nnx.merge(graphdef, state).language_model
                n, p = ids.shape[0], prefix.shape[0]
                embeds = jnp.concatenate([jnp.broadcast_to(prefix, (n, *prefix.shape)), lm.embed(ids)], axis=1)
                logp = jax.nn.log_softmax(lm(inputs_embeds=embeds).logits[:, p:-1])
                tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
                m = mask[:, 1:].astype(jnp.float32)
                return jnp.sum(tok * m, 1) / jnp.maximum(jnp.sum(m, 1), 1.0)

            self._jit["loglik"] = jax.jit(loglik)
        return self._jit["loglik"](nnx.state(model), prefix, ids, mask)

    def captions(self, model: nnx.Module, samples: Sequence[Sample]) -> list[str]:
        """Greedy continuations of bos + prompt, conditioned on each sample's vision tokens."""
        tok = self.data.tokenizer
        out: list[str] = [""] * len(samples)
        graphdef, state = nnx.split(model)
        for group in by_shape(samples):
            prompts = [self.data.prompt_ids(samples[i]) for i in group]
            tokens = jnp.asarray(self.vision_tokens(model, [samples[i] for i in group]))
            max_new = self.data.cfg.text_len - max(len(p) for p in prompts)

            def logits_fn(ids, tokens=tokens):
                m = nnx.merge(graphdef, state)
                if self.kind == "coca":
                    return m.caption_logits(tokens, ids)
                lm = m.language_model
                embeds = jnp.concatenate([tokens.astype(jnp.float32), lm.embed(ids).astype(jnp.float32)], axis=1)
                return lm(inputs_embeds=embeds).logits[:, tokens.shape[1]:]

            preds = greedy_decode(logits_fn, prompts, max_new, tok.pad_id, tok.eos_id)
            for i, p in zip(group, preds):
                out[i] = tok.decode(p)
        return out

    def __call__(self, model: nnx.Module) -> dict[str, float]:
        metrics = {"eval/retrieval_r1": recall_at_1(self.retrieval_scores(model)),
                   "eval/retrieval_candidates": float(len(self.pool))}
        per_task = []
        for task, samples in self.caption_sets.items():
            preds = self.captions(model, samples)
            metrics[f"eval/{task}_exact"] = float(np.mean([exact_match(p, s.answer) for p, s in zip(preds, samples)]))
            per_task.append(metrics[f"eval/{task}_exact"])
        metrics["eval/caption_exact"] = float(np.mean(per_task))
        return metrics
