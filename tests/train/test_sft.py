"""The SFT stage: loss masks on conversations with tool calls, packing, init_from, bad input.

The loss of a packed row equals a hand-computed masked cross-entropy (numpy log-softmax over the model's
logits of each conversation run on its own), the masked targets are exactly the text the assistant writes,
and the gradient of the loss with respect to the logits is zero at every position whose target is not an
assistant token.
"""

from __future__ import annotations

import itertools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from experiments.common import base_config, model_config_dict
from k25.data.chat import byte_chat_format, render_segments
from k25.model.config import tiny
from k25.model.decoder import K2Model
from k25.train.pretrain import lm_loss, token_loss_sum
from k25.train.sft import SFTStage, default_sft_data_config

TOOLS = [{"type": "function", "function": {"name": "python", "description": "Run Python",
                                           "parameters": {"type": "object", "properties": {"code": {"type": "string"}},
                                                          "required": ["code"]}}}]
CONV_A = {"messages": [
    {"role": "system", "content": "Use tools."},
    {"role": "user", "content": "What is 6*7?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "functions.python:0", "type": "function", "function": {"name": "python",
                                                                      "arguments": json.dumps({"code": "print(6*7)"})}}]},
    {"role": "tool", "tool_call_id": "functions.python:0", "content": "42"},
    {"role": "assistant", "content": "Answer: 42"}], "tools": TOOLS}
CONV_B = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def sft_config(tmp_path, records, *, seq_len=512, batch=1) -> ml_collections.ConfigDict:
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    c = base_config()
    c.stage = "sft"
    c.init_from = ""
    c.model = model_config_dict(tiny(vocab_size=278, hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                                     n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                     first_k_dense_replace=1, dtype="float32"))
    c.data = default_sft_data_config()
    c.data.sft_path = str(path)
    c.data.eval_conversations = 0
    c.batch_size, c.seq_len = batch, seq_len
    c.mesh.devices = 1
    return c


@pytest.fixture(scope="module")
def model():
    cfg = tiny(vocab_size=278, hidden_size=32, num_hidden_layers=1, intermediate_size=64, n_routed_experts=4,
               num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, dtype="float32")
    return K2Model(cfg, rngs=nnx.Rngs(0))


def hand_masked_ce(model, ids: np.ndarray, mask: np.ndarray) -> tuple[float, int]:
    """Sum over t with mask[t+1] of -log softmax(logits[t])[ids[t+1]], with a numpy log-softmax."""
    logits = np.asarray(model(jnp.asarray(ids[None])).logits[0], np.float64)
    total, count = 0.0, 0
    for t in range(len(ids) - 1):
        if mask[t + 1]:
            row = logits[t]
            total += -(row[ids[t + 1]] - (np.log(np.exp(row - row.max()).sum()) + row.max()))
            count += 1
    return total, count


def test_loss_equals_hand_masked_ce_on_tool_calls(tmp_path, model):
    stage = SFTStage(sft_config(tmp_path, [CONV_A]))
    ids, mask, _ = stage.docs[0]
    # the masked tokens are exactly what the assistant writes (after the instant generation prompt)
    fmt = byte_chat_format()
    written = "".join(t for t, gen in render_segments(CONV_A["messages"], TOOLS, thinking=False) if gen)
    assert fmt.decode(ids[mask]) == written
    assert "print(6*7)" in written and "42\n" not in written and "Use tools." not in written
    assert "<|tool_call_begin|>" in written and written.endswith("Answer: 42<|im_end|>")
    batch = stage.raw_batch(0, 0)
    loss, aux = lm_loss(model, {k: jnp.asarray(v) for k, v in batch.items()})
    want, count = hand_masked_ce(model, ids, mask)
    assert int(aux["num_tokens"]) == count == int(mask[1:].sum())
    np.testing.assert_allclose(float(loss), want, rtol=2e-5)


def test_non_assistant_positions_get_zero_gradient(tmp_path, model):
    stage = SFTStage(sft_config(tmp_path, [CONV_A]))
    batch = {k: jnp.asarray(v) for k, v in stage.raw_batch(0, 0).items()}
    logits = model(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"]).logits
    grad = jax.grad(lambda lg: token_loss_sum(lg, batch["targets"], batch["loss_mask"])[0])(logits)
    per_pos = np.abs(np.asarray(grad[0])).sum(-1)
    trained = np.asarray(batch["loss_mask"][0]).astype(bool)
    assert trained.sum() > 20 and (~trained).sum() > 20
    assert np.all(per_pos[~trained] == 0.0)
    assert np.all(per_pos[trained] > 0.0)
    # changing what the user, the tool or the system said as *targets* does not move the loss
    other = np.asarray(batch["targets"]).copy()
    other[~np.asarray(batch["loss_mask"]).astype(bool)] = 7
    moved, _ = token_loss_sum(logits, jnp.asarray(other), batch["loss_mask"])
    np.testing.assert_allclose(float(moved), float(token_loss_sum(logits, batch["targets"], batch["loss_mask"])[0]))


def test_packing_keeps_conversations_apart(tmp_path, model):
    stage = SFTStage(sft_config(tmp_path, [CONV_A, CONV_B], seq_len=1536))
    (ids_a, mask_a, _), (ids_b, mask_b, _) = stage.docs
    na, nb = len(ids_a), len(ids_b)
    stage.config.seq_len = 2 * na + nb + 5  # A, B, A fit; the next A does not
    draws = itertools.chain([0, 1, 0], itertools.repeat(0))
    row, _ = stage.row(type("Draws", (), {"integers": lambda self, n: next(draws)})(), stage.docs)
    seg = row["segment_ids"]
    assert set(np.unique(seg)) == {0, 1, 2, 3}  # A, B, A again, padding
    assert list(row["positions"][na:na + nb]) == list(range(nb))
    assert row["loss_mask"][na - 1] == 0 and row["targets"][na - 1] == stage.fmt.tokenizer.pad_id
    batch = {k: jnp.asarray(v[None]) for k, v in row.items()}
    loss, aux = lm_loss(model, batch)
    a, ca = hand_masked_ce(model, ids_a, mask_a)
    b, cb = hand_masked_ce(model, ids_b, mask_b)
    assert int(aux["num_tokens"]) == 2 * ca + cb
    np.testing.assert_allclose(float(loss), 2 * a + b, rtol=2e-5)


def test_init_from_run_and_hf_directories(tmp_path, model):
    from k25 import hf
    from k25.train.rundir import write_model_run

    write_model_run(model, str(tmp_path / "run"))
    hf.save(model, str(tmp_path / "hf"))
    want = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for src in ("run", "hf"):
        c = sft_config(tmp_path, [CONV_B])
        c.init_from = str(tmp_path / src)
        del c["model"]  # the model comes from init_from
        stage = SFTStage(c)
        got = nnx.to_pure_dict(nnx.state(stage.build_model(nnx.Rngs(1)), nnx.Param))
        jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6), got, want)


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="seq_len"):
        SFTStage(sft_config(tmp_path, [CONV_A], seq_len=64))
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(CONV_B) + "\n{not json\n")
    c = sft_config(tmp_path, [CONV_B])
    c.data.sft_path = str(path)
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        SFTStage(c)
    image_conv = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg=="}},
        {"type": "text", "text": "what?"}]}, {"role": "assistant", "content": "a dot"}]}
    with pytest.raises(ValueError, match="text-only"):
        SFTStage(sft_config(tmp_path, [image_conv]))
    c = sft_config(tmp_path, [CONV_B])
    c.model.vocab_size = 272
    with pytest.raises(ValueError, match="278"):
        SFTStage(c)
