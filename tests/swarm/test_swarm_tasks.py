"""Offline tasks: seeded, disjoint splits, gold consistent with the documents, search/open tools, and scripted
policies that solve every kind through the tools (the swarm in fewer critical steps than one agent)."""

import asyncio
import re

import pytest

from k25.infer.client import ScriptedClient
from k25.swarm import SwarmConfig, run_single, run_swarm
from k25.swarm.policies import ScriptedWorker, scripted_policy
from k25.swarm.scoring import parse_markdown_table
from k25.swarm.tasks import TASK_KINDS, SwarmEnv
from k25.tools.base import Toolset


@pytest.fixture(scope="module")
def env():
    return SwarmEnv(0)


def test_seeded_and_reproducible(env):
    again = SwarmEnv(0, companies_per_sector=(8, 24))
    other = SwarmEnv(1)
    for kind in TASK_KINDS:
        a, b = env.tasks(kind, "heldout", 3), again.tasks(kind, "heldout", 3)
        assert [(t.prompt, t.gold) for t in a] == [(t.prompt, t.gold) for t in b]
        assert [t.gold for t in a] != [t.gold for t in other.tasks(kind, "heldout", 3)]


def test_heldout_split_shares_no_entities_with_train(env):
    def entities(split):
        out = set()
        for t in env.tasks("wide_search", split):
            out |= {r["company"] for r in t.gold}
        for t in env.tasks("deep_search", split, 20):
            out |= set(t.info["candidates"])
        out |= {t.info["doc_id"] for t in env.tasks("long_doc", split, 20)}
        return out
    train, heldout = entities("train"), entities("heldout")
    assert train and heldout and not train & heldout
    assert len(env.tasks("wide_search", "heldout")) == len(env.tasks("wide_search", "train")) == 12


def test_gold_is_stated_by_the_documents(env):
    w, docs = env.world, {d.doc_id: d for d in env.world.docs}
    task = env.tasks("wide_search", "heldout", 1)[0]
    registry = docs[f"registry-{task.info['sector'].replace(' ', '-')}"].text
    assert [r["company"] for r in task.gold] == re.findall(r"^- (.+)$", registry, re.MULTILINE)
    for row in task.gold:
        text = docs[w.doc_of[row["company"]]].text
        for col in ("founded", "headquarters", "employees", "chief executive"):
            assert row[col] in text
    deep = env.tasks("deep_search", "heldout", 2)
    for t in deep:  # recompute the answer by hand from the documents
        vals = {}
        for c in t.info["candidates"]:
            ctext = docs[w.doc_of[c]].text
            if t.info["question"] == "oldest_ceo":
                ceo = w.companies[c].ceo
                assert ceo in ctext
                vals[c] = -int(re.search(r"born (?:in )?(\d{4})", docs[w.doc_of[ceo]].text).group(1))
            else:
                hq = w.companies[c].headquarters
                assert hq in ctext
                vals[c] = int(re.search(r"Population: (\d+)", docs[w.doc_of[hq]].text).group(1))
        assert t.gold == max(vals, key=vals.get)
    led = env.tasks("long_doc", "heldout", 1)[0]
    pages = env.index.pages[led.info["doc_id"]]
    assert len(pages) == led.info["pages"] > 3
    total = sum(int(a) for p in pages for d, a in re.findall(r"Entry \d+: (.+?) paid (\d+) crowns", p)
                if d == led.info["department"])
    assert str(total) == led.gold


def test_search_and_open_tools(env):
    tools = Toolset(env.tools())
    name = env.tasks("wide_search", "heldout", 1)[0].gold[0]["company"]
    hits = asyncio.run(tools.call("search", {"query": name}))
    assert hits.error is None and hits.text.startswith(f"[1] {name} (id: {env.world.doc_of[name]})")
    page = asyncio.run(tools.call("open", {"id": env.world.doc_of[name]}))
    assert page.text.startswith(f"{name} (id: ") and "page 1 of 1" in page.text
    assert "no document" in asyncio.run(tools.call("open", {"id": "doc-0"})).error
    assert "has pages 1-1" in asyncio.run(tools.call("open", {"id": env.world.doc_of[name], "page": 2})).error
    assert "schema" in asyncio.run(tools.call("search", {"query": "x", "top_k": 0})).error
    assert "No results" in asyncio.run(tools.call("search", {"query": "qqqqzzzz"})).text
    with pytest.raises(ValueError, match="unknown task kind"):
        env.tasks("browse", "heldout")
    with pytest.raises(ValueError, match="unknown split"):
        env.tasks("wide_search", "test")


@pytest.mark.parametrize("kind", TASK_KINDS)
def test_scripted_policies_solve_each_kind(env, kind):
    task = env.tasks(kind, "heldout", 1)[0]
    policy, tools = scripted_policy(), env.tools()
    cfg = SwarmConfig.for_benchmark("widesearch")
    swarm = asyncio.run(run_swarm(task.prompt, orchestrator=ScriptedClient(policy), subagent=ScriptedClient(policy),
                                  tools=tools, config=cfg))
    single = asyncio.run(run_single(task.prompt, agent=ScriptedClient(policy), tools=tools, config=cfg))
    assert swarm.status == single.status == "done"
    assert task.score(swarm.answer)["success"] == task.score(single.answer)["success"] == 1.0
    assert len(swarm.subagents) >= 2 and all(r["status"] == "done" for r in swarm.subagents)
    assert single.subagents == [] and single.critical_steps == single.main_steps
    assert swarm.critical_steps < single.critical_steps < swarm.total_steps + 3
    assert max(len(s["sub_steps"]) for s in swarm.stages) == len(swarm.subagents)  # one wave


def test_swarm_recovers_from_a_failed_subtask(env):
    """A subagent backend that fails its first call: the orchestrator sees a failed task, reassigns it."""
    task = env.tasks("long_doc", "heldout", 1)[0]
    policy = scripted_policy()
    failed = []

    def flaky(messages, tools):
        if not failed:
            failed.append(True)
            raise TimeoutError("upstream timeout")
        return policy(messages, tools)

    trace = asyncio.run(run_swarm(task.prompt, orchestrator=ScriptedClient(policy), subagent=ScriptedClient(flaky),
                                  tools=env.tools()))
    assert task.score(trace.answer)["success"] == 1.0
    waves = [s for s in trace.stages if s["sub_steps"]]
    assert len(waves) == 2 and waves[1]["sub_steps"] == [waves[1]["subagents"][0]["steps"]]
    assert [r["status"] for r in waves[0]["subagents"]].count("error") == 1


def test_budgeted_worker_answers_with_a_partial_table(env):
    task = env.tasks("wide_search", "heldout", 1)[0]
    n = len(task.gold)
    trace = asyncio.run(run_single(task.prompt, agent=ScriptedClient(scripted_policy(worker_budget=12)),
                                   tools=env.tools(), config=SwarmConfig(max_critical_steps=12)))
    assert trace.status == "done" and trace.critical_steps == 12
    rows = parse_markdown_table(trace.answer)
    # registry search + open (steps 1-2), search + open per company (3-10: four companies; 11 searches the
    # fifth), and step 12 answers with the four rows it has read
    assert len(rows) == 4 and [r["company"] for r in rows] == [g["company"] for g in task.gold[:4]]
    s = task.score(trace.answer)
    assert s["row_f1"] == pytest.approx(2 * 4 / (4 + n)) and s["success"] == 0.0
    with pytest.raises(ValueError, match="step_budget"):
        ScriptedWorker(0)
