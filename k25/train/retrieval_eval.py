"""Long-context retrieval evals of a text LM: passkey accuracy over a depth x length grid, and multi-key retrieval.

Every probe of length n has exactly n tokens (k25.data.synthetic.retrieval), so one length is one batch shape.
A probe counts as retrieved when every answer digit and the closing eos are the argmax given the true prefix,
which is exactly when greedy decoding reproduces the key and stops; that needs one forward pass per probe
instead of a decoding loop over an n-token prefix. Probes run `batch` at a time, so the longest length's
activations stay bounded (with the model's `attention_chunk` bounding its attention scores).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from k25.data.synthetic.retrieval import RetrievalTask
from k25.data.tokenizer import Tokenizer


def default_retrieval_eval_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        lengths=[128, 256, 512, 1024],  # context lengths n (tokens) of eval/retrieval_at_<n>
        depths=[0.0, 0.25, 0.5, 0.75, 1.0],  # where the queried needle sits in the haystack
        per_cell=8,  # probes per (length, depth) cell; multi-key: per_cell x len(depths) probes per length
        multi_keys=3,  # needles per multi-key probe (one queried, the rest distractors)
        batch=8,  # probes per forward pass
        seed=1,
    ))


def depth_key(depth: float) -> str:
    return f"{round(100 * depth):d}"


class RetrievalEval:
    """eval/retrieval_at_<n> (single needle, mean over depths), eval/retrieval_at_<n>/depth_<pct> and
    eval/multikey_at_<n> for every configured length n."""

    def __init__(self, cfg: ml_collections.ConfigDict, tokenizer: Tokenizer):
        self.cfg, self.tok = cfg, tokenizer
        self.task = RetrievalTask(seed=int(cfg.seed), min_len=RetrievalTask.min_length(1),
                                  max_len=max(RetrievalTask.min_length(int(cfg.multi_keys)), min(cfg.lengths)))
        for n in cfg.lengths:
            if n < RetrievalTask.min_length(int(cfg.multi_keys)):
                raise ValueError(f"config.retrieval_eval.lengths: {n} is shorter than a {cfg.multi_keys}-key probe "
                                 f"({RetrievalTask.min_length(int(cfg.multi_keys))} tokens).")
        self._probes: dict[int, tuple[np.ndarray, np.ndarray, list[str]]] = {}
        self._forward = None

    def probes(self, n: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(token ids (p, n), answer-and-eos mask over targets (p, n - 1), the cell of each probe)."""
        if n not in self._probes:
            rows, cells = [], []
            for depth in self.cfg.depths:
                for i in range(int(self.cfg.per_cell)):
                    rows.append(self.task.probe(n, float(depth), 1, i))
                    cells.append(f"depth_{depth_key(depth)}")
            for depth in self.cfg.depths:
                for i in range(int(self.cfg.per_cell)):
                    rows.append(self.task.probe(n, float(depth), int(self.cfg.multi_keys), i))
                    cells.append("multikey")
            ids = np.asarray([[self.tok.bos_id, *self.tok.encode(r["prompt"] + r["answer"]), self.tok.eos_id]
                              for r in rows], np.int32)
            if ids.shape[1] != n:
                raise AssertionError(f"retrieval probes have {ids.shape[1]} tokens, expected {n}")
            answer = np.zeros((len(rows), n - 1), bool)
            answer[:, n - 2 - len(rows[0]["answer"]):] = True  # targets of the answer digits and the eos
            self._probes[n] = (ids, answer, cells)
        return self._probes[n]

    def __call__(self, model: nnx.Module) -> dict[str, Any]:
        graphdef, state = nnx.split(model)
        if self._forward is None:
            def forward(state: nnx.State, ids: jax.Array) -> jax.Array:
                b, n = ids.shape
                positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
                logits = nnx.merge(graphdef, state)(ids, positions=positions,
                                                    segment_ids=jnp.ones((b, n), jnp.int32)).logits
                return jnp.argmax(logits[:, :-1], -1) == ids[:, 1:]

            self._forward = jax.jit(forward)
        out: dict[str, Any] = {}
        bsz = int(self.cfg.batch)
        for n in self.cfg.lengths:
            ids, answer, cells = self.probes(int(n))
            correct = []
            for start in range(0, len(ids), bsz):
                part = ids[start:start + bsz]
                pad = bsz - len(part)
                if pad:  # keep one batch shape per length
                    part = np.concatenate([part, np.repeat(part[-1:], pad, 0)])
                hit = np.asarray(self._forward(state, part))[:bsz - pad]
                correct.append(np.all(hit | ~answer[start:start + bsz], axis=1))
            ok, cells_arr = np.concatenate(correct), np.asarray(cells)
            single = np.char.startswith(cells_arr, "depth_")
            out[f"eval/retrieval_at_{n}"] = float(ok[single].mean())
            for cell in dict.fromkeys(cells):
                if cell.startswith("depth_"):
                    out[f"eval/retrieval_at_{n}/{cell}"] = float(ok[cells_arr == cell].mean())
            out[f"eval/multikey_at_{n}"] = float(ok[cells_arr == "multikey"].mean())
        return out
