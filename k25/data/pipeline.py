"""The training input pipeline and eval sets, built from one ``data_cfg``.

Stages (all grain, all deterministic in ``seed``): sources -> weighted mix + window shuffle
(``MapDataset``, random access) -> optional per-process slice -> tokenize (prefetch threads) ->
chunk + first-fit pack -> batch -> optional batch prefetch thread. The returned iterator's
``get_state()`` is a small JSON-able dict; ``set_state()`` on a fresh iterator from the same config
resumes exactly where the saved one was.

Batches are dicts of int32 numpy arrays, each ``(batch_size, seq_len)``: ``input_ids``, ``targets``,
``segment_ids``, ``positions``, ``loss_mask`` (see ``k25.data.packing`` for their meaning).
"""

from __future__ import annotations

import functools
from typing import Any

import grain
import ml_collections

from k25.data.mixture import mix, parse_weights
from k25.data.packing import encode_record, pack
from k25.data.sources import open_source
from k25.data.synthetic import TASKS, make_task
from k25.data.tokenizer import Tokenizer


def default_data_config() -> ml_collections.ConfigDict:
    """The tiny quickstart: the three synthetic text tasks, equal weights, loss on answers only."""
    cfg = ml_collections.ConfigDict(type_safe=False)  # so `sources` can become a list or string of specs
    # spec -> weight; file specs ("jsonl:/data/x.jsonl") go in a list of (spec, weight) pairs instead,
    # since ConfigDict keys cannot hold dots. See mixture.parse_weights for all accepted forms.
    cfg.sources = {"knowledge": 1.0, "reasoning": 1.0, "code": 1.0}
    cfg.loss_on = "answer"  # "answer" | "all"; text records are always trained on every token
    cfg.text_field = "text"  # default field of JSONL/Parquet/ArrayRecord rows ("spec#field" overrides)
    cfg.shuffle_window = 1024  # mixed-stream window shuffle; 0 or 1 keeps the plain interleave
    cfg.num_packing_bins = 0  # rows packed at once; 0 means batch_size
    cfg.read_threads = 1  # tokenizing threads (Python work, so more rarely helps)
    cfg.read_prefetch = 256  # records buffered ahead by those threads
    cfg.prefetch_batches = 2  # batches assembled ahead in a background thread; 0 disables
    # Per-task constructor kwargs. `seed` fixes the task's world and train/eval split, independently of
    # the iterator seed, so a run's eval set never changes with its shuffling seed.
    cfg.synthetic = ml_collections.ConfigDict(
        {
            "knowledge": {"seed": 0, "eval_fraction": 0.25, "num_entities": 30},
            "reasoning": {"seed": 0, "eval_fraction": 0.1},
            "code": {"seed": 0, "eval_fraction": 0.1},
        }
    )
    return cfg


def _synthetic_kwargs(data_cfg: ml_collections.ConfigDict) -> dict[str, dict]:
    synthetic = data_cfg.get("synthetic") or {}
    return {name: dict(synthetic[name]) for name in synthetic}


def make_train_iterator(
    data_cfg: ml_collections.ConfigDict,
    *,
    seed: int,
    batch_size: int,
    seq_len: int,
    tokenizer: Tokenizer,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """An endless iterator of packed batches; ``process_index/count`` give each host a disjoint slice."""
    weights = parse_weights(data_cfg.sources)
    datasets = {
        spec: open_source(
            spec,
            stream=seed,
            text_field=data_cfg.get("text_field", "text"),
            synthetic_kwargs=_synthetic_kwargs(data_cfg),
        )
        for spec in weights
    }
    records = mix(datasets, weights, seed=seed, shuffle_window=data_cfg.get("shuffle_window", 1024))
    if process_count > 1:
        records = records[process_index::process_count]
    encode = functools.partial(encode_record, tokenizer=tokenizer, loss_on=data_cfg.get("loss_on", "answer"))
    read = grain.ReadOptions(
        num_threads=data_cfg.get("read_threads", 1), prefetch_buffer_size=data_cfg.get("read_prefetch", 256)
    )
    docs = records.map(encode).to_iter_dataset(read)
    rows = pack(
        docs,
        seq_len=seq_len,
        pad_id=tokenizer.pad_id,
        num_bins=data_cfg.get("num_packing_bins", 0) or batch_size,
        seed=seed,
    )
    batches = rows.batch(batch_size, drop_remainder=True)
    if data_cfg.get("prefetch_batches", 0) > 0:
        batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=data_cfg.prefetch_batches)
    return iter(batches)


def make_eval_examples(
    data_cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, n_per_task: int
) -> dict[str, list[dict[str, Any]]]:
    """Held-out examples of each synthetic task among ``data_cfg.sources`` (file sources have none).

    Each is ``dict(prompt, answer, prompt_ids)``; ``prompt_ids`` is ``bos + encode(prompt)``, exactly the
    prefix the model saw in training, so the eval loop should generate from it and ``decode`` the
    continuation up to eos for ``exact_match``. Fewer than ``n_per_task`` come back when a task's
    eval split is smaller (knowledge has ``eval_fraction * 3 * num_entities`` questions).
    """
    kwargs = _synthetic_kwargs(data_cfg)
    out: dict[str, list[dict[str, Any]]] = {}
    for spec in parse_weights(data_cfg.sources):
        if spec in TASKS:
            examples = make_task(spec, **kwargs.get(spec, {})).examples("eval", n_per_task)
            out[spec] = [{**ex, "prompt_ids": [tokenizer.bos_id, *tokenizer.encode(ex["prompt"])]} for ex in examples]
    return out
