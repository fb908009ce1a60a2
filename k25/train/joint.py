"""Joint multimodal training of K2.5 (the `k25` stage): MoonViT-3D + projector + K2 decoder on interleaved rows.

This is the stage that makes `config.dep` reachable from the runner. Each row packs documents; an image
document is `bos, <|media|> x tokens, prompt, answer, eos` (the byte tokenizer's media placeholder, one per
merged LLM token of the image) and a text document is a synthetic text example from `k25.data.synthetic`.
Images come in several sizes (`config.data.image_sizes`, 28-pixel steps, i.e. 1 to 16 LLM tokens each),
so rows carry very different vision loads and balancing the encoder over devices matters.

The host side of every batch runs `k25.train.multimodal.prepare_batch` inside the data iterator (grain's
read threads, so the planning overlaps the step): with `config.dep` the image chunks are balanced by patch
count over every device of the mesh, without it each goes to the device that owns its row. The step's loss
is `k25.parallel.dep.step_loss_fn`, so the runtime's own `value_and_grad`, accumulation, QK-Clip and
expert-bias balancing are used unchanged, and the two settings give the same numbers.

Shapes are static: the per-device patch and token budgets are worst-case bounds derived from the data
config (`vision_budgets`), so the step compiles once whichever images a batch holds.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from k25.data.mixture import VisionSchedule
from k25.data.packing import encode_record
from k25.data.preprocess import preprocess_images
from k25.data.synthetic import make_task
from k25.data.tokenizer import ByteTokenizer
from k25.data.vision.tasks import IMAGE_TASKS, Sample, digit_indices
from k25.model.config import K2Config
from k25.model.k25 import K25Model
from k25.model.vision_config import K25Config, MoonViTConfig
from k25.parallel.dep import reference_loss_fn, step_loss_fn
from k25.parallel.mesh import make_mesh
from k25.train.init_from import copy_into, latest_params
from k25.train.joint_eval import HeldOutTasks
from k25.train.multimodal import dep_enabled, multimodal_lm_loss, prepare_batch
from k25.train.step import StepConfig

SPLITS = {"train": 0, "eval": 1}
MAX_BATCHES = 2**40  # "endless": far more batches than any run takes
ROW_KEYS = ("input_ids", "targets", "loss_mask", "positions", "segment_ids")
# (tokens, is_target, (pixel_values, grid_thw) of its image or None)
Document = tuple[np.ndarray, np.ndarray, tuple[np.ndarray, tuple[int, int, int]] | None]


def default_joint_data_config() -> ml_collections.ConfigDict:
    """The embedded image tasks at several sizes, interleaved with the synthetic text tasks."""
    return ml_collections.ConfigDict(dict(
        seed=0,  # fixes every sample, independently of the run's seed
        image_sizes=[28, 56, 84, 112],  # square image sides (multiples of 28): 1, 4, 9, 16 LLM tokens
        image_tasks={"shapes": 1.0, "grounding": 1.0, "counting": 1.0, "ocr": 1.0, "chart": 1.0, "digits": 1.0},
        text_tasks=["knowledge", "reasoning", "code"],  # synthetic text documents (k25.data.synthetic)
        text_rows=1,  # rows per global batch holding only text (the last ones); the rest interleave images
        max_media_tokens_per_row=24,  # caps a row's vision load; also bounds the static budgets
        read_threads=2,  # batches (generation + DEP planning) assembled ahead by grain's read threads
        # The vision schedule (k25.data.mixture.VisionSchedule): vision_ratio > 0 replaces the fixed
        # `text_rows` layout (set text_rows=0) with no vision before inject_at x total_steps and a
        # vision_ratio share of the rows after it.
        vision_ratio=0.0,
        inject_at=0.0,  # fraction of the run (in steps) before vision data starts
    ))


class JointData:
    """Seeded image-text and text documents packed into rows, and the raw multimodal batches they form.

    A batch is a pure function of (data config, run seed, split, batch index), so grain's random-access
    dataset over batch indices resumes exactly from a checkpointed index.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, seq_len: int, tokenizer: ByteTokenizer, merge_area: int):
        self.cfg, self.seq_len, self.tok, self.merge_area = cfg, seq_len, tokenizer, merge_area
        sizes = [int(s) for s in cfg.image_sizes]
        if not sizes or any(s <= 0 or s % 28 for s in sizes):
            raise ValueError(f"config.data.image_sizes={sizes} must be positive multiples of 28 (merged 2x2 "
                             "patches of 14 pixels), so no image is padded.")
        self.sizes = sizes
        unknown = sorted(set(cfg.image_tasks) - set(IMAGE_TASKS))
        if unknown or not cfg.image_tasks:
            raise ValueError(f"config.data.image_tasks has unknown task(s) {unknown}; choose from "
                             f"{sorted(IMAGE_TASKS)}.")
        self.image_tasks = sorted(cfg.image_tasks)
        weights = np.asarray([cfg.image_tasks[t] for t in self.image_tasks], np.float64)
        if np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"config.data.image_tasks weights must be >= 0 with a positive sum, got "
                             f"{dict(cfg.image_tasks)}.")
        self.image_probs = weights / weights.sum()
        self.text_tasks = [make_task(t) for t in cfg.text_tasks]
        if cfg.text_rows and not self.text_tasks:
            raise ValueError("config.data.text_rows > 0 needs at least one config.data.text_tasks entry.")
        self.digit_pool = {s: digit_indices(s, 0.2, cfg.seed) for s in SPLITS}
        biggest = max(self.media_tokens(s) for s in sizes)
        if biggest > cfg.max_media_tokens_per_row:
            raise ValueError(f"config.data.max_media_tokens_per_row={cfg.max_media_tokens_per_row} is below the "
                             f"{biggest} tokens of a {max(sizes)}-pixel image; raise it or drop that size.")

    def media_tokens(self, size: int) -> int:
        """LLM tokens of a square image of `size` pixels: (size/14)^2 patches merged `merge_area` to one."""
        return (size // 14) ** 2 // self.merge_area

    # ---------------------------------------------------------------------------------------- documents
    def image_sample(self, rng: np.random.Generator, split: str, task: str | None = None) -> Sample:
        """One image of a drawn size (and task, unless `task` fixes it, as the evals do)."""
        size = self.sizes[int(rng.integers(len(self.sizes)))]
        if task is None:
            task = self.image_tasks[int(rng.choice(len(self.image_tasks), p=self.image_probs))]
        fn = IMAGE_TASKS[task]
        return fn(rng, size, self.digit_pool[split]) if task == "digits" else fn(rng, size)

    def image_document(self, rng: np.random.Generator, split: str, task: str | None = None, answer_only: bool = False
                       ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, tuple[int, int, int]]]:
        """(tokens, is_target, (pixel_values, grid_thw)) of one drawn image document (`sample_document`)."""
        return self.sample_document(self.image_sample(rng, split, task), answer_only)

    def sample_document(self, sample: Sample, answer_only: bool = False
                        ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, tuple[int, int, int]]]:
        """(tokens, is_target, (pixel_values, grid_thw)) of an image sample: bos, one placeholder per merged
        token, `prompt_text`, answer, eos. The caption is trained, the placeholders are not (their targets are
        media ids, never predicted); `answer_only` trains/scores only the answer and eos (held-out scoring)."""
        px = preprocess_images([sample.frames[0]])
        t, h, w = (int(v) for v in px["image_grid_thw"][0])
        n_media = h * w // self.merge_area
        prompt = self.tok.encode(prompt_text(sample))
        answer = [*self.tok.encode(sample.answer), self.tok.eos_id]
        tokens = [self.tok.bos_id, *[self.tok.media_id] * n_media, *prompt, *answer]
        is_target = [False] * (1 + n_media) + [not answer_only] * len(prompt) + [True] * len(answer)
        pixels = np.asarray(px["pixel_values"], np.float32).reshape(t * h * w, -1)
        return np.asarray(tokens, np.int32), np.asarray(is_target, bool), (pixels, (t, h, w))

    def text_document(self, rng: np.random.Generator, split: str, task: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, is_target) of one synthetic text example, encoded as the text pipeline does (loss on the
        answer); `task` (an index into `text_tasks`) fixes the task (evals)."""
        task = self.text_tasks[int(rng.integers(len(self.text_tasks))) if task is None else task]
        record = task.example(split, int(rng.integers(2**31)), stream=int(rng.integers(2**31)))
        doc = encode_record(record, self.tok, loss_on="answer")
        return doc["tokens"], doc["is_target"]

    # ----------------------------------------------------------------------------------------- rows
    def row(self, rng: np.random.Generator, split: str, text_only: bool
            ) -> tuple[dict[str, np.ndarray], list[tuple[np.ndarray, tuple[int, int, int]]]]:
        """One packed row (`k25.data.packing`'s layout) and the (pixels, grid) of its images, in order.

        Documents are drawn until the next one would overflow the row or its media-token cap; that one is
        dropped (deterministically), so the row's vision load varies with the drawn sizes.
        """
        def draw() -> Document:
            if text_only:
                return (*self.text_document(rng, split), None)
            return self.image_document(rng, split)

        return self.pack_row(draw)

    def pack_row(self, draw: Callable[[], Document], max_docs: int | None = None
                 ) -> tuple[dict[str, np.ndarray], list[tuple[np.ndarray, tuple[int, int, int]]]]:
        """Documents from `draw()` packed into one row until the next would overflow it (or `max_docs`)."""
        return pack_documents(draw, seq_len=self.seq_len, pad_id=self.tok.pad_id, media_id=self.tok.media_id,
                              max_media_tokens=int(self.cfg.max_media_tokens_per_row), max_docs=max_docs)

    def raw_batch(self, run_seed: int, split: str, index: int, batch_size: int,
                  vision_rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """A global batch in the HF processor layout: row arrays + pixel_values / image_grid_thw (row-major).

        `vision_rows` (batch_size,) bool says which rows hold images (the vision schedule); without it the
        last `config.data.text_rows` train rows are text and the rest images."""
        if vision_rows is None:
            text_rows = int(self.cfg.text_rows) if split == "train" else 0
            if not 0 <= text_rows < batch_size:
                raise ValueError(f"config.data.text_rows={text_rows} must be in [0, batch_size={batch_size}).")
            vision_rows = np.arange(batch_size) < batch_size - text_rows
        if vision_rows.shape != (batch_size,):
            raise ValueError(f"vision_rows has shape {vision_rows.shape}; one flag per row ({batch_size}) needed.")
        rows = []
        for r in range(batch_size):
            rng = np.random.default_rng([self.cfg.seed, SPLITS[split], run_seed, index, r])
            rows.append(self.row(rng, split, text_only=not vision_rows[r]))
        return self.stack(rows)

    def stack(self, rows: list[tuple[dict[str, np.ndarray], list[tuple[np.ndarray, tuple[int, int, int]]]]]
              ) -> dict[str, np.ndarray]:
        """Rows (and their images, in order) -> one batch in the HF processor layout."""
        return stack_rows(rows)


def prompt_text(sample: Sample) -> str:
    """The text between an image's placeholders and its answer in the stage's documents: the prompt and a
    space, or nothing (captioning tasks have no prompt). `vision_heldout` sends the same text."""
    return sample.prompt + " " if sample.prompt else ""


def pack_documents(draw: Callable[[], Document], *, seq_len: int, pad_id: int, media_id: int, max_media_tokens: int,
                   max_docs: int | None = None
                   ) -> tuple[dict[str, np.ndarray], list[tuple[np.ndarray, tuple[int, int, int]]]]:
    """Documents from `draw()` packed first-come into one row (`k25.data.packing`'s layout: per-document
    segments and positions, targets within a document) until the next would overflow the row or its
    `max_media_tokens` cap (that one is dropped, deterministically) or `max_docs` are in. Returns the row and
    the (pixels, grid) of its images in order. Shared by the joint and SFT stages."""
    s, pad = seq_len, pad_id
    out = {"input_ids": np.full(s, pad, np.int32), "targets": np.full(s, pad, np.int32),
           "loss_mask": np.zeros(s, np.int32), "positions": np.zeros(s, np.int32),
           "segment_ids": np.zeros(s, np.int32)}
    pixels: list[tuple[np.ndarray, tuple[int, int, int]]] = []
    used = media = 0
    for segment in range(1, (max_docs or s) + 1):
        tokens, is_target, px = draw()
        n, m = len(tokens), int((tokens == media_id).sum())
        if n > s:
            raise ValueError(f"a {n}-token document does not fit seq_len={s}; raise config.seq_len.")
        if used + n > s or media + m > max_media_tokens:
            break
        out["input_ids"][used:used + n] = tokens
        out["targets"][used:used + n - 1] = tokens[1:]
        out["loss_mask"][used:used + n - 1] = is_target[1:]
        out["positions"][used:used + n] = np.arange(n)
        out["segment_ids"][used:used + n] = segment
        if px is not None:
            pixels.append(px)
        used, media = used + n, media + m
    return out, pixels


def stack_rows(rows: list[tuple[dict[str, np.ndarray], list[tuple[np.ndarray, tuple[int, int, int]]]]]
               ) -> dict[str, np.ndarray]:
    """Rows (and their images, in order) -> one batch in the HF processor layout."""
    pixels = [px for _, pxs in rows for px in pxs]
    batch = {k: np.stack([row[k] for row, _ in rows]) for k in ROW_KEYS}
    if pixels:
        batch["pixel_values"] = np.concatenate([px for px, _ in pixels])
        batch["image_grid_thw"] = np.asarray([grid for _, grid in pixels], np.int64)
    return batch


def vision_budgets(config: ml_collections.ConfigDict, mesh: Mesh, merge_area: int, max_chunk_tokens: int
                   ) -> tuple[int, int]:
    """(patch_budget, token_budget) per device that hold any batch, with DEP or without.

    Without DEP a device encodes the rows it owns: at most (rows per device) x (media tokens per row). With
    DEP the greedy balance puts at most the mean plus one chunk on a device. The budget is the larger of the
    two so both settings compile the same shapes (the test compares them); `config.vision_token_budget` > 0
    overrides it (a ValueError from the planner names it when a batch does not fit).
    """
    if config.get("vision_token_budget", 0):
        tokens = int(config.vision_token_budget)
    else:
        per_row = int(config.data.max_media_tokens_per_row)
        rows_per_device = config.batch_size // (mesh.shape["dp"] * mesh.shape["ep"])
        tokens = max(rows_per_device * per_row,
                     math.ceil(config.batch_size * per_row / mesh.size) + max_chunk_tokens)
    return tokens * merge_area, tokens


class JointStage:
    """Stage "k25": K25Model trained with next-token CE on the text of interleaved image-text rows."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.tokenizer = ByteTokenizer()
        try:
            lm = K2Config.from_dict(config.lm.to_dict())
            vision = MoonViTConfig.from_dict(config.vision.to_dict())
        except ValueError as e:
            raise ValueError(f"config.lm / config.vision: {e}") from None
        if lm.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(f"config.lm.vocab_size={lm.vocab_size} is below the byte tokenizer's "
                             f"{self.tokenizer.vocab_size}.")
        self.k25_cfg = K25Config(text_config=lm, vision_config=vision, projection_hidden_size=vision.hidden_size,
                                 image_token_id=self.tokenizer.media_id,
                                 video_token_id=self.tokenizer.special_ids["<|reserved_0|>"]).validate()
        self.dep = dep_enabled(config)
        # The runtime builds the same mesh from the same config; the loss and the planner need it here.
        self.mesh = make_mesh(config.mesh)
        self.accum_steps = int(config.optim.accum_steps)
        if config.batch_size % (self.accum_steps * self.mesh.shape["dp"] * self.mesh.shape["ep"]):
            raise ValueError(f"config.batch_size={config.batch_size} must be divisible by accum_steps x dp x ep.")
        self.data = JointData(config.data, config.seq_len, self.tokenizer, vision.merge_area)
        biggest = max(self.data.media_tokens(s) for s in self.data.sizes)
        self.patch_budget, self.token_budget = vision_budgets(config, self.mesh, vision.merge_area, biggest)
        self.schedule = None
        if config.data.get("vision_ratio", 0.0):
            if config.data.text_rows:
                raise ValueError(f"config.data.text_rows={config.data.text_rows} must be 0 with the vision "
                                 "schedule (config.data.vision_ratio > 0 decides which rows hold text).")
            self.schedule = VisionSchedule.from_config(config.data.vision_ratio, config.data.get("inject_at", 0.0),
                                                       config.total_steps, config.batch_size)
        self._loss = step_loss_fn(functools.partial(multimodal_lm_loss, media_id=self.tokenizer.media_id),
                                  self.mesh, dep=self.dep)
        self.init_text = latest_params(config.get("init_text_from", ""), "config.init_text_from")
        self.task_eval = HeldOutTasks(self.data, int(config.get("eval_per_task", 0)), config.seed)

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """A fresh K25Model; with `config.init_text_from` (the workdir of an `lm` run with the same decoder
        config) its K2 decoder's latest checkpoint becomes the language model (start from a text model)."""
        model = K25Model(self.k25_cfg, rngs=rngs)
        if self.init_text:
            copy_into(model.language_model, self.init_text, "config.init_text_from")
        return model

    def loss_fn(self, model: nnx.Module, batch: dict) -> tuple[jax.Array, dict]:
        """DEP (custom_vjp: encoder forward, backbone value_and_grad, encoder recompute) or end to end."""
        return self._loss(model, batch)

    def step_config(self) -> StepConfig:
        c, lm = self.config, self.k25_cfg.text_config
        return StepConfig(accum_steps=self.accum_steps, qk_clip_tau=c.optim.qk_clip_tau,
                          bias_update_rate=lm.bias_update_rate, text_cfg=lm, text_path=("language_model",))

    def plan(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The step's host arrays for a raw global batch: text arrays, `media_src` and the `vision/*` plan."""
        batch, _ = prepare_batch(raw, self.k25_cfg, self.mesh, dep=self.dep, accum_steps=self.accum_steps,
                                 patch_budget=self.patch_budget, token_budget=self.token_budget)
        return batch

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes of a planned batch: fixed by the budgets, so an image-free batch gives them."""
        s = self.config.seq_len
        empty = {k: np.zeros((batch_size, s), np.int32) for k in ROW_KEYS}
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in self.plan(empty).items()}

    def train_iterator(self, seed: int, process_index: int, process_count: int) -> Iterator[dict]:
        """Planned global batches. The DEP plan balances over every device of the mesh, so it needs the
        whole batch: multi-process runs must read it everywhere (`config.host_data="replicate"`)."""
        if process_count > 1:
            raise ValueError("the k25 stage plans the vision encoder over the global batch; set "
                             "config.host_data='replicate' for multi-process runs.")
        bs = self.config.batch_size

        def make_batch(index: int) -> dict[str, np.ndarray]:
            vision = None if self.schedule is None else self.schedule.vision_rows(int(index))
            return self.plan(self.data.raw_batch(seed, "train", int(index), bs, vision))

        threads = int(self.config.data.read_threads)
        read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
        batches = iter(grain.MapDataset.range(0, MAX_BATCHES).map(make_batch).to_iter_dataset(read))
        return TokenCounter(batches, self.config.seq_len, self.tokenizer.media_id)

    def evaluate(self, model: nnx.Module) -> dict[str, Any]:
        """eval/caption_loss: mean CE per caption token over `eval_examples` held-out image rows, through the
        plain K25Model (grids as static host data), a check independent of the DEP plan."""
        n = int(self.config.eval_examples)
        if not n:
            return {}
        raw = self.data.raw_batch(self.config.seed, "eval", 0, n)
        loss = reference_loss_fn(multimodal_lm_loss)
        graphdef, state = nnx.split(model)

        @jax.jit
        def run(state: nnx.State) -> tuple[jax.Array, jax.Array]:
            total, aux = loss(nnx.merge(graphdef, state), raw)
            return total, aux["num_tokens"]

        total, count = run(state)
        return {"eval/caption_loss": float(total / jnp.maximum(count, 1.0)), **self.task_eval(model)}


class TokenCounter:
    """The stage's batch iterator, counting the token positions of the text and vision rows consumed so far.

    A row holding any media placeholder is a vision row; every row counts its `seq_len` positions (the packed
    pre-training convention: a row is a sequence of the budget, padding included). The counts ride in the
    iterator state, so they are checkpointed with it and a resumed run continues them exactly; the runtime
    logs `host_metrics()` (`tokens/text`, `tokens/vision`) in every metrics.jsonl record.
    """

    def __init__(self, inner: Any, seq_len: int, media_id: int):
        self.inner, self.seq_len, self.media_id = inner, seq_len, media_id
        self.counts = {"tokens/text": 0, "tokens/vision": 0}

    def __iter__(self) -> TokenCounter:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self.inner)
        vision = int(np.any(np.asarray(batch["input_ids"]) == self.media_id, axis=1).sum())
        rows = len(batch["input_ids"])
        self.counts["tokens/vision"] += vision * self.seq_len
        self.counts["tokens/text"] += (rows - vision) * self.seq_len
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"iterator": self.inner.get_state(), **self.counts}

    def set_state(self, state: dict[str, Any]) -> None:
        if "iterator" not in state:
            raise ValueError("this k25 checkpoint's data state has no token counts (written before they were "
                             "logged); resume it with the code that wrote it or start a new --workdir.")
        self.inner.set_state(state["iterator"])
        self.counts = {k: int(state[k]) for k in self.counts}

    def host_metrics(self) -> dict[str, int]:
        return dict(self.counts)
