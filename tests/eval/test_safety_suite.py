"""The safety suite end to end, offline: inspect's mockllm, the k25 provider over a scripted ChatClient, and
a scripted OpenAI-compatible endpoint (127.0.0.1, bounded) behind `--model openai/NAME` and the report CLI."""

import json
import os
import sys

import pytest
from inspect_ai import eval as inspect_eval
from inspect_ai.model import ModelUsage, get_model, messages_to_openai, model_output_from_openai

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "swarm"))

import safety_policies as P  # noqa: E402
from swarm_endpoint import make_app, serve  # noqa: E402

from k25.eval.provider import completion_dict, openai_tools  # noqa: E402
from k25.eval.safety.report import gaps, sample_rows, summarize  # noqa: E402
from k25.eval.safety.tasks import SAFETY_TASKS  # noqa: E402
from k25.infer.client import ChatResult, ScriptedClient, assistant_message  # noqa: E402


def mock_model(policy, name="model"):
    """inspect's mockllm answering with `policy` over OpenAI-style messages (usage set: no tokenizer download)."""

    async def outputs(input, tools, tool_choice, config):
        msg = policy([dict(m) for m in await messages_to_openai(input)], openai_tools(tools) or None)
        msg = assistant_message(msg) if isinstance(msg, str) else msg
        out = await model_output_from_openai(completion_dict(ChatResult(msg, "stop"), "mockllm/model"))
        out.usage = ModelUsage(input_tokens=1, output_tokens=1, total_tokens=2)
        return out

    return get_model(f"mockllm/{name}", custom_outputs=outputs)


def run_suite(model, log_dir, names=tuple(SAFETY_TASKS), **task_args):
    tasks = [SAFETY_TASKS[n](**({} if n in ("agentic_alignment", "cyber_capability") else task_args))
             for n in names]
    logs = inspect_eval(tasks, model=model, log_dir=str(log_dir), display="none", max_connections=16)
    return [row for log in logs for row in sample_rows(log)]


def rates(rows):
    return {c: s["refusal_rate"] for c, s in summarize(rows).items()}


def test_mockllm_rates(tmp_path):
    """Always-refuse: refusal 1.0 everywhere and over-refusal 1.0; always-comply: 0 and 0; mixed: the exact
    rates its script implies, per category. One inspect run over the three models."""
    names = ["refuse", "comply", "mixed"]
    tasks = [f() for f in SAFETY_TASKS.values()]
    logs = inspect_eval(tasks, model=[mock_model(P.POLICIES[n], n) for n in names], log_dir=str(tmp_path),
                        display="none", max_connections=16)
    assert len(logs) == len(tasks) * len(names)
    for policy in names:
        rows = [row for log in logs if log.eval.model == f"mockllm/{policy}" for row in sample_rows(log)]
        got = rates(rows)
        assert got == pytest.approx(P.expected(policy), abs=0), policy
        s = summarize(rows)
        for stats in s.values():
            assert stats["judge_n"] == 0 and stats["rule_refusal_rate"] == stats["refusal_rate"]
        if policy == "refuse":
            assert set(got.values()) == {1.0} and got["over_refusal"] == 1.0
            assert all(st["stderr"] == 0.0 for st in s.values())
        elif policy == "comply":  # takes every opportunity, picks no option
            assert set(got.values()) == {0.0} and got["over_refusal"] == 0.0
            assert all(r["opportunity_taken"] for r in rows if r["kind"] == "agentic")
            assert s["social_bias"]["bias_rate"] == 0.0 and s["social_bias"]["accuracy"] == 0.0
        else:
            assert len(set(got.values())) > 2  # the script really mixes
            assert any(0 < v < 1 and s[c]["stderr"] > 0 for c, v in got.items())


def test_k25_provider_scripted_client_matches_mockllm(tmp_path):
    """The k25 model API (inspect -> OpenAI dicts -> ChatClient -> back), tool loop and choices included."""
    model = get_model("k25/scripted", client=ScriptedClient(P.mixed), memoize=False)
    rows = run_suite(model, tmp_path, ("agentic_alignment", "social_bias", "over_refusal", "sycophancy_delusion"))
    got = rates(rows)
    assert got == pytest.approx({c: v for c, v in P.expected("mixed").items() if c in got}, abs=0)
    assert len(got) == 6
    agentic = [r for r in rows if r["kind"] == "agentic"]
    assert any(r["opportunity_taken"] for r in agentic) and not all(r["opportunity_taken"] for r in agentic)
    taken = next(r for r in agentic if r["opportunity_taken"])
    assert taken["tool_calls"][:2] == ["list_files", "read_file"] and taken["tool_calls"][-1] == "submit"


def test_gaps_and_stderr_from_rows():
    rows = [{"category": "censorship_en", "lang": "en", "control": False, "refusal": 0.0},
            {"category": "censorship_en", "lang": "en", "control": False, "refusal": 1.0},
            {"category": "censorship_zh", "lang": "zh", "control": False, "refusal": 1.0},
            {"category": "censorship_zh", "lang": "zh", "control": False, "refusal": 1.0},
            {"category": "political_bias_en", "lang": "en", "side": "a", "refusal": 0.0},
            {"category": "political_bias_en", "lang": "en", "side": "b", "refusal": 1.0}]
    g = gaps(rows)
    assert g["censorship_zh_minus_en"]["value"] == 0.5
    assert g["censorship_zh_minus_en"]["stderr"] == pytest.approx(0.5)  # sqrt(0.5/2) + 0 in quadrature
    assert g["political_bias_en"] == {"value": 1.0, "stderr": 0.0, "n": [1, 1]}
    assert "censorship_control_zh_minus_en" not in g


TASKS = ["over_refusal", "cbrne_uplift", "agentic_alignment", "censorship_bias"]


@pytest.mark.slow  # three models x four tasks over HTTP, plus a judge call per sample (~40 s idle)
def test_safety_report_scripted_endpoint_with_judge(tmp_path, monkeypatch):
    """`python -m experiments.safety_report` against a scripted OpenAI-compatible endpoint: three models and a
    GRM judge on the same endpoint; exact rates, judge-rule agreement 1.0, table and plots written."""
    from experiments import safety_report

    def policy(messages, tools):
        if "strict, fair grader" in str(messages[0]["content"]):
            return P.judge(messages, tools)
        return P.POLICIES[current[0]](messages, tools)

    app = make_app(policy)
    current = ["refuse"]

    @app.middleware("http")
    async def route_by_model(request, call_next):  # the request's model name picks the policy
        body = json.loads(await request.body())
        current[0] = body["model"] if body["model"] in P.POLICIES else current[0]
        return await call_next(request)

    with serve(app, max_requests=3000) as url:
        monkeypatch.setenv("OPENAI_BASE_URL", url)
        monkeypatch.setenv("OPENAI_API_KEY", "test")
        report = safety_report.main(["--models", "openai/refuse", "openai/comply", "openai/mixed", "--workdir",
                                     str(tmp_path), "--judge", "openai/judge", "--tasks", *TASKS])
    assert app.state.requests < 3000
    on_disk = json.load(open(tmp_path / "report.json"))
    assert on_disk == json.loads(json.dumps(report))
    for policy in ("refuse", "comply", "mixed"):
        got = {c: s["refusal_rate"] for c, s in on_disk[f"openai/{policy}"].items()}
        want = {c: v for c, v in P.expected(policy).items() if c in got}
        assert got == pytest.approx(want, abs=0) and len(got) == 8
        for c, s in on_disk[f"openai/{policy}"].items():
            assert set(s) >= {"refusal_rate", "stderr", "n"}
            if c in ("sabotage", "self_replication", "cyber_capability"):
                assert s["judge_n"] == 0  # decided by the recorded actions / the flag
            else:
                assert s["judge_n"] == s["n"] and s["judge_rule_agreement"] == 1.0
    assert on_disk["openai/refuse"]["over_refusal"]["refusal_rate"] == 1.0
    assert on_disk["openai/comply"]["over_refusal"]["refusal_rate"] == 0.0
    for f in ("report.md", "gaps.json", "refusal.png", "over_refusal.png", "gaps.png", "agreement.png"):
        assert (tmp_path / f).stat().st_size > 0
    table = (tmp_path / "report.md").read_text()
    assert "| over_refusal |" in table and "`openai/mixed`" in table and "judge-rule agreement" in table
