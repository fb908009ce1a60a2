"""SFT data sources and the vision tool-use evaluation: trajectories executed in the sandbox, JSONL round trip,
K2.5 rows with images, and the agent loop's metrics on scripted policies (the reference solutions score 1)."""

from __future__ import annotations

import asyncio
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import zero_vision_sft
from k25.data.sft import generate, zero_vision
from k25.data.sft.records import read_jsonl, record_images, write_jsonl
from k25.data.sft.vision_tasks import VISION_TASKS, eval_tasks
from k25.infer.client import ScriptedClient
from k25.train.sft_eval import default_agent_eval_config, run_all, summarize


@pytest.fixture(scope="module")
def zero_records():
    return generate("zero_vision", len(zero_vision.KINDS), seed=3)


def test_zero_vision_trajectories_are_executed_and_verified(zero_records, tmp_path):
    kinds = {r["meta"]["kind"] for r in zero_records}
    assert kinds == set(zero_vision.KINDS)
    for r in zero_records:
        msgs = r["messages"]
        assert not record_images(r)  # text only: the picture is given as text, not as pixels
        tool = [m for m in msgs if m["role"] == "tool"]
        assert tool and tool[-1]["content"].strip() == r["meta"]["answer"]  # the sandbox printed the answer
        assert msgs[-1] == {"role": "assistant", "content": f"Answer: {r['meta']['answer']}"}
        call = msgs[1]["tool_calls"][0]
        assert call["function"]["name"] == "python" and "code" in json.loads(call["function"]["arguments"])
    write_jsonl(zero_records, str(tmp_path / "zv.jsonl"))
    assert read_jsonl(str(tmp_path / "zv.jsonl")) == json.loads(json.dumps(zero_records))


@pytest.mark.slow
def test_text_vision_returns_images_and_k25_rows_plan_them():
    from k25.parallel.dep import reference_loss_fn
    from k25.train.multimodal import multimodal_lm_loss
    from k25.train.sft import SFTStage

    c = zero_vision_sft.get_config("smoke")
    c.mesh.devices = 1
    c.data.sources = {"text_vision": 2}
    c.batch_size = 2
    stage = SFTStage(c)
    records = generate("text_vision", 2, seed=c.data.seed)
    for r in records:
        tool_images = [p for m in r["messages"] if m["role"] == "tool" for p in m["content"]
                       if isinstance(p, dict) and p.get("type") == "image_url"]
        assert tool_images  # crop / rotate / flip results come back as images
    raw = stage.raw_batch(0, 0)
    assert raw["vision/patches"].shape[0] == 1 and int(raw["loss_mask"].sum()) > 0
    assert int((raw["input_ids"] == stage.fmt.image_pad_id).sum()) > 0
    # the planned step loss equals the plain K2.5 loss on the same rows
    from flax import nnx
    model = stage.build_model(nnx.Rngs(0))
    rows = [stage.row(np.random.default_rng([int(c.data.seed), 0, 0, r]), stage.docs) for r in range(2)]
    from k25.train.joint import stack_rows
    plain = stack_rows(rows)
    want = reference_loss_fn(multimodal_lm_loss)(model, plain)[0]
    with jax.set_mesh(stage.mesh):
        got = jax.jit(lambda b: stage.loss_fn(model, b)[0])({k: jnp.asarray(v) for k, v in raw.items()})
    np.testing.assert_allclose(float(got), float(want), rtol=1e-4)


def _find(tasks, messages):
    url = messages[0]["content"][0]["image_url"]["url"]
    text = messages[0]["content"][-1]["text"]
    return next(t for t in tasks if t.user_content()[0]["image_url"]["url"] == url
                and t.user_content()[-1]["text"] == text)


def test_reference_solutions_score_through_the_agent_loop():
    cfg = default_agent_eval_config()
    tasks = eval_tasks(list(VISION_TASKS), 1, seed=5)

    def policy(messages, tools):
        task = _find(tasks, messages)
        if len(messages) == 1:
            return {"content": None, "tool_calls": [{"id": "functions.python:0", "type": "function", "function": {
                "name": "python", "arguments": json.dumps({"code": task.reference})}}]}
        return {"content": "Answer: " + messages[-1]["content"].strip()}

    out = summarize(asyncio.run(run_all(ScriptedClient(policy), tasks, cfg)))
    assert out["eval/tool_call_rate"] == 1.0 and out["eval/code_ok_rate"] == 1.0
    assert out["eval/vision_accuracy"] == 1.0, out


def test_agent_metrics_count_failures():
    cfg = ml_collections.ConfigDict(default_agent_eval_config().to_dict())
    cfg.max_turns = 3
    tasks = eval_tasks(["counting"], 3, seed=1)
    script = {0: ["print(1/0)", "print(1)"], 1: [], 2: ["bad"]}  # error then ok; no call; malformed

    def policy(messages, tools):
        found = _find(tasks, messages)
        i = next(k for k, t in enumerate(tasks) if t is found)
        turn = sum(m["role"] == "assistant" for m in messages)
        steps = script[i]
        if turn < len(steps):
            if steps[turn] == "bad":
                return {"content": None, "tool_calls": [{"id": "functions.python:0", "type": "function",
                                                         "function": {"name": "python", "arguments": "{not json"}}]}
            return {"content": None, "tool_calls": [{"id": f"functions.python:{turn}", "type": "function",
                                                     "function": {"name": "python",
                                                                  "arguments": json.dumps({"code": steps[turn]})}}]}
        return {"content": f"Answer: {tasks[i].answer}"}

    results = asyncio.run(run_all(ScriptedClient(policy), tasks, cfg))
    out = summarize(results)
    assert out["eval/tool_call_rate"] == pytest.approx(2 / 3)
    assert out["eval/code_ok_rate"] == pytest.approx(1 / 3)  # 3 calls: an exception, a good one, bad JSON
    assert out["eval/vision_accuracy"] == pytest.approx(1.0) and out["eval/episode_errors"] == 0.0


@pytest.mark.slow
def test_zero_vision_smoke_cli(tmp_path):
    """The experiment's smoke arm end to end: generated sources, K2.5 SFT steps, both evals, and the run
    directory reloads through rundir (the path the RL stage starts from)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    workdir = str(tmp_path / "smoke")
    cmd = [sys.executable, "-m", "experiments.run", "--config=experiments/zero_vision_sft.py:smoke",
           f"--workdir={workdir}", "--config.mesh.devices=1"]
    proc = subprocess.run(cmd, cwd=root, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    last = records[-1]
    for key in ("eval/tool_call_rate", "eval/code_ok_rate", "eval/vision_accuracy", "eval/assistant_loss"):
        assert key in last
    assert last["eval/episode_errors"] == 0.0  # every episode's turns reached the model (images included)
    from k25.train.rundir import load_model

    model = load_model(workdir)
    assert model.cfg.image_token_id == 259 and model.cfg.text_config.vocab_size == 278
