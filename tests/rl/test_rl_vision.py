"""Vision RL on the rl stage: Eq. 1 through the planned multimodal forward equals Eq. 1 on the plain K25Model's
logits; the smoke config runs through the CLI and logs the vision and text held-out keys; kill-and-resume mid-RL
gives the same losses."""

import asyncio
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import rl_vision
from k25.rl.loss import policy_loss
from k25.rl.rollout import Episode
from k25.rl.trainer import RLStage
from k25.train import loop
from k25.train.joint import stack_rows
from k25.train.metrics import read_metrics


def smoke(**kw):
    c = rl_vision.get_config("smoke")
    c.mesh.devices = 1
    for k, v in kw.items():
        c[k] = v
    return c


@pytest.mark.slow
def test_planned_policy_loss_equals_eq1_on_the_plain_k25_logits():
    """Two trajectories with images (one with a tool-returned image): the stage's loss on the planned batch
    (encoder tokens spliced by the plan) equals policy_loss on log-softmax of K25Model(input_ids, pixels)."""
    c = smoke(seq_len=448)
    stage = RLStage(c)
    model = stage.build_model(nnx.Rngs(0))
    env = stage.make_env()
    rng = np.random.default_rng(0)
    B, T = c.batch_size, c.seq_len
    rows, pixels, eps = [], [], []
    vision_tasks = [t for t in stage.eval_tasks() if t.id.startswith("eval/vision/")]  # the smoke mixes in text
    for r, task in enumerate(vision_tasks[:2]):
        prompt = env.reset(task)
        media = env.media()
        ids = list(rng.integers(0, 250, 5))
        if r == 1:  # a tool result holding an image, rendered as the environment renders observations
            img = (rng.random((28, 42, 3)) * 255).astype(np.uint8)
            from k25.data.sft.records import image_part

            tool = [{"role": "tool", "tool_call_id": "c0", "content": [{"type": "text", "text": "ok"},
                                                                      image_part(img)]}]
            env.messages += tool
            ids += env.fmt.observation_ids(tool) + list(rng.integers(0, 250, 3))
            media = env.media()
        eps.append(Episode(uid=f"e{r}", group="g", task=task.to_dict(), seed=0, started=0, prompt_ids=prompt,
                           ids=[int(i) for i in ids], media=media))
    for e in eps:
        full = e.prompt_ids + e.ids
        L = len(full) - 1
        row = {k: np.zeros(T, np.int32) for k in ("input_ids", "targets", "loss_mask", "positions", "segment_ids")}
        row["input_ids"][:L], row["targets"][:L] = full[:-1], full[1:]
        row["positions"][:L], row["segment_ids"][:L] = np.arange(L), 1
        row["loss_mask"][len(e.prompt_ids) - 1:L] = (rng.random(L - len(e.prompt_ids) + 1) < 0.8)
        row["loss_mask"][np.isin(row["targets"], stage.suppressed_ids)] = 0  # observation tokens, as the env masks
        rows.append(row)
        pixels.append(stage.row_pixels(e, row["input_ids"]))
    while len(rows) < B:  # padding rows
        rows.append({k: np.zeros(T, np.int32) for k in rows[0]})
        pixels.append([])
    raw = stack_rows(list(zip(rows, pixels)))
    assert len(raw["image_grid_thw"]) == 3  # counting: 1, grounding: 1 + the tool's
    old = (-rng.random((B, T)) * 6).astype(np.float32)
    adv = np.where(raw["loss_mask"] > 0, rng.normal(size=(B, T)), 0).astype(np.float32)
    n = np.full((B,), raw["loss_mask"].sum(), np.float32)
    batch = {**stage.plan(raw), "old_logp": old, "advantages": adv, "n_total": n}
    loss_sum, aux = jax.jit(stage.loss_fn)(model, batch)
    logits = model(jnp.asarray(raw["input_ids"]), pixel_values=jnp.asarray(raw["pixel_values"]),
                   image_grid_thw=raw["image_grid_thw"]).logits.astype(jnp.float32)
    # the policy never samples its media placeholders: its distribution is renormalised over the other ids
    assert stage.suppressed_ids == tuple(sorted({stage.model_cfg.image_token_id, stage.model_cfg.video_token_id}))
    allowed = ~np.isin(np.arange(logits.shape[-1]), stage.suppressed_ids)
    lse = jax.scipy.special.logsumexp(jnp.where(allowed, logits, -jnp.inf), axis=-1)
    logp = jnp.take_along_axis(logits, jnp.asarray(raw["targets"])[..., None], -1)[..., 0] - lse
    ref, stats = policy_loss(logp, old, adv, raw["loss_mask"], **stage.loss_cfg.kwargs())
    np.testing.assert_allclose(loss_sum / aux["num_tokens"], ref, rtol=1e-5)
    np.testing.assert_allclose(aux["mean_abs_log_ratio"], stats["mean_abs_log_ratio"], rtol=1e-5)


def test_vision_episodes_carry_image_references_and_rebuild_them():
    """Prompt images are references rebuilt from the task seed; the sampler's pixels match the references."""
    stage = RLStage(smoke())
    drawn = {stage.task(i, 7).id.split(":")[0] for i in range(24)}
    assert drawn == {"vision/counting", "vision/grounding", "reasoning"}  # text and vision in one stream
    a, b = stage.task(3, 7), stage.task(3, 7)
    assert a.to_dict() == b.to_dict() and "data:" not in json.dumps(a.to_dict())
    env = stage.make_env()
    ids = env.reset(a)
    (url,) = env.media()
    assert ids.count(stage.model_cfg.image_token_id) == stage.media.tokens(url)
    from k25.rl.vision import task_images

    np.testing.assert_array_equal(stage.media.image(url), task_images(a)["image"])
    asyncio.run(env.restore(json.loads(json.dumps(env.state_dict()))))  # JSON round trip, tools rebuilt
    assert env.media() == [url]
    env.close()


def test_config_errors_name_the_field():
    c = smoke()
    c.rl.format = "plain"
    with pytest.raises(ValueError, match="rl.format"):
        RLStage(c)
    c = rl_vision.get_config("")
    with pytest.raises(ValueError, match="config.init_from"):
        RLStage(c)
    c = smoke()
    c.rl.tasks = {"vision/sudoku": 1.0}
    with pytest.raises(ValueError, match="rl.tasks"):
        RLStage(c)


@pytest.mark.slow
def test_smoke_runs_through_the_cli_and_logs_the_keys(tmp_path):
    out = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "experiments.run", "--config=experiments/rl_vision.py:smoke",
                    f"--workdir={out}", "--config.mesh.devices=1"], check=True, timeout=1500)
    m = read_metrics(out)
    assert [r["step"] for r in m] == [0, 1, 2, 3]
    for r in (m[0], m[-1]):  # before and after: vision held-out and the text held-out (Table 2 analog)
        for key in ("eval/accuracy", "eval/solved", "eval/tool_call_rate", "eval/text/mean_exact",
                    "eval/text/mean_token_acc", "eval/text/reasoning_exact", "eval/reasoning_accuracy"):
            assert key in r, key
    for r in m[1:]:
        assert np.isfinite(r["loss"]) and r["num_tokens"] > 0 and 0.0 <= r["reward"] <= 1.0
    # the run directory loads as the K2.5 policy it trained (to serve or evaluate it), with the chat media ids
    from k25.train.rundir import load_model

    stage = RLStage(smoke())
    model = load_model(str(out))
    assert model.cfg == stage.model_cfg


@pytest.mark.slow
def test_kill_and_resume_mid_vision_rl_gives_the_same_losses(tmp_path):
    c = smoke(eval_examples=0)
    loop.train(c, str(tmp_path / "full"))
    loop.train(c, str(tmp_path / "split"), stop_after=2)  # checkpoint at step 2, then "killed"
    loop.train(c, str(tmp_path / "split"))  # a fresh stage, sampler, media store and rollout manager
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "split")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3]
    for key in ("loss", "reward", "response_length", "mean_abs_log_ratio", "entropy"):
        np.testing.assert_array_equal([m[key] for m in a], [m[key] for m in b], err_msg=key)
    assert any(m["carried_episodes"] > 0 for m in a)  # partial rollouts (with their images) crossed iterations
