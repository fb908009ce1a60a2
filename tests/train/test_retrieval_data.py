"""Passkey / multi-key retrieval documents and their scoring (k25.data.synthetic.retrieval,
k25.train.retrieval_eval), and the long-context phases' configs (experiments/long_context.py)."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import long_context
from k25.data.synthetic.retrieval import FILLER, RetrievalTask
from k25.data.tokenizer import ByteTokenizer
from k25.model.rope import inv_freq_and_attention_factor
from k25.train.retrieval_eval import RetrievalEval, default_retrieval_eval_config


@pytest.mark.parametrize("length,keys", [(60, 1), (128, 3), (1000, 3)])
def test_documents_have_exact_lengths_and_the_queried_needle_at_its_depth(length, keys):
    task, tok = RetrievalTask(max_len=128), ByteTokenizer()
    for depth in (0.0, 0.5, 1.0):
        ex = task.probe(length, depth, keys, 0)
        assert len(tok.encode(ex["prompt"] + ex["answer"])) + 2 == length  # bos + prompt + answer + eos
        name = ex["prompt"][: -len(" key is ")].rsplit(" ", 1)[1]  # the question's name
        needle = f" {name} key is {ex['answer']}. "
        assert ex["prompt"].count(needle) == 1 and ex["prompt"].count(" key is ") == keys + 1
        haystack = ex["prompt"][: -len(f" {name} key is ")]
        others = haystack.replace(needle, "", 1)
        for _ in range(keys - 1):  # the distractors: other names, same template
            i = others.index(" key is ")
            start = others.rindex(" ", 0, i)
            assert others[start + 1:i] != name
            others = others[:start] + others[i + len(" key is 00000. "):]
        assert others in FILLER * (2 + len(others) // len(FILLER))  # the rest is contiguous filler
        if keys == 1:  # the filler before the needle is `depth` of all the filler
            assert haystack.index(needle) == round(depth * (len(haystack) - len(needle)))
    with pytest.raises(ValueError, match="length="):
        task.probe(30, 0.5, 1, 0)
    with pytest.raises(ValueError, match="3 keys"):
        RetrievalTask(max_len=64, max_keys=3)


class Oracle(nnx.Module):
    """Predicts the next token by reading it (so every prediction is right), except `wrong` positions counted
    from the end of the sequence, which predict token 0."""

    def __init__(self, wrong: tuple[int, ...] = ()):
        self.wrong = wrong

    def __call__(self, ids, positions, segment_ids):
        nxt = jnp.concatenate([ids[:, 1:], ids[:, :1]], axis=1)
        for w in self.wrong:
            nxt = nxt.at[:, ids.shape[1] - 1 - w].set(0)
        return SimpleNamespace(logits=jax.nn.one_hot(nxt, 264))


def test_retrieval_scores_only_the_answer_digits_and_eos():
    cfg = default_retrieval_eval_config()
    cfg.lengths, cfg.depths, cfg.per_cell, cfg.batch = [96, 192], [0.0, 1.0], 3, 4  # 3 x 2 + 6 = 12 probes, 3 batches
    ev = RetrievalEval(cfg, ByteTokenizer())
    perfect = ev(Oracle())
    assert perfect == {**{f"eval/retrieval_at_{n}": 1.0 for n in (96, 192)},
                       **{f"eval/retrieval_at_{n}/depth_{d}": 1.0 for n in (96, 192) for d in (0, 100)},
                       **{f"eval/multikey_at_{n}": 1.0 for n in (96, 192)}}
    # position -1 from the end predicts the eos, -6 the first digit: either wrong fails the probe
    for wrong in (1, 6):
        assert all(v == 0.0 for v in RetrievalEval(cfg, ByteTokenizer())(Oracle((wrong,))).values())
    # the question right before the answer (and everything earlier) is not scored
    assert all(v == 1.0 for v in RetrievalEval(cfg, ByteTokenizer())(Oracle((7, 20, 50))).values())


def test_phases_raise_the_length_under_one_yarn_rope():
    configs = {p: long_context.get_config(p) for p in long_context.PHASES}
    assert [c.seq_len for c in configs.values()] == [128, 256, 512, 1024]
    assert len({c.seq_len * c.batch_size for c in configs.values()}) == 1  # same tokens per step
    assert configs["base"].model.rope_scaling.type == "default"
    for p in long_context.PHASES[1:]:
        rope = configs[p].model.rope_scaling
        assert (rope.type, rope.factor, rope.original_max_position_embeddings) == ("yarn", 8.0, 128)
        assert configs[p].data.synthetic.retrieval.max_len == configs[p].seq_len
    assert configs["base"].retrieval_eval.lengths == [128, 256, 512, 1024]
    # YaRN leaves the fastest rotations alone and slows the slowest by the factor
    from k25.model.config import K2Config
    cfg = K2Config.from_dict(configs["yarn_8x"].model.to_dict())
    base = K2Config.from_dict(configs["base"].model.to_dict())
    yarn_freq, _ = inv_freq_and_attention_factor(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
    plain, _ = inv_freq_and_attention_factor(base.qk_rope_head_dim, base.rope_theta, base.rope_scaling)
    np.testing.assert_allclose(yarn_freq[0], plain[0])
    np.testing.assert_allclose(yarn_freq[-1], plain[-1] / 8, rtol=1e-6)
