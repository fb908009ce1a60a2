"""Train iterator determinism and exact resume; mixture weights; eval examples; default config."""

import json
from collections import Counter

import grain
import numpy as np
import pytest

from k25.data import ByteTokenizer, default_data_config, exact_match, make_eval_examples, make_train_iterator
from k25.data.mixture import EpochShuffle, mix, parse_weights
from k25.data.synthetic import TASKS

TOK = ByteTokenizer()


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def make(cfg=None, seed=0, **kw):
    kw = {"batch_size": 4, "seq_len": 64, **kw}
    return make_train_iterator(cfg or default_data_config(), seed=seed, tokenizer=TOK, **kw)


def test_same_seed_same_batches_other_seed_differs():
    a, b, c = take(make(seed=7), 4), take(make(seed=7), 4), take(make(seed=8), 4)
    assert_same(a, b)
    assert not all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("bins,prefetch", [(0, 2), (3, 0)])  # bins=3 with batch 2: batches straddle pack groups
def test_resume_is_exact(bins, prefetch):
    cfg = default_data_config()
    cfg.num_packing_bins, cfg.prefetch_batches = bins, prefetch
    it = make(cfg, batch_size=2)
    take(it, 5)
    state = it.get_state()
    state = json.loads(json.dumps(state))  # checkpointable as JSON
    expected = take(it, 6)

    fresh = make(cfg, batch_size=2)
    fresh.set_state(state)
    assert_same(take(fresh, 6), expected)

    used = make(cfg, batch_size=2)  # restoring into an iterator that already ran works too
    take(used, 9)
    used.set_state(state)
    assert_same(take(used, 6), expected)


def test_process_slices_differ():
    a, b = take(make(process_index=0, process_count=2), 2), take(make(process_index=1, process_count=2), 2)
    assert not np.array_equal(a[0]["input_ids"], b[0]["input_ids"])


def test_parse_weights_forms():
    assert parse_weights({"knowledge": 2, "code": 1}) == {"knowledge": 2.0, "code": 1.0}
    assert parse_weights(default_data_config().sources) == {"knowledge": 1.0, "reasoning": 1.0, "code": 1.0}
    assert parse_weights(["code", ("jsonl:/d/a.jsonl", 3)]) == {"code": 1.0, "jsonl:/d/a.jsonl": 3.0}
    assert parse_weights("code=2, jsonl:/d/a.b.jsonl=0.5,knowledge") == {
        "code": 2.0,
        "jsonl:/d/a.b.jsonl": 0.5,
        "knowledge": 1.0,
    }
    with pytest.raises(ValueError):
        parse_weights({"code": 0})


def test_epoch_shuffle():
    ds = EpochShuffle(grain.MapDataset.range(10), seed=3)
    epochs = [[ds[e * 10 + i] for i in range(10)] for e in range(3)]
    assert all(sorted(e) == list(range(10)) for e in epochs)  # every record once per epoch
    assert epochs[0] != epochs[1] and epochs[0] != list(range(10))
    assert [ds[i] for i in range(10)] == [EpochShuffle(grain.MapDataset.range(10), seed=3)[i] for i in range(10)]


def test_mixture_weights_respected():
    sources = {name: grain.MapDataset.source([name] * size) for name, size in (("a", 7), ("b", 13), ("c", 5))}
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    mixed = mix(sources, weights, seed=0, shuffle_window=1024)
    counts = Counter(mixed[i] for i in range(4096))
    for name, w in weights.items():
        assert abs(counts[name] / 4096 - w) < 0.01
    head = [mixed[i] for i in range(64)]
    assert head != sorted(head) and 10 < head.count("a") < 54  # shuffled, yet mixed within a window
    assert Counter(mix(sources, weights, seed=0, shuffle_window=0)[i] for i in range(100)) == {
        "a": 50,
        "b": 30,
        "c": 20,
    }


def test_pipeline_mixes_tasks_by_weight():
    cfg = default_data_config()
    cfg.sources = {"knowledge": 2.0, "reasoning": 1.0, "code": 1.0}
    counts = Counter()
    for batch in take(make(cfg, batch_size=8, seq_len=128), 20):
        for ids, seg in zip(batch["input_ids"], batch["segment_ids"], strict=True):
            for s in range(1, seg.max() + 1):
                text = TOK.decode(ids[seg == s])
                kind = (
                    "code"
                    if "Output: " in text
                    else "reasoning"
                    if text.startswith("Q: ") and "What" not in text
                    else "knowledge"
                )
                counts[kind] += 1
    total = sum(counts.values())
    assert total > 300
    assert abs(counts["knowledge"] / total - 0.5) < 0.06
    assert abs(counts["code"] / total - 0.25) < 0.06


def test_eval_examples():
    cfg = default_data_config()
    evals = make_eval_examples(cfg, TOK, n_per_task=16)
    assert set(evals) == set(cfg.sources) and set(evals) <= set(TASKS)
    for name, examples in evals.items():
        assert len(examples) == 16
        for ex in examples:
            assert ex["prompt_ids"] == [TOK.bos_id, *TOK.encode(ex["prompt"])]
            assert exact_match(ex["answer"], ex["answer"])
            assert TASKS[name](**cfg.synthetic[name]).split_of(ex["prompt"]) == "eval"
    assert make_eval_examples(cfg, TOK, 16) == evals  # deterministic
    cfg.sources = [("jsonl:/nonexistent.jsonl", 1.0), "code"]  # any type: the data config is not type-safe
    assert set(make_eval_examples(cfg, TOK, 4)) == {"code"}
