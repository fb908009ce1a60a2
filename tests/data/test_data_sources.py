"""File sources (JSONL, Parquet, ArrayRecord) read back directly and through the train pipeline."""

import json

import numpy as np
import pytest

from k25.data import ByteTokenizer, default_data_config, make_train_iterator
from k25.data.sources import ArrayRecordSource, JsonlSource, ParquetSource, SyntheticSource, open_source, to_record
from k25.data.synthetic import make_task

TOK = ByteTokenizer()


def rows(prefix, n=12):
    return [{"content": f"{prefix} document {i} " + "z" * (i * 7), "id": i} for i in range(n)]


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(r) + "\n" + ("\n" if i == 3 else "") for i, r in enumerate(items)))


def write_parquet(path, items):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(items), path, row_group_size=5)


def write_array_record(path, payloads):
    writer_mod = pytest.importorskip("array_record.python.array_record_module")
    writer = writer_mod.ArrayRecordWriter(str(path), "group_size:1")
    for p in payloads:
        writer.write(p)
    writer.close()


@pytest.fixture
def files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", rows("jsonl"))
    write_jsonl(tmp_path / "qa.jsonl", [{"prompt": f"Q: {i}+1=? A: ", "answer": str(i + 1)} for i in range(5)])
    write_parquet(tmp_path / "b.parquet", rows("parquet"))
    # ArrayRecord records may be JSON objects or raw text; both in one file.
    payloads = [json.dumps(r).encode() for r in rows("arjson", 6)] + [f"artext {i}".encode() for i in range(6)]
    write_array_record(tmp_path / "c.array_record", payloads)
    return tmp_path


def test_readers(files):
    jl = JsonlSource(str(files / "a.jsonl"), field="content")
    assert len(jl) == 12 and jl[5] == {"text": rows("jsonl")[5]["content"]}  # blank lines skipped
    pq_src = ParquetSource(str(files / "b.parquet"), field="content")
    assert len(pq_src) == 12 and pq_src[11] == {"text": rows("parquet")[11]["content"]}
    ar = ArrayRecordSource([str(files / "c.array_record")], field="content")
    assert len(ar) == 12 and ar[0] == {"text": rows("arjson")[0]["content"]} and ar[11] == {"text": "artext 5"}
    qa = open_source(f"{files}/qa.jsonl")  # bare path, kind from extension, prompt/answer rows
    assert qa[2] == {"prompt": "Q: 2+1=? A: ", "answer": "3"}
    both = open_source(f"jsonl:{files}/*.jsonl#content")  # glob of two files
    assert len(both) == 17
    with pytest.raises(KeyError):
        to_record({"id": 1}, "text")
    with pytest.raises(ValueError):
        open_source("nonsense")


def test_synthetic_source():
    src = SyntheticSource(make_task("code"), "eval", stream=2)
    assert src[10] == make_task("code").example("eval", 10, 2)
    assert len(open_source("reasoning")) > 2**60


def segment_texts(batch):
    out = []
    for ids, seg in zip(batch["input_ids"], batch["segment_ids"], strict=True):
        out += [TOK.decode(ids[seg == s]) for s in range(1, seg.max() + 1)]
    return out


def test_files_through_pipeline(files):
    cfg = default_data_config()
    cfg.text_field = "content"
    cfg.shuffle_window = 0  # plain interleave: each file's first draws are one full epoch, so all rows show up
    cfg.sources = [
        (f"jsonl:{files}/a.jsonl", 1.0),
        (f"parquet:{files}/b.parquet", 1.0),
        (f"arrayrecord:{files}/c.array_record", 1.0),
        (f"{files}/qa.jsonl", 0.5),
        ("code", 0.5),
    ]
    it = make_train_iterator(cfg, seed=1, batch_size=4, seq_len=128, tokenizer=TOK)
    texts, qa_loss = [], 0
    for _ in range(30):
        batch = next(it)
        texts += segment_texts(batch)
        qa_loss += int(batch["loss_mask"].sum())
    expected = {r["content"] for p in ("jsonl", "parquet") for r in rows(p)}
    expected |= {r["content"] for r in rows("arjson", 6)} | {f"artext {i}" for i in range(6)}
    file_texts = {t for t in texts if not t.startswith("Q: ") and "Output: " not in t}
    assert file_texts == expected  # every record seen, nothing else
    assert any(t.startswith("Q: ") and t[-1].isdigit() for t in texts)
    assert any("Output: " in t for t in texts)
    assert qa_loss > 0
    batch = next(it)
    assert np.all(batch["loss_mask"][batch["segment_ids"] == 0] == 0)
