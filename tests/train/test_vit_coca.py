"""The ViT training stage: SigLIP / caption losses against numpy, freezing, the K2.5 caption path, and a
few-step run of every phase through the runtime that writes the held-out metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import vit_coca
from k25.optim.muon_clip import FROZEN, label_params
from k25.train import loop
from k25.train.metrics import read_metrics
from k25.train.vision_losses import caption_cross_entropy, siglip_loss
from k25.train.vit_coca import ViTStage, caption_forward
from k25.train.vit_eval import recall_at_1, retrieval_pool

EVAL_KEYS = ("eval/retrieval_r1", "eval/caption_exact")


def smoke_config(phase: str, **kw):
    c = vit_coca.get_config(f"{phase},smoke")
    c.async_checkpoints = False
    c.mesh.devices = 1
    for k, v in kw.items():
        c[k] = v
    return c


def test_siglip_loss_matches_the_formula():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    t, b = np.log(10.0), -10.0
    logits = np.exp(t) * x @ y.T + b
    z = 2 * np.eye(6) - 1
    ref = np.sum(np.log1p(np.exp(-z * logits)), axis=1)  # -log sigmoid(z * logit), summed over texts
    got = siglip_loss(jnp.asarray(x), jnp.asarray(y), jnp.float32(t), jnp.float32(b))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5)


def test_caption_cross_entropy_counts_only_answer_tokens():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    ids = rng.integers(0, 7, (2, 5))
    mask = np.array([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ref = -sum(logp[i, t - 1, ids[i, t]] for i in range(2) for t in range(1, 5) if mask[i, t])
    total, count = caption_cross_entropy(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(float(total), ref, rtol=1e-5)
    assert float(count) == 6


def test_retrieval_helpers():
    assert recall_at_1(np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [0.0, 0.0, 1.0]])) == pytest.approx(2 / 3)
    stage = ViTStage(smoke_config("coca"))
    pool = retrieval_pool(stage.data.eval_samples, 16)
    assert len(pool) == 16 and len({s.text for s in pool}) == 16
    assert len({s.task for s in pool}) == len(stage.data.eval_samples)  # round-robin over every task


def test_trainable_prefixes_freeze_the_rest():
    params = {"mm_projector": {"in_proj": {"kernel": jnp.ones((4, 4))}}, "vision_tower": {"w": jnp.ones((4, 4))}}
    labels = label_params(params, ["mm_projector"])
    assert labels["vision_tower"]["w"] == FROZEN and labels["mm_projector"]["in_proj"]["kernel"] != FROZEN
    with pytest.raises(ValueError, match="matches no parameter"):
        label_params(params, ["projector"])


def test_caption_forward_equals_the_k25_placeholder_path():
    stage = ViTStage(smoke_config("caption_align"))
    model = stage.build_model(nnx.Rngs(0))
    batch = next(stage.train_iterator(0, 0, 1))
    px, ids = jnp.asarray(batch["pixel_values"][:4]), jnp.asarray(batch["text_ids"][:4])
    ours = caption_forward(model, px, ids, pack_size=2).logits
    cfg = stage.k25_cfg
    n_media = px.shape[2] * px.shape[3] // 4
    input_ids = jnp.concatenate([jnp.full((4, n_media), cfg.image_token_id, ids.dtype), ids], axis=1)
    ref = model(input_ids, pixel_values=px.reshape(-1, px.shape[-1]), image_grid_thw=[(1, 4, 4)] * 4).logits
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5)


@pytest.mark.slow  # 45-90 s on the shared 2-core box: compiling a step, the evals and greedy decoding
@pytest.mark.parametrize("phase", ["coca", "caption_align"])
def test_phase_trains_and_logs_the_held_out_metrics(tmp_path, phase):
    out = loop.train(smoke_config(phase), str(tmp_path))
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    final = rows[-1]
    for key in EVAL_KEYS:
        assert key in final and 0.0 <= final[key] <= 1.0
    assert final["eval/retrieval_candidates"] >= 16
    assert out["step"] == 3
    if phase == "coca":
        assert rows[0]["temperature"] == pytest.approx(10.0) and rows[0]["siglip_bias"] == pytest.approx(-10.0)
        # the next phase starts from this run's ViT (config.init_from), everything else fresh
        align = ViTStage(smoke_config("caption_align", init_from=str(tmp_path)))
        model = align.build_model(nnx.Rngs(0))
        trained = out["state"].params["vision_tower"]
        copied = nnx.to_pure_dict(nnx.state(model.vision_tower, nnx.Param))
        for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(copied)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        with pytest.raises(ValueError, match="init_parts"):
            ViTStage(smoke_config("caption_align", init_from=str(tmp_path), init_parts=["mm_projector"]))


@pytest.mark.slow
def test_projector_only_changes_nothing_but_the_projector(tmp_path):
    c = smoke_config("projector_only")
    out = loop.train(c, str(tmp_path))
    trainer = out["trainer"]
    before, after = trainer.init_state(), out["state"]
    assert "eval/retrieval_r1" in read_metrics(tmp_path)[-1]
    changed = jax.tree_util.tree_map_with_path(
        lambda p, a, b: (jax.tree_util.keystr(p), bool(np.any(np.asarray(a) != np.asarray(b)))),
        before.params, after.params)
    flat = dict(jax.tree.leaves(changed, is_leaf=lambda x: isinstance(x, tuple)))
    moved = {k for k, v in flat.items() if v}
    assert moved and all(k.startswith("['mm_projector']") for k in moved), sorted(moved)
    for a, b in zip(jax.tree.leaves(before.buffers), jax.tree.leaves(after.buffers)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the routing biases stay put too


def test_unknown_phase_is_refused():
    with pytest.raises(ValueError, match="ARG"):
        vit_coca.get_config("clip")
