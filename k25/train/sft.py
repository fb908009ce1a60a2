"""Supervised fine-tuning on conversations (the `sft` stage): chat-format rows, loss on assistant tokens only.

Data: OpenAI-style conversations with tool calls, tool results and images, from a JSONL file
(`config.data.sft_path`, k25/data/sft/records.py) and/or generated sources (`config.data.sources`, e.g.
`{"zero_vision": 600}`: trajectories whose tool calls ran in the sandboxed Python tool, k25/data/sft/). Each is
rendered by the Kimi chat format (k25/data/chat.py) into ids and a loss mask that is 1 exactly on what the
model writes in assistant turns (reasoning, content, tool calls, `<|im_end|>`); system, user and tool turns,
the tool declaration, turn headers and media pads are 0. Conversations are packed first-come into rows with
per-conversation segments and positions (`k25.train.joint.pack_documents`, the joint stage's packer), so
attention never crosses conversations.

Model: `config.init_from` (a run directory - trained or converted - or an HF checkpoint directory) decides
the model and its weights (`k25.train.rundir.load_model`); without it, `config.model` builds a text K2 model
or `config.lm` + `config.vision` a K2.5 model from scratch. A K2.5 model's images go through the joint
stage's planning (`k25.train.multimodal.prepare_batch`, DEP when `config.dep`) and its loss
(`k25.parallel.dep.step_loss_fn`), so the runtime step is the same as the joint stage's.

Evals: `eval/assistant_loss` (CE per assistant token on held-out conversations) and, with
`config.agent_eval.per_kind` > 0, the vision tool-use evaluation (k25/train/sft_eval.py).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from k25.data.chat import ChatFormat, ChatFormatError, load_chat_format
from k25.data.preprocess import preprocess_images
from k25.data.sft import generate
from k25.data.sft.records import Record, read_jsonl, record_images
from k25.model.config import K2Config
from k25.model.decoder import K2Model
from k25.model.k25 import K25Model
from k25.model.vision_config import K25Config, MoonViTConfig
from k25.parallel.dep import reference_loss_fn, step_loss_fn
from k25.parallel.mesh import make_mesh
from k25.train.init_from import copy_into
from k25.train.joint import MAX_BATCHES, ROW_KEYS, Document, pack_documents, stack_rows, vision_budgets
from k25.train.multimodal import dep_enabled, multimodal_lm_loss, prepare_batch
from k25.train.pretrain import lm_loss
from k25.train.step import StepConfig


def default_sft_data_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        tokenizer="byte",  # chat format: "byte" (ByteTokenizer(chat=True), vocab 278) or an HF tokenizer dir
        sft_path="",  # JSONL of {"messages": [...], "tools": [...]} (OpenAI chat format)
        sources={},  # generated sources -> number of conversations, e.g. {"zero_vision": 600}
        seed=0,  # fixes the generated conversations (held-out ones use seed + 1)
        thinking=False,  # render assistant turns as the thinking (<think>...) or the instant format
        max_media_tokens_per_row=64,  # caps a row's vision tokens (also bounds the encoder budgets)
        drop_long=False,  # drop conversations longer than seq_len (logged) instead of raising
        eval_conversations=8,  # held-out generated conversations for eval/assistant_loss
        read_threads=1,
    ))


def load_records(cfg: ml_collections.ConfigDict, seed_offset: int = 0, n_scale: float = 1.0) -> list[Record]:
    """The JSONL file's records (training only) then each generated source's."""
    records: list[Record] = []
    if cfg.sft_path and not seed_offset:
        records += read_jsonl(cfg.sft_path)
    for source, n in sorted(dict(cfg.sources).items()):
        n = int(round(int(n) * n_scale))
        if n > 0:
            records += generate(source, n, int(cfg.seed) + seed_offset)
    return records


def source_model_config(path: str, tokenizer: str = "byte") -> K2Config | K25Config:
    """The model config of an `init_from` directory (a run or an HF checkpoint), nothing loaded but configs;
    a K2.5 model's media placeholder ids are the chat format's (`tokenizer`), as the sft stage trains them.
    `k25.train.rundir` uses it to rebuild an sft run's model (its config.json names only `init_from`)."""
    from k25.train.rundir import is_run_dir, model_config

    if is_run_dir(path):
        with open(os.path.join(path, "config.json")) as f:
            cfg = model_config(json.load(f))
    else:
        from k25 import hf

        cfg = hf.load_plan(path)[0]
    return with_chat_media_ids(cfg, load_chat_format(tokenizer))


def with_chat_media_ids(cfg: K2Config | K25Config, fmt: ChatFormat) -> K2Config | K25Config:
    """A K2.5 config whose image/video placeholder ids are the chat format's (text configs unchanged)."""
    if not isinstance(cfg, K25Config):
        return cfg
    video = fmt.video_pad_id if fmt.video_pad_id is not None else cfg.video_token_id
    return cfg.replace(image_token_id=fmt.image_pad_id, video_token_id=video).validate()


class SFTStage:
    """Stage "sft": next-token CE on the assistant tokens of packed chat-format conversations."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.fmt: ChatFormat = load_chat_format(config.data.tokenizer)
        self.init_params, cfg = self._model_config(config)
        self.multimodal = isinstance(cfg, K25Config)
        self.model_cfg = cfg = with_chat_media_ids(cfg, self.fmt)
        self.text_cfg: K2Config = cfg.text_config if self.multimodal else cfg
        try:
            self.fmt.check_vocab(self.text_cfg.vocab_size)
        except ValueError as e:
            raise ValueError(f"config.init_from / model config: {e}") from None
        self.accum_steps = int(config.optim.accum_steps)
        self.mesh = make_mesh(config.mesh)
        if config.batch_size % (self.accum_steps * self.mesh.shape["dp"] * self.mesh.shape["ep"]):
            raise ValueError(f"config.batch_size={config.batch_size} must be divisible by accum_steps x dp x ep.")
        self.docs = self.encode_all(load_records(config.data), "train")
        if not self.docs:
            raise ValueError("the SFT stage has no conversations: set config.data.sft_path and/or "
                             "config.data.sources (e.g. {'zero_vision': 600}).")
        self.dep = dep_enabled(config)
        if self.multimodal:
            merge = cfg.vision_config.merge_area
            biggest = max([self._media(d) for d in self.docs] + [1])
            self.patch_budget, self.token_budget = vision_budgets(config, self.mesh, merge, biggest)
            self._loss = step_loss_fn(functools.partial(multimodal_lm_loss, media_id=self.fmt.image_pad_id),
                                      self.mesh, dep=self.dep)
        self._eval_docs: list[Document] | None = None
        self._agent_eval = None

    # ----------------------------------------------------------------------------------------- model
    @staticmethod
    def _model_config(config: ml_collections.ConfigDict) -> tuple[dict[str, Any], K2Config | K25Config]:
        """({"params", "buffers"} of `init_from` or {}, the model config)."""
        src = config.get("init_from", "")
        if src:
            from k25.train.rundir import load_model

            if not os.path.isdir(src):
                raise ValueError(f"config.init_from={src!r} is not a directory; give a run directory (with "
                                 "checkpoints/) or an HF checkpoint directory (config.json + safetensors).")
            model = load_model(src)
            _, params, buffers = nnx.split(model, nnx.Param, ...)
            saved = jax.device_get({"params": nnx.to_pure_dict(params), "buffers": nnx.to_pure_dict(buffers)})
            return saved, model.cfg
        try:
            if config.get("vision") is not None:
                vision = MoonViTConfig.from_dict(config.vision.to_dict())
                return {}, K25Config(text_config=K2Config.from_dict(config.lm.to_dict()), vision_config=vision,
                                     projection_hidden_size=vision.hidden_size)
            return {}, K2Config.from_dict(config.model.to_dict())
        except (AttributeError, KeyError):
            raise ValueError("the sft stage needs config.init_from (a run or HF directory), or config.model (text) "
                             "or config.lm + config.vision (K2.5) to build a model from scratch.") from None

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        model = K25Model(self.model_cfg, rngs=rngs) if self.multimodal else K2Model(self.model_cfg, rngs=rngs)
        if self.init_params:
            copy_into(model, self.init_params, "config.init_from")
        return model

    # ------------------------------------------------------------------------------------------ data
    def encode(self, record: Record, where: str) -> Document:
        """(tokens, is_target, images) of one conversation; images as ((patches, dim) pixels, grid) per image.

        A K2.5 conversation is one document whose images are packed in order; `Document`'s third slot holds
        the list (pack_documents appends it whole)."""
        images = record_images(record, where)
        if images and not self.multimodal:
            raise ValueError(f"{where} has {len(images)} image(s) but the model is text-only; start from a K2.5 "
                             "checkpoint or drop image conversations.")
        pixels: list[tuple[np.ndarray, tuple[int, int, int]]] = []
        counts: list[int] = []
        if images:
            vcfg = self.model_cfg.vision_config
            px = preprocess_images(images, patch_size=vcfg.patch_size, merge_size=vcfg.merge_kernel_size[0])
            start = 0
            for t, h, w in (tuple(int(v) for v in g) for g in px["image_grid_thw"]):
                pixels.append((np.asarray(px["pixel_values"][start:start + t * h * w], np.float32)
                               .reshape(t * h * w, -1), (t, h, w)))
                counts.append(t * h * w // vcfg.merge_area)
                start += t * h * w
        try:
            ct = self.fmt.encode(record["messages"], record.get("tools"), thinking=bool(self.config.data.thinking),
                                 image_tokens=counts or None)
        except ChatFormatError as e:
            raise ValueError(f"{where}: {e}") from None
        return np.asarray(ct.ids, np.int32), np.asarray(ct.loss_mask, bool), pixels or None

    def encode_all(self, records: list[Record], split: str) -> list[Document]:
        docs, dropped = [], 0
        for i, r in enumerate(records):
            doc = self.encode(r, f"{split} conversation {i}")
            if len(doc[0]) > self.config.seq_len:
                if not self.config.data.drop_long:
                    raise ValueError(f"{split} conversation {i} has {len(doc[0])} tokens > config.seq_len="
                                     f"{self.config.seq_len}; raise seq_len or set config.data.drop_long=True.")
                dropped += 1
                continue
            docs.append(doc)
        if dropped:
            logging.warning("sft: dropped %d of %d %s conversations longer than seq_len=%d", dropped, len(records),
                            split, self.config.seq_len)
        return docs

    def _media(self, doc: Document) -> int:
        return int((doc[0] == self.fmt.image_pad_id).sum())

    def row(self, rng: np.random.Generator, docs: list[Document]
            ) -> tuple[dict[str, np.ndarray], list[tuple[np.ndarray, tuple[int, int, int]]]]:
        """One packed row of randomly drawn conversations (each its own segment)."""
        def draw() -> Document:
            return docs[int(rng.integers(len(docs)))]

        row, groups = pack_documents(draw, seq_len=self.config.seq_len, pad_id=self.fmt.tokenizer.pad_id,
                                     media_id=self.fmt.image_pad_id,
                                     max_media_tokens=int(self.config.data.max_media_tokens_per_row))
        return row, [px for group in groups for px in group]

    def raw_batch(self, seed: int, index: int, docs: list[Document] | None = None) -> dict[str, np.ndarray]:
        docs = self.docs if docs is None else docs
        rows = [self.row(np.random.default_rng([int(self.config.data.seed), seed, index, r]), docs)
                for r in range(self.config.batch_size)]
        batch = stack_rows(rows)
        if not self.multimodal:
            return {k: batch[k] for k in ROW_KEYS}
        batch, _ = prepare_batch(batch, self.model_cfg, self.mesh, dep=self.dep, accum_steps=self.accum_steps,
                                 patch_budget=self.patch_budget, token_budget=self.token_budget)
        return batch

    # --------------------------------------------------------------------------------------- runtime
    def loss_fn(self, model: nnx.Module, batch: dict) -> tuple[jax.Array, dict]:
        return self._loss(model, batch) if self.multimodal else lm_loss(model, batch)

    def step_config(self) -> StepConfig:
        return StepConfig.for_decoder(self.config, self.text_cfg, accum_steps=self.accum_steps,
                                      multimodal=self.multimodal)

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        s = self.config.seq_len
        empty = {k: np.zeros((batch_size, s), np.int32) for k in ROW_KEYS}
        if self.multimodal:
            empty, _ = prepare_batch(empty, self.model_cfg, self.mesh, dep=self.dep, accum_steps=self.accum_steps,
                                     patch_budget=self.patch_budget, token_budget=self.token_budget)
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in empty.items()}

    def train_iterator(self, seed: int, process_index: int, process_count: int) -> Iterator[dict]:
        if process_count > 1:
            raise ValueError("the sft stage builds global batches (the K2.5 plan balances over every device); set "
                             "config.host_data='replicate' for multi-process runs.")
        threads = int(self.config.data.read_threads)
        read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
        return iter(grain.MapDataset.range(0, MAX_BATCHES).map(lambda i: self.raw_batch(seed, int(i)))
                    .to_iter_dataset(read))

    def evaluate(self, model: nnx.Module) -> dict[str, Any]:
        out: dict[str, Any] = {}
        n = int(self.config.data.eval_conversations)
        if n and self.config.data.sources:
            if self._eval_docs is None:
                total = sum(int(v) for v in dict(self.config.data.sources).values())
                self._eval_docs = self.encode_all(load_records(self.config.data, 1, n / max(total, 1)), "eval")
            if self._eval_docs:
                out["eval/assistant_loss"] = self.assistant_loss(model, self._eval_docs)
        agent = self.config.get("agent_eval")
        if agent is not None and int(agent.per_kind) > 0:
            if self._agent_eval is None:
                from k25.train.sft_eval import VisionToolEval

                self._agent_eval = VisionToolEval(agent, self.fmt, seed=int(self.config.seed))
            out.update(self._agent_eval(model))
        return out

    def assistant_loss(self, model: nnx.Module, docs: list[Document]) -> float:
        """CE per assistant token over `docs`, one conversation per row, through the plain model."""
        rows = [pack_documents(iter([d]).__next__, seq_len=self.config.seq_len, pad_id=self.fmt.tokenizer.pad_id,
                               media_id=self.fmt.image_pad_id, max_media_tokens=1 << 30, max_docs=1) for d in docs]
        batch = stack_rows([(r, [px for g in groups for px in g]) for r, groups in rows])
        if self.multimodal:
            total, count = reference_loss_fn(multimodal_lm_loss)(model, batch)[0], batch["loss_mask"].sum()
        else:
            total, count = lm_loss(model, {k: jnp.asarray(batch[k]) for k in ROW_KEYS})[0], batch["loss_mask"].sum()
        return float(total / max(float(count), 1.0))
