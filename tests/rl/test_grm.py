"""The GRM judge against scripted judges (good, malformed, failing backends) and an OpenAI-compatible endpoint
on 127.0.0.1; per-task reward specs combining rule-based and GRM rewards."""

import asyncio
import socket
import threading
import time

import pytest

from k25.infer.client import OpenAIClient, ScriptedClient
from k25.rl.rewards import GRMJudge, JudgeError, RewardSpec, compute_reward, parse_score

RUBRIC = "The response names the capital of France and nothing false."


def run(coro):
    return asyncio.run(coro)


def test_parse_score():
    assert parse_score("Good.\nScore: 7", 0, 10) == 7.0
    assert parse_score("Score: 3 ... on reflection Score: 8", 0, 10) == 8.0  # the last one counts
    assert parse_score('{"reason": "ok", "score": 6.5}', 0, 10) == 6.5
    assert parse_score("**Score:** 9/10", 0, 10) == 9.0  # markdown bold
    assert parse_score("Score: **9**", 0, 10) == 9.0
    assert parse_score("Score: 9/10", 0, 10) == 9.0
    assert parse_score("Score: 4/5", 0, 10) is None  # another scale
    assert parse_score("Score: 15", 0, 10) is None  # out of range
    assert parse_score("It scored well", 0, 10) is None
    assert parse_score("", 0, 10) is None


def test_judge_scores_and_sees_the_rubric():
    seen = []

    def judge_fn(messages, tools):
        seen.append(messages)
        return "The answer is correct and concise.\nScore: 8"

    client = ScriptedClient(judge_fn, model="judge")
    j = run(GRMJudge(client, rubric=RUBRIC).judge("What is the capital of France?", "Paris.", reference="Paris"))
    assert j.score == pytest.approx(0.8) and j.raw_score == 8.0 and j.attempts == 1 and not j.failed
    text = seen[0][0]["content"]
    assert RUBRIC in text and "What is the capital of France?" in text and "Paris." in text and "REFERENCE" in text
    j = run(GRMJudge(ScriptedClient(lambda m, t: "Score: 4"), rubric=RUBRIC, score_range=(1, 5)).judge("q", "a"))
    assert j.score == pytest.approx((4 - 1) / (5 - 1))
    assert "from 1 to 5" in GRMJudge(client, rubric=RUBRIC, score_range=(1, 5)).messages("q", "a")[0]["content"]


def test_malformed_then_valid_retries_with_correction():
    replies = iter(["I think it's fine.", "Score: eleven", "Score: 6"])
    conversations = []

    def judge_fn(messages, tools):
        conversations.append(list(messages))
        return next(replies)

    j = run(GRMJudge(ScriptedClient(judge_fn), rubric=RUBRIC, max_retries=2).judge("q", "a"))
    assert j.score == pytest.approx(0.6) and j.attempts == 3
    # each retry shows the judge its bad reply and asks for the score line
    assert len(conversations[1]) == 3 and conversations[1][1]["content"] == "I think it's fine."
    assert "Score: N" in conversations[1][2]["content"]
    assert len(conversations[2]) == 5


def test_always_malformed_fails_clearly_or_falls_back():
    client = ScriptedClient(lambda m, t: "No score from me.", model="stubborn")
    with pytest.raises(JudgeError, match=r"stubborn.*3 attempt.*No score from me"):
        run(GRMJudge(client, rubric=RUBRIC, max_retries=2).judge("q", "a"))
    assert client.calls == 3
    j = run(GRMJudge(client, rubric=RUBRIC, max_retries=0, fallback=0.0).judge("q", "a"))
    assert j.failed and j.score == 0.0 and j.attempts == 1


def test_backend_errors_are_retried():
    calls = {"n": 0}

    def flaky(messages, tools):
        calls["n"] += 1
        if calls["n"] < 3:
            raise ConnectionError("endpoint down")
        return "Score: 10"

    j = run(GRMJudge(ScriptedClient(flaky), rubric=RUBRIC, max_retries=2).judge("q", "a"))
    assert j.score == 1.0 and j.attempts == 3
    def down(messages, tools):
        raise ConnectionError("endpoint down")

    with pytest.raises(JudgeError, match="backend error.*endpoint down"):
        run(GRMJudge(ScriptedClient(down), rubric=RUBRIC).judge("q", "a"))


def test_judge_config_errors():
    client = ScriptedClient(lambda m, t: "Score: 1")
    with pytest.raises(ValueError, match="rubric"):
        run(GRMJudge(client).judge("q", "a"))
    with pytest.raises(ValueError, match="score_range"):
        GRMJudge(client, score_range=(5, 5))
    with pytest.raises(ValueError, match="fallback"):
        GRMJudge(client, fallback=3.0)


def test_reward_spec_combines_rules_and_grm():
    judge = GRMJudge(ScriptedClient(lambda m, t: "Score: 5"), rubric=None)
    spec = RewardSpec({"exact_match": 3.0, "grm": 1.0}, rubric=RUBRIC)
    res = run(compute_reward(spec, "Answer: Paris", "Paris", prompt="capital?", judge=judge))
    assert res.components == {"exact_match": 1.0, "grm": 0.5}
    assert res.reward == pytest.approx((3 * 1.0 + 1 * 0.5) / 4)
    # gated on the verifier: a wrong answer gets 0 and the judge is not called
    calls = []
    judge = GRMJudge(ScriptedClient(lambda m, t: calls.append(1) or "Score: 10"))
    spec = RewardSpec({"exact_match": 1.0, "grm": 1.0}, rubric=RUBRIC, gate="exact_match")
    res = run(compute_reward(spec, "Answer: Lyon", "Paris", judge=judge))
    assert res.reward == 0.0 and res.gated and "grm" not in res.components and not calls
    res = run(compute_reward(spec, "Answer: Paris", "Paris", judge=judge))
    assert res.reward == 1.0 and len(calls) == 1
    # vision terms with kwargs, parsed from the response text
    spec = RewardSpec({"grounding_f1": 1.0}, kwargs={"grounding_f1": {"iou_threshold": 0.5}})
    res = run(compute_reward(spec, "Answer: [(0, 0, 10, 10), (20, 20, 30, 30)]", [(0, 0, 10, 10)]))
    assert res.reward == pytest.approx(2 / 3)
    spec = RewardSpec({"counting_score": 1.0})
    assert run(compute_reward(spec, "3 things. Answer: 3", 4)).components["counting_score"] == pytest.approx(0.75)
    # per-call kwargs reach the rule (here: a sandbox stand-in that fails everything)
    class Failing:
        def run(self, code):
            return type("R", (), {"error": "boom"})()

    spec = RewardSpec({"code_tests": 1.0})
    res = run(compute_reward(spec, "```python\nx = 1\n```", ["assert x == 1"],
                             rule_kwargs={"code_tests": {"sandbox": Failing()}}))
    assert res.reward == 0.0
    with pytest.raises(ValueError, match="rule_kwargs"):
        run(compute_reward(spec, "x", ["assert 1"], rule_kwargs={"exact_match": {}}))
    # the judge alone (an open-ended task)
    res = run(compute_reward(RewardSpec({"grm": 1.0}, rubric=RUBRIC), "Paris",
                             judge=GRMJudge(ScriptedClient(lambda m, t: "Score: 7"))))
    assert res.reward == pytest.approx(0.7)


def test_reward_spec_validation():
    with pytest.raises(ValueError, match="unknown reward 'exactmatch'"):
        RewardSpec({"exactmatch": 1.0})
    with pytest.raises(ValueError, match="rubric"):
        RewardSpec({"grm": 1.0})
    with pytest.raises(ValueError, match="gate"):
        RewardSpec({"exact_match": 1.0}, gate="math_answer")
    with pytest.raises(ValueError, match="weights"):
        RewardSpec({"exact_match": 0.0})
    with pytest.raises(ValueError, match="unknown field"):
        RewardSpec.from_mapping({"weights": {"exact_match": 1.0}, "rubrik": "x"})
    with pytest.raises(ValueError, match="no judge"):
        run(compute_reward(RewardSpec({"grm": 1.0}, rubric=RUBRIC), "a"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_judge_over_openai_compatible_endpoint():
    """A minimal OpenAI-compatible server on 127.0.0.1 (FastAPI + uvicorn) answering as a judge: first a
    malformed judgment, then a valid one; the judge goes through `OpenAIClient` like any served model."""
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI()
    requests = []

    @app.post("/v1/chat/completions")
    async def completions(body: dict):
        requests.append(body)
        content = "Looks right." if len(requests) == 1 else "Reasoning.\nScore: 9"
        return {"id": f"c{len(requests)}", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "test server did not start"
            time.sleep(0.05)
        client = OpenAIClient("judge-model", base_url=f"http://127.0.0.1:{port}/v1", timeout_s=10, max_retries=0,
                              token_ids=False)
        judge = GRMJudge(client, rubric=RUBRIC, max_retries=1,
                         chat_kwargs={"chat_template_kwargs": {"thinking": False}})
        j = run(judge.judge("capital?", "Paris"))
        assert j.score == pytest.approx(0.9) and j.attempts == 2 and len(requests) == 2
        assert requests[0]["temperature"] == 0.0 and RUBRIC in requests[0]["messages"][0]["content"]
        assert requests[0]["chat_template_kwargs"] == {"thinking": False}
        assert requests[1]["messages"][1] == {"role": "assistant", "content": "Looks right."}
    finally:
        server.should_exit = True
        thread.join(timeout=10)
