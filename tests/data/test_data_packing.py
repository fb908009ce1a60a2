"""Packing invariants: segment ids, positions, in-document targets and the loss mask."""

import grain
import numpy as np
import pytest

from k25.data import ByteTokenizer, default_data_config, make_train_iterator
from k25.data.packing import ROW_KEYS, document_chunks, encode_record, pack

TOK = ByteTokenizer()


def segments(row):
    """(start, end) of each document in a packed row, checking ids run 1, 2, ... then pad to the end."""
    seg = row["segment_ids"]
    n = int((seg > 0).sum())
    assert (seg[n:] == 0).all(), "padding only after the last document"
    bounds = np.flatnonzero(np.diff(seg[:n], prepend=0)) if n else np.array([], int)
    assert list(seg[bounds]) == list(range(1, len(bounds) + 1))
    return list(zip(bounds, [*bounds[1:], n], strict=True))


def check_row(row, pad_id):
    seq_len = len(row["input_ids"])
    spans = segments(row)
    end = spans[-1][1] if spans else 0
    for key in ("input_ids", "targets"):
        assert (row[key][end:] == pad_id).all()
    assert (row["positions"][end:] == 0).all() and (row["loss_mask"][end:] == 0).all()
    for s, e in spans:
        assert e - s <= seq_len
        np.testing.assert_array_equal(row["positions"][s:e], np.arange(e - s))
        np.testing.assert_array_equal(row["targets"][s : e - 1], row["input_ids"][s + 1 : e])
        assert row["loss_mask"][e - 1] == 0 and row["targets"][e - 1] == pad_id
    return spans


@pytest.mark.parametrize("loss_on", ["answer", "all"])
def test_pipeline_rows_hold_invariants(loss_on):
    cfg = default_data_config()
    cfg.loss_on = loss_on
    it = make_train_iterator(cfg, seed=3, batch_size=4, seq_len=96, tokenizer=TOK)
    n_docs = 0
    for _ in range(5):
        batch = next(it)
        assert set(batch) == set(ROW_KEYS)
        assert all(v.shape == (4, 96) and v.dtype == np.int32 for v in batch.values())
        for r in range(4):
            row = {k: v[r] for k, v in batch.items()}
            for s, e in check_row(row, TOK.pad_id):
                n_docs += 1
                ids, mask = row["input_ids"][s:e], row["loss_mask"][s:e].astype(bool)
                assert ids[0] == TOK.bos_id and ids[-1] == TOK.eos_id
                trained = row["targets"][s:e][mask]
                if loss_on == "all":
                    assert mask[:-1].all()
                else:  # exactly the answer bytes and eos, which end the document
                    assert trained[-1] == TOK.eos_id and 1 <= len(trained) - 1 <= 6
                    np.testing.assert_array_equal(trained, ids[len(ids) - len(trained) :])
                    assert TOK.decode(ids).endswith(TOK.decode(trained))
    assert n_docs > 20  # several documents share each row


def test_long_documents_are_chunked():
    doc = encode_record({"text": "x" * 300}, TOK)
    assert len(doc["tokens"]) == 302 and not doc["is_target"][0] and doc["is_target"][1:].all()
    chunks = document_chunks(doc, seq_len=128, pad_id=TOK.pad_id)
    assert [len(c["input_ids"]) for c in chunks] == [128, 128, 46]
    np.testing.assert_array_equal(np.concatenate([c["input_ids"] for c in chunks]), doc["tokens"])
    for c in chunks:
        assert c["loss_mask"][-1] == 0 and c["loss_mask"][:-1].all()

    docs = grain.MapDataset.source([{"text": "y" * n} for n in (10, 300, 50, 127, 5)]).map(
        lambda r: encode_record(r, TOK)
    )
    rows = list(pack(docs.to_iter_dataset(), seq_len=128, pad_id=TOK.pad_id, num_bins=2, shuffle_bins=False))
    n_tokens = 0
    for row in rows:
        n_tokens += sum(e - s for s, e in check_row(row, TOK.pad_id))
    assert n_tokens == sum(n + 2 for n in (10, 300, 50, 127, 5)) - 1  # only a lone trailing eos is dropped


def test_task_record_encoding():
    doc = encode_record({"prompt": "Q: 1+1=? A: ", "answer": "2"}, TOK, loss_on="answer")
    assert TOK.decode(doc["tokens"]) == "Q: 1+1=? A: 2"
    assert doc["is_target"].sum() == 2 and doc["is_target"][-2:].all()  # "2" and eos
    doc = encode_record({"prompt": "Q: 1+1=? A: ", "answer": "2"}, TOK, loss_on="all")
    assert doc["is_target"][1:].all() and not doc["is_target"][0]
    with pytest.raises(ValueError):
        encode_record({"text": "x"}, TOK, loss_on="prompt")
