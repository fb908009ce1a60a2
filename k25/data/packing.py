"""Records -> token documents -> fixed-length packed rows for causal LM training.

A record becomes ``bos + tokens + eos``: text records are all target; task records are
``bos + prompt + answer + eos`` with the answer and eos as targets (the prompt too when
``loss_on == "all"``). Prompt and answer are encoded separately so the answer boundary is exact for
any tokenizer. Documents longer than ``seq_len`` are cut into ``seq_len`` chunks, each its own segment.

Rows are packed with grain's ``FirstFitPackIterDataset`` (``num_bins`` open rows, each document goes to
the first row with room; when one fits nowhere, all rows are emitted, optionally shuffled, and packing
restarts). Its checkpoint state is the parent's state plus a row counter, so resuming is exact.

Row format, each ``(seq_len,)`` int32:

- ``input_ids``: tokens, ``pad_id`` after the last document.
- ``targets``: the next token *within the same document* (``pad_id`` on each document's last token).
- ``segment_ids``: 1, 2, 3, ... per document in the row, 0 on padding.
- ``positions``: 0, 1, ... restarting at every document, 0 on padding.
- ``loss_mask``: 1 where ``targets`` is a trained token; 0 on padding, on each document's last token and
  (``loss_on == "answer"``) where the target is a prompt token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from k25.data.tokenizer import Tokenizer

FEATURES = ("input_ids", "targets", "loss_mask")
ROW_KEYS = ("input_ids", "targets", "segment_ids", "positions", "loss_mask")
LOSS_ON = ("answer", "all")


def encode_record(record: Mapping[str, str], tokenizer: Tokenizer, loss_on: str = "answer") -> dict[str, np.ndarray]:
    """A record -> ``tokens`` and ``is_target`` (whether each token is trained on as a prediction)."""
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    if "text" in record:
        prompt, answer = [], tokenizer.encode(record["text"])
    else:
        prompt, answer = tokenizer.encode(record["prompt"]), tokenizer.encode(record["answer"])
    tokens = [tokenizer.bos_id, *prompt, *answer, tokenizer.eos_id]
    is_target = [False] + [loss_on == "all"] * len(prompt) + [True] * (len(answer) + 1)
    return {"tokens": np.asarray(tokens, np.int32), "is_target": np.asarray(is_target, bool)}


def document_chunks(doc: Mapping[str, np.ndarray], seq_len: int, pad_id: int) -> list[dict[str, np.ndarray]]:
    """Cuts an encoded document into <= ``seq_len`` pieces with in-piece targets and loss mask."""
    tokens, is_target = doc["tokens"], doc["is_target"]
    out = []
    for start in range(0, len(tokens) - 1, seq_len):
        piece, tgt = tokens[start : start + seq_len], is_target[start : start + seq_len]
        targets = np.append(piece[1:], np.int32(pad_id)).astype(np.int32)
        loss_mask = np.append(tgt[1:], False).astype(np.int32)
        out.append({"input_ids": piece, "targets": targets, "loss_mask": loss_mask})
    return out


class _Chunk(grain.experimental.FlatMapTransform):
    """Grain flat-map wrapper of ``document_chunks``."""

    def __init__(self, seq_len: int, pad_id: int) -> None:
        self.seq_len, self.pad_id = seq_len, pad_id
        self.max_fan_out = 1 << 16

    def flat_map(self, element: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        return document_chunks(element, self.seq_len, self.pad_id)


def _to_row(packed: Mapping[str, Any]) -> dict[str, np.ndarray]:
    row = {k: packed[k] for k in FEATURES}
    row["segment_ids"] = packed["input_ids_segment_ids"]
    row["positions"] = packed["input_ids_positions"]
    return {k: np.asarray(row[k], np.int32) for k in ROW_KEYS}


def pack(
    docs: grain.IterDataset,
    *,
    seq_len: int,
    pad_id: int,
    num_bins: int,
    seed: int = 0,
    shuffle_bins: bool = True,
) -> grain.IterDataset:
    """Encoded documents (``encode_record`` output) -> packed rows in the module's row format."""
    chunks = grain.experimental.FlatMapIterDataset(docs, _Chunk(seq_len, pad_id))
    packed = grain.experimental.FirstFitPackIterDataset(
        chunks,
        length_struct={k: seq_len for k in FEATURES},
        num_packing_bins=num_bins,
        seed=seed,
        shuffle_bins=shuffle_bins,
        padding_struct={"input_ids": pad_id, "targets": pad_id, "loss_mask": 0},
    )
    return packed.map(_to_row)
