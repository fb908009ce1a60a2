"""The rl stage on the existing runtime: rollouts with the current weights, Eq. 1 steps, metrics, and
kill-and-resume mid-RL (with partial rollouts in flight) giving the same losses as an uninterrupted run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import rl_text
from k25.rl.loss import policy_loss
from k25.rl.trainer import RLStage
from k25.train import loop
from k25.train.metrics import read_metrics


def smoke(**kw):
    c = rl_text.get_config("smoke")
    c.mesh.devices = 1
    for k, v in kw.items():
        c[k] = v
    return c


@pytest.mark.slow
def test_kill_and_resume_mid_rl_gives_the_same_losses(tmp_path):
    c = smoke(eval_examples=0)
    loop.train(c, str(tmp_path / "full"))
    loop.train(c, str(tmp_path / "split"), stop_after=2)  # checkpoint at step 2, then "killed"
    loop.train(c, str(tmp_path / "split"))  # a fresh stage, sampler and rollout manager resume from it
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "split")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4]
    for key in ("loss", "reward", "response_length", "mean_abs_log_ratio", "entropy", "masked_fraction"):
        np.testing.assert_array_equal([m[key] for m in a], [m[key] for m in b], err_msg=key)
    assert any(m["carried_episodes"] > 0 for m in a)  # partial rollouts were carried across iterations
    for m in a:
        assert 0.0 <= m["reward"] <= 1.0 and m["response_length"] > 0 and m["tool_call_rate"] == 0.0
        assert m["num_tokens"] > 0 and np.isfinite(m["loss"])
    # sampler and trainer hold the same float32 weights: at step 1 every token is on-policy, ratio ~1; later
    # steps train on tokens carried over from older weights too
    assert a[0]["mean_abs_log_ratio"] < 1e-4 and a[0]["masked_fraction"] == 0.0
    assert a[0]["max_staleness"] == 0 and max(m["max_staleness"] for m in a) >= 1


def test_loss_fn_matches_policy_loss_on_the_batch(tmp_path):
    """The stage's loss: Eq. 1 on the logprobs of the batch's targets, as a sum over N; its gradient
    accumulated over two microbatches equals the full batch's."""
    c = smoke()
    stage = RLStage(c)
    model = stage.build_model(__import__("flax").nnx.Rngs(0))
    rng = np.random.default_rng(0)
    B, T = c.batch_size, c.seq_len
    batch = {"input_ids": rng.integers(0, 250, (B, T)).astype(np.int32),
             "targets": rng.integers(0, 250, (B, T)).astype(np.int32),
             "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
             "segment_ids": np.ones((B, T), np.int32),
             "loss_mask": (rng.random((B, T)) < 0.3).astype(np.int32),
             "old_logp": -rng.random((B, T)).astype(np.float32) * 6,
             "advantages": rng.normal(size=(B, T)).astype(np.float32)}
    batch["n_total"] = np.full((B,), batch["loss_mask"].sum(), np.float32)
    loss_sum, aux = stage.loss_fn(model, batch)
    logits = model(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"]).logits
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), batch["targets"][..., None], -1)[..., 0]
    ref, stats = policy_loss(logp, batch["old_logp"], batch["advantages"], batch["loss_mask"],
                             **stage.loss_cfg.kwargs())
    np.testing.assert_allclose(loss_sum / aux["num_tokens"], ref, rtol=1e-5)
    np.testing.assert_allclose(aux["masked_fraction"], stats["masked_fraction"], rtol=1e-5)
    halves = [{k: v[i * B // 2:(i + 1) * B // 2] for k, v in batch.items()} for i in range(2)]
    parts = [stage.loss_fn(model, h) for h in halves]
    np.testing.assert_allclose(sum(p[0] for p in parts) / sum(p[1]["num_tokens"] for p in parts), ref, rtol=1e-5)
    np.testing.assert_allclose(sum(p[1]["mean_abs_log_ratio"] for p in parts), stats["mean_abs_log_ratio"],
                               rtol=1e-5)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="batch_size"):
        RLStage(smoke(batch_size=6))
    c = smoke()
    c.rl.format = "xml"
    with pytest.raises(ValueError, match="rl.format"):
        RLStage(c)


def test_the_run_seed_reaches_the_rollout_sampling():
    """Runs that differ only in `config.seed` sample different rollouts; seed 0 keeps `rl.rollout.seed` as set
    (so earlier runs reproduce), and the rollout seed still shifts the sampling on its own."""
    base = RLStage(smoke(seed=0)).rollout_cfg.seed
    assert base == smoke().rl.rollout.seed
    seeds = {RLStage(smoke(seed=s)).rollout_cfg.seed for s in (0, 1, 2)}
    assert len(seeds) == 3
    c = smoke(seed=1)
    c.rl.rollout.seed = 5
    assert RLStage(c).rollout_cfg.seed != RLStage(smoke(seed=1)).rollout_cfg.seed
