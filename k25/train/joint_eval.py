"""Held-out scores of the joint K2.5 stage per task and per column of the report's Table 1.

The report's early-fusion ablation (Table 1) scores vision knowledge, vision reasoning, OCR, text knowledge,
text reasoning and code. Here each column is a group of the embedded tasks (held-out split, one document per
row, the answer scored):

    vision_knowledge  shapes, digits        naming what is shown (object kinds/colours, handwritten digits)
    vision_reasoning  counting, chart,      counting a colour among distractors, reading bar heights in
                      grounding             order, locating a named object's box
    ocr               ocr                   reading a rendered word
    text_knowledge    knowledge             held-out questions about facts stated only in declarative form
    text_reasoning    reasoning             digit arithmetic, max/min, sorting, boolean logic
    code              code                  the output of small straight-line Python programs

A document counts as correct when every answer token (and the closing eos) is the argmax given the true
prefix: exactly when greedy decoding reproduces the answer and stops, so one forward pass gives greedy
exact match. Token accuracy (the share of answer tokens predicted) is logged next to it, since exact match
is coarse at this scale.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from k25.data.vision.tasks import Sample

if TYPE_CHECKING:
    from k25.train.joint import JointData

TABLE1_COLUMNS: dict[str, tuple[str, ...]] = {
    "vision_knowledge": ("shapes", "digits"),
    "vision_reasoning": ("counting", "chart", "grounding"),
    "ocr": ("ocr",),
    "text_knowledge": ("knowledge",),
    "text_reasoning": ("reasoning",),
    "code": ("code",),
}


class HeldOutTasks:
    """`n` held-out documents of every configured task, scored in one jitted forward of the plain K25Model."""

    def __init__(self, data: JointData, n: int, seed: int):
        self.data, self.n, self.seed = data, n, seed
        self._batch: tuple[dict[str, np.ndarray], list[str]] | None = None
        self._run = None

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> HeldOutTasks:
        """The held-out documents of a k25-stage run config (its data, seq_len, vision merge and
        `eval_per_task`), without building the stage (no mesh, no model)."""
        from k25.data.tokenizer import ByteTokenizer
        from k25.model.vision_config import MoonViTConfig
        from k25.train.joint import JointData

        merge = MoonViTConfig.from_dict(config.vision.to_dict()).merge_area
        data = JointData(config.data, config.seq_len, ByteTokenizer(), merge)
        return cls(data, int(config.get("eval_per_task", 0)), config.seed)

    def rng(self, name: str, i: int) -> np.random.Generator:
        """The generator of held-out document `i` of task `name`: a pure function of the data config's seed."""
        return np.random.default_rng([self.data.cfg.seed, 2, zlib.crc32(name.encode()), i])

    def image_sample(self, name: str, i: int) -> Sample:
        """Held-out image `i` of task `name`, the one the stage scores (`k25.eval.tasks.vision_heldout` serves
        the same image, so a sampler's greedy decode of it can be checked against this teacher-forced score)."""
        return self.data.image_sample(self.rng(name, i), "eval", name)

    def batch(self) -> tuple[dict[str, np.ndarray], list[str]]:
        """(raw batch with one document per row, the task of each row); built once, a pure function of the
        data config's seed."""
        if self._batch is None:
            d, rows, tasks = self.data, [], []
            names = [*d.image_tasks, *(t.name for t in d.text_tasks)]
            for name in names:
                for i in range(self.n):
                    if name in d.image_tasks:
                        doc = d.sample_document(self.image_sample(name, i), answer_only=True)
                    else:
                        index = [t.name for t in d.text_tasks].index(name)
                        doc = (*d.text_document(self.rng(name, i), "eval", index), None)
                    rows.append(d.pack_row(lambda doc=doc: doc, max_docs=1))
                    tasks.append(name)
            self._batch = (d.stack(rows), tasks)
        return self._batch

    def __call__(self, model: nnx.Module) -> dict[str, Any]:
        """eval/<task>_exact, eval/<task>_token_acc and eval/table1/<column> (mean exact over its tasks)."""
        if not self.n:
            return {}
        raw, tasks = self.batch()
        graphdef, state = nnx.split(model)
        if self._run is None:
            def run(state: nnx.State) -> tuple[jax.Array, jax.Array]:
                m = nnx.merge(graphdef, state)
                embeds = m.embed(raw["input_ids"], raw.get("pixel_values"), raw.get("image_grid_thw"))
                logits = m.language_model(inputs_embeds=embeds, positions=raw["positions"],
                                          segment_ids=raw["segment_ids"]).logits
                mask = raw["loss_mask"] > 0
                hits = (jnp.argmax(logits, -1) == raw["targets"]) & mask
                return hits.sum(-1), mask.sum(-1)

            self._run = jax.jit(run)
        hits, counts = (np.asarray(a) for a in self._run(state))
        out: dict[str, Any] = {}
        task_arr = np.asarray(tasks)
        for name in dict.fromkeys(tasks):
            rows = task_arr == name
            out[f"eval/{name}_exact"] = float(np.mean(hits[rows] == counts[rows]))
            out[f"eval/{name}_token_acc"] = float(hits[rows].sum() / max(counts[rows].sum(), 1))
        for column, members in TABLE1_COLUMNS.items():
            present = [t for t in members if f"eval/{t}_exact" in out]
            if present:
                out[f"eval/table1/{column}"] = float(np.mean([out[f"eval/{t}_exact"] for t in present]))
                out[f"eval/table1/{column}_token_acc"] = float(np.mean([out[f"eval/{t}_token_acc"]
                                                                       for t in present]))
        return out
