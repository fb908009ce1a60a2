"""experiments.swarm_run against a scripted OpenAI-compatible endpoint, and subagents behind an endpoint that
errors, stalls or answers garbage."""

import asyncio
import json
import re

import pytest
from absl import app
from fastapi.responses import JSONResponse, PlainTextResponse
from swarm_endpoint import make_app, serve

from k25.infer.client import OpenAIClient, ScriptedClient
from k25.swarm import SwarmConfig
from k25.swarm.evaluate import evaluate
from k25.swarm.policies import scripted_policy
from k25.swarm.tasks import SwarmEnv


def run_cli(capsys, *argv):
    """`python -m experiments.swarm_run ARGV` in this process; (per-episode rows, summary)."""
    from absl import flags

    from experiments import swarm_run

    flags.FLAGS.unparse_flags()
    flags.FLAGS(["swarm_run", *argv])
    try:
        swarm_run.main(["swarm_run"])
    finally:
        flags.FLAGS.unparse_flags()
    stdout = capsys.readouterr().out
    start = stdout.index("{\n")
    return [json.loads(line) for line in stdout[:start].splitlines() if line.strip()], json.loads(stdout[start:])


def test_swarm_run_cli_swarm_and_single_agent(tmp_path, capsys):
    app = make_app(scripted_policy())
    with serve(app) as url:
        args = ["--endpoint", url, "--model", "scripted", "--num_tasks", "1", "--concurrency", "3",
                "--tasks", "wide_search,deep_search,long_doc"]
        rows, summary = run_cli(capsys, *args, "--out", str(tmp_path / "t.jsonl"), "--keep_subagent_messages")
        rows1, summary1 = run_cli(capsys, *args, "--single_agent")
    assert [r["kind"] for r in rows] == ["wide_search", "deep_search", "long_doc"]
    assert summary["mode"] == "swarm" and summary1["mode"] == "single_agent"
    for s in (summary, summary1):
        assert s["overall"]["success"] == 1.0 and s["wide_search"]["item_f1"] == s["wide_search"]["row_f1"] == 1.0
        assert s["overall"]["unfinished"] == 0
    assert summary["overall"]["subagents_per_episode"] > 1 and summary1["overall"]["subagents_per_episode"] == 0
    for kind in ("wide_search", "deep_search", "long_doc"):
        assert summary[kind]["critical_steps"] < summary1[kind]["critical_steps"]
    traces = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert len(traces) == 3 and traces[0]["trace"]["critical_steps"] == rows[0]["critical_steps"]
    assert all(s["main_steps"] == 1 for s in traces[0]["trace"]["stages"])
    sub = traces[0]["trace"]["stages"][2]["subagents"][0]
    assert sub["messages"][0]["role"] == "system" and sub["messages"][-1]["content"] == sub["answer"]
    assert app.state.requests > 20


def test_cli_rejects_unknown_task_kind(capsys):
    with pytest.raises(app.UsageError, match=re.escape("--tasks: unknown kind(s) ['browse']")):
        run_cli(capsys, "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--tasks", "browse")


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydantic, on the garbage completion
def test_subagents_behind_a_broken_endpoint_fail_their_tasks_only():
    env = SwarmEnv(0)
    task = env.tasks("long_doc", "heldout", 1)[0]
    policy = scripted_policy(pages_per_agent=2)
    modes = iter(["http500", "garbage_json", "not_json", "stall"])

    async def broken(messages, tools):
        mode = next(modes, "ok")
        if mode == "http500":
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        if mode == "garbage_json":
            return JSONResponse({"choices": "nope"})
        if mode == "not_json":
            return PlainTextResponse("<<<garbage>>>")
        if mode == "stall":
            await asyncio.sleep(2.5)
        return policy(messages, tools)

    with serve(make_app(broken)) as url:
        sub = OpenAIClient("scripted", base_url=url, timeout_s=2.0, max_retries=0)
        cfg = SwarmConfig(sub_timeout_s=1.0, episode_timeout_s=60)
        rows, traces = asyncio.run(evaluate([task], env.tools(), orchestrator=ScriptedClient(policy), subagent=sub,
                                            config=cfg))
    trace = traces[0]
    waves = [s for s in trace.stages if s["sub_steps"]]
    first = waves[0]["subagents"]
    assert len(first) == (task.info["pages"] + 1) // 2 >= 4
    # the first four requests (the first turns of four subagents) each hit one failure mode
    assert [r["status"] for r in first].count("done") == len(first) - 4
    assert sorted(r["status"] for r in first if r["status"] != "done") == ["error", "error", "error", "timeout"]
    errors = [m["content"] for m in trace.messages if m["role"] == "tool" and m["content"].startswith("Error")]
    assert errors and all(e.startswith("Error: task failed: subagent 'researcher'") for e in errors)
    assert trace.status == "done" and rows[0]["failed_subagents"] == 4
    # the orchestrator reassigned the failed subtasks once; with the endpoint healthy again it succeeds
    assert rows[0]["success"] == 1.0
