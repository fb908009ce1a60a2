"""The contention setting of the width environment: unreliable subagents fail through the runtime's failed-task
path (counted as launched, not finished), the draws are reproducible, and the default (rate 0) is the old path."""

import asyncio
import math

import pytest

from k25.data.tokenizer import load_tokenizer
from k25.rl.env import PlainTurns
from k25.swarm import SwarmConfig
from k25.swarm.parl import Contention, ParlRewardConfig, ParlWidthEnv, parl_reward, run_width, width_rl_task
from k25.swarm.tasks import SwarmEnv

TOK = load_tokenizer("byte")
CFG = ParlRewardConfig(lambda1=0.3, lambda2=0.3, anneal_steps=10, parallel_target=12)
BUDGET = 40


@pytest.fixture(scope="module")
def world():
    env = SwarmEnv(0)
    return env.tools(), env.tasks("wide_search", "heldout")


def episode(world, width, contention, task=0):
    tools, tasks = world
    return asyncio.run(run_width(tasks[task], tools, width, SwarmConfig(max_critical_steps=BUDGET), contention))


def test_failure_probability_grows_with_the_wave():
    c = Contention(rate=0.2, free=4)
    assert [c.p_fail(m) for m in (1, 4, 5, 7)] == pytest.approx([0, 0, 0.2, 0.6]) and c.p_fail(12) == 1.0
    assert Contention().p_fail(9) == 0.0
    with pytest.raises(ValueError, match="rate"):
        Contention(rate=-0.1)


def test_failed_subagents_are_launched_not_finished(world):
    """Width 3 with p = 0.5 per subagent: which runs fail follows `Contention.fails`; r_finish by hand."""
    c = Contention(rate=0.5, free=2, seed=1)
    trace = episode(world, 3, c)
    waves = [s["subagents"] for s in trace.stages if s["subagents"]]
    key = f"{world[1][0].task_id}/{BUDGET}/3"
    first = waves[0]
    failed = [i for i in range(len(first)) if c.fails(key, 0, i, len(first))]
    assert [r["status"] for r in first] == ["error" if i in failed else "done" for i in range(len(first))]
    for i in failed:  # the runtime's failed-task path: steps spent on the reads, an error the orchestrator sees
        assert "contention" in first[i]["error"] and first[i]["steps"] > 0 and not first[i]["answer"]
    retry = waves[1] if len(waves) > 1 else []
    assert [r["prompt"] for r in retry] == [first[i]["prompt"] for i in failed]
    refailed = [i for i in range(len(retry)) if c.fails(key, 1, i, len(retry))]
    launched, finished = len(first) + len(retry), len(first) - len(failed) + len(retry) - len(refailed)
    assert 0 < len(failed) and launched > 3  # the seed gives a mixed case
    r = parl_reward(trace.stages, 1.0, 0, CFG)
    assert r["subagents"] == launched and r["r_finish"] == pytest.approx(finished / launched)
    tool_results = [m["content"] for m in trace.messages if m["role"] == "tool"]
    assert sum(t.startswith("Error: task failed: subagent") for t in tool_results) == len(failed) + len(refailed)


def test_every_subagent_failing_leaves_no_rows(world):
    trace = episode(world, 3, Contention(rate=1.0, free=0))
    runs = trace.subagents
    m = math.ceil(world[1][0].info["entities"] / math.ceil(world[1][0].info["entities"] / 3))
    assert len(runs) == 2 * m and all(r["status"] == "error" for r in runs)  # one wave and its retry
    assert world[1][0].score(trace.answer)["item_f1"] == 0.0
    assert parl_reward(trace.stages, 0.0, 0, CFG)["r_finish"] == 0.0


def test_contention_is_reproducible_and_seeded(world):
    c = Contention(rate=0.2, free=4)
    runs = [[(r["prompt"], r["status"]) for r in episode(world, 9, c).subagents] for _ in range(2)]
    assert runs[0] == runs[1] and any(s == "error" for _, s in runs[0])
    other = [[(r["prompt"], r["status"]) for r in episode(world, 9, Contention(0.2, 4, seed=s)).subagents]
             for s in range(1, 4)]
    assert any(o != runs[0] for o in other)


def test_default_is_the_reliable_path(world):
    from k25.swarm.parl_stage import default_parl_config

    assert default_parl_config().contention.rate == 0.0
    plain = episode(world, 9, None)
    for c in (Contention(), Contention(rate=1.0, free=9)):  # off, or a wave never larger than `free`
        assert episode(world, 9, c).stages == plain.stages


def test_width_env_with_contention_pays_the_runtimes_reward_and_memoises(world):
    tools, tasks = world
    c = Contention(rate=0.2, free=4)
    memo = {}
    env = ParlWidthEnv(PlainTurns(TOK), {t.task_id: t for t in tasks}, tools, reward=CFG, cache=memo, contention=c,
                       step_fn=lambda: 2)
    got = []
    for _ in range(2):
        env.reset(width_rl_task(tasks[0], BUDGET))
        got.append(asyncio.run(env.step(list(TOK.encode("9")) + [TOK.eos_id]))[1:])
    assert list(memo) == [(tasks[0].task_id, BUDGET, 9)] and got[0] == got[1]
    trace = episode(world, 9, c)
    want = parl_reward(trace.stages, tasks[0].score(trace.answer)["item_f1"], 2, CFG)
    reward, _, info = got[0]
    assert reward == pytest.approx(want["reward"]) and info["components"]["r_finish"] == want["r_finish"] < 1.0


def test_contention_experiment_configs():
    from experiments import swarm

    for arg in ("parl", "parl_no_parallel", "parl_no_finish", "single", "swarm"):  # unchanged: no contention
        assert swarm.get_config(arg).parl.contention.rate == 0.0
    full, no_par, no_fin = (swarm.get_config(f"parl_contention{s}") for s in ("", "_no_parallel", "_no_finish"))
    assert full.parl.contention.rate == no_par.parl.contention.rate == no_fin.parl.contention.rate == 0.2
    assert (no_par.parl.reward.lambda1, no_fin.parl.reward.lambda2, full.parl.reward.parallel_target) == (0, 0, 12)
    assert swarm.get_config("swarm_contention").parl.policy == "scripted"
    assert swarm.get_config("warmup_serial").data.synthetic.parl_width.serial_fraction == 0.8
    assert swarm.get_config("warmup").data.synthetic.parl_width.serial_fraction == 0.5
