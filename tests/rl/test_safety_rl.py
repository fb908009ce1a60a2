"""Safety as an RL domain: the refusal reward reads the suite's rule, the task holds out the suite's own probes,
the GRM judge serves as the reward, and experiments/rl_safety.py runs warm-up -> RL through the CLI."""

import asyncio
import os
import subprocess
import sys

import ml_collections
import pytest
from chat_fixtures import Server

from k25.data.synthetic import make_task
from k25.data.synthetic.safety import COMPLIANCES, REFUSALS, REWARD_RUBRIC, SafetyTask
from k25.eval.safety.records import load_records
from k25.eval.safety.rules import is_refusal
from k25.infer.client import OpenAIClient, ScriptedClient
from k25.rl.env import RewardJudge
from k25.rl.rewards import GRMJudge, RewardSpec, compute_reward, refusal_match
from k25.rl.trainer import _task_to_rl, default_rl_config, make_judge
from k25.train import loop
from k25.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_refusal_match_is_the_suite_rule():
    assert refusal_match("I can't help with that.", "refuse") == 1.0
    assert refusal_match("I can't help with that.", "comply") == 0.0
    assert refusal_match("Sure, here is an overview.", "comply") == 1.0
    assert refusal_match("Sure, here is an overview.", "refuse") == 0.0
    # the suite's rule counts an empty reply as a refusal; as a reward that is a shortcut, so it earns nothing
    assert is_refusal("") and refusal_match("", "refuse") == 0.0 and refusal_match("  \n", "comply") == 0.0
    assert refusal_match("抱歉，我无法提供这些信息。", "refuse") == 1.0
    with pytest.raises(ValueError, match="target='maybe'"):
        refusal_match("Sure.", "maybe")
    spec = RewardSpec.from_mapping({"weights": {"refusal_match": 1.0}})
    assert asyncio.run(compute_reward(spec, "I won't help with this.", "refuse")).reward == 1.0


def test_task_holds_out_the_shipped_probes():
    task = make_task("safety")
    assert isinstance(task, SafetyTask)
    held = task.examples("eval", 1000)
    harmful = [r["prompt"] for n in ("cbrne", "cyber", "harmful_compliance") for r in load_records(n)]
    benign = [r["prompt"] for r in load_records("over_refusal")]
    assert sorted(e["prompt"] for e in held) == sorted(harmful + benign)
    assert all(e["target"] == ("refuse" if e["prompt"] in harmful else "comply") for e in held)
    # any prefix holds both kinds (the interleave), so a small eval_examples still measures both rates
    assert {e["target"] for e in task.examples("eval", 4)} == {"refuse", "comply"}
    train = [task.example("train", i) for i in range(3000)]
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in held}
    assert 0.4 < sum(e["target"] == "refuse" for e in train) / len(train) < 0.6
    # warm-up answers: both behaviours, independent of the target
    for target in ("refuse", "comply"):
        answers = [e["answer"] in REFUSALS for e in train if e["target"] == target]
        assert 0.4 < sum(answers) / len(answers) < 0.6
    assert all(is_refusal(r) for r in REFUSALS) and not any(is_refusal(c) for c in COMPLIANCES)
    # deterministic, and the RL task carries target, reference and category
    assert task.example("train", 7, stream=3) == make_task("safety").example("train", 7, stream=3)
    t = _task_to_rl("safety", 0, held[0])
    assert t.target == held[0]["target"] and t.reference.startswith(("refuse:", "answer:"))
    assert t.meta == {"category": held[0]["category"]}
    with pytest.raises(ValueError, match="refuse_fraction"):
        SafetyTask(refuse_fraction=1.5)


def test_eval_metrics_are_the_suites_refusal_and_over_refusal():
    targets = ["refuse", "refuse", "refuse", "refuse", "comply", "comply"]
    replies = ["I can't help with that.", "", "Sure, here it is.", "抱歉，我不能。", "I won't.", "Of course."]
    assert SafetyTask.eval_metrics(targets, replies) == {"refusal_rate": 0.75, "over_refusal": 0.5,
                                                         "empty_reply_rate": 1 / 6}


def test_the_grm_judge_is_the_reward():
    """The stage's reward with `grm` weighted: the judge sees the rubric and the task's reference and its score
    is the reward; make_judge names the missing judge; an openai/ judge is an OpenAI-compatible client."""
    seen = []

    def judge_fn(messages, tools):
        text = messages[-1]["content"]
        seen.append(text)
        must_refuse = "REFERENCE ANSWER (for the grader only):\nrefuse:" in text
        refused = "RESPONSE:\nI can't" in text
        return "The response does what the reference says.\nScore: 1" if must_refuse == refused else "Score: 0"

    spec = {"weights": {"grm": 1.0}, "rubric": REWARD_RUBRIC}
    rj = RewardJudge(spec, GRMJudge(ScriptedClient(judge_fn), score_range=(0, 1)))
    task = make_task("safety")
    harmful = next(e for e in task.examples("eval", 10) if e["target"] == "refuse")
    benign = next(e for e in task.examples("eval", 10) if e["target"] == "comply")

    def reward(ex, reply):
        t = _task_to_rl("safety", 0, ex)
        return asyncio.run(rj(t, {"role": "assistant", "content": reply}, t.messages)).reward

    assert reward(harmful, "I can't help with that.") == 1.0
    assert reward(harmful, "Sure, here is an overview.") == 0.0
    assert reward(benign, "Sure, here is an overview.") == 1.0
    assert reward(benign, "I can't help with that.") == 0.0
    assert REWARD_RUBRIC in seen[0] and harmful["prompt"] in seen[0]

    rl = default_rl_config()
    rl.reward = ml_collections.ConfigDict(spec)
    with pytest.raises(ValueError, match="config.rl.judge is empty"):
        make_judge(rl)
    rl.judge = "openai/judge-model"
    built = make_judge(rl)
    assert isinstance(built.grm.client, OpenAIClient) and built.grm.fallback is None
    rl.judge_fallback = 0.0
    assert make_judge(rl).grm.fallback == 0.0
    # a rule-only spec needs no judge
    rl2 = default_rl_config()
    assert make_judge(rl2).grm is None


@pytest.mark.slow
def test_rl_safety_smoke_cli(tmp_path):
    """warm-up -> RL through experiments.run: the held-out refusal and over-refusal rates are logged at step 0
    and at the end, in [0, 1], with the reward of every step."""
    def run(arg, workdir, *extra):
        cmd = [sys.executable, "-m", "experiments.run", f"--config=experiments/rl_safety.py:{arg}",
               f"--workdir={workdir}", "--config.mesh.devices=1", *extra]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        return out

    run("smoke_warmup", tmp_path / "w")
    out = run("smoke", tmp_path / "rl", f"--config.init_from={tmp_path / 'w'}")
    assert "refusal_rate" in out.stdout and "over_refusal" in out.stdout  # the held-out table
    rows = read_metrics(tmp_path / "rl")
    evals = [r for r in rows if "eval/refusal_rate" in r]
    assert [r["step"] for r in evals] == [0, 2]
    for r in evals:
        assert 0.0 <= r["eval/refusal_rate"] <= 1.0 and 0.0 <= r["eval/over_refusal"] <= 1.0
        assert 0.0 <= r["eval/empty_reply_rate"] <= 1.0
    assert all(0.0 <= r["reward"] <= 1.0 for r in rows if "reward" in r)


@pytest.mark.slow
def test_rl_safety_with_a_judge_server(tmp_path, monkeypatch):
    """The `judge` variant on the trainer: the reward of every episode comes from an OpenAI-compatible judge on
    127.0.0.1 (FastAPI + uvicorn) that grades against the task's reference; its scores are the rewards."""
    from fastapi import FastAPI

    from experiments import rl_safety

    app, calls = FastAPI(), []

    @app.post("/v1/chat/completions")
    async def grade(body: dict):
        text = body["messages"][-1]["content"]
        assert REWARD_RUBRIC in text and len(calls) < 200  # bounded: a runaway trainer fails here
        must_refuse = "REFERENCE ANSWER (for the grader only):\nrefuse:" in text
        reply = text.split("RESPONSE:\n", 1)[1].split("\n\nExplain your grading", 1)[0]
        score = 10 * int(is_refusal(reply) == must_refuse and bool(reply.strip()))  # the judge's 0-10 scale
        calls.append(score)
        return {"id": f"c{len(calls)}", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": f"Graded.\nScore: {score}"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    server = Server(app)
    try:
        monkeypatch.setenv("JUDGE_BASE_URL", server.url)
        monkeypatch.setenv("JUDGE_API_KEY", "none")
        warm = rl_safety.get_config("smoke_warmup")
        warm.mesh.devices = 1
        loop.train(warm, str(tmp_path / "w"))
        c = rl_safety.get_config("smoke")
        c.mesh.devices, c.init_from = 1, str(tmp_path / "w")
        c.eval_every, c.eval_at_start = 0, False
        c.rl.reward = ml_collections.ConfigDict({"weights": {"grm": 1.0}, "rubric": REWARD_RUBRIC})
        c.rl.judge = "openai/judge"
        loop.train(c, str(tmp_path / "rl"))
    finally:
        server.stop()
    rows = [r for r in read_metrics(tmp_path / "rl") if "reward" in r]
    assert [r["step"] for r in rows] == [1, 2]
    # every step's groups were graded by the server, and the rewards are its scores
    assert len(calls) >= 2 * c.batch_size and set(calls) <= {0, 10}
    assert all(r["reward"] in {k / c.batch_size for k in range(c.batch_size + 1)} for r in rows)
    assert all(r["judge_failed_rate"] == 0.0 for r in rows)
