"""The PARL stage: the width policy's environment against the swarm runtime, its warm-up data, the stage's
configuration errors, and (slow) a few PARL steps and a baseline evaluation on the one training loop."""

import asyncio
import math

import pytest

from k25.data.synthetic import make_task
from k25.data.tokenizer import load_tokenizer
from k25.rl.env import PlainTurns
from k25.swarm import SwarmConfig, critical_steps
from k25.swarm.parl import ParlRewardConfig, ParlWidthEnv, parl_reward, parse_width, run_width, width_rl_task
from k25.swarm.tasks import SwarmEnv

TOK = load_tokenizer("byte")
FMT = PlainTurns(TOK)
CFG = ParlRewardConfig(lambda1=0.3, lambda2=0.3, anneal_steps=10)


@pytest.fixture(scope="module")
def world():
    env = SwarmEnv(0)
    return env, env.tools(), env.tasks("wide_search", "heldout")


def play(world, task, budget, text, step=0):
    _, tools, tasks = world
    env = ParlWidthEnv(FMT, {t.task_id: t for t in tasks}, tools, swarm_config=SwarmConfig(), reward=CFG,
                       step_fn=lambda: step)
    prompt = env.reset(width_rl_task(task, budget))
    assert TOK.decode(prompt[1:]) == f"n={task.info['entities']} b={budget} k="
    action = list(TOK.encode(text)) + [TOK.eos_id]
    return asyncio.run(env.step(action))


@pytest.mark.parametrize("width", [0, 3])
def test_width_env_runs_the_swarm_runtime_and_pays_the_parl_reward(world, width):
    _, tools, tasks = world
    task = tasks[0]
    n = task.info["entities"]
    obs, reward, done, info = play(world, task, 24, str(width), step=5)
    assert obs == [] and done
    trace = asyncio.run(run_width(task, tools, width, SwarmConfig(max_critical_steps=24)))
    want = parl_reward(trace.stages, task.score(trace.answer)["item_f1"], 5, CFG)
    comp = info["components"]
    assert reward == pytest.approx(want["reward"])
    assert comp["critical_steps"] == critical_steps(trace.stages) <= 24
    if width == 0:  # serial: no subagents, no parallel or finish reward, a partial table under the budget
        assert comp["subagents"] == 0 and comp["r_parallel"] == comp["r_finish"] == 0.0
        assert 0 < comp["item_f1"] < 1 and reward == pytest.approx(comp["item_f1"])
    else:  # ceil(n / 3) companies per subagent: every subagent finishes within the budget
        per = math.ceil(n / width)
        assert comp["subagents"] == math.ceil(n / per) == 3 and comp["r_finish"] == 1.0
        assert comp["item_f1"] == 1.0 and comp["r_parallel"] == 0.75
        assert reward == pytest.approx(1.0 + 0.15 * 0.75 + 0.15)  # λ = 0.3 · (1 - 5/10)


def test_shared_episode_memo_gives_the_fresh_episode(world):
    _, tools, tasks = world
    memo = {}
    env = ParlWidthEnv(FMT, {t.task_id: t for t in tasks}, tools, reward=CFG, cache=memo)
    got = []
    for _ in range(2):
        env.reset(width_rl_task(tasks[2], 16))
        got.append(asyncio.run(env.step(list(TOK.encode("6")) + [TOK.eos_id]))[1:])
    assert list(memo) == [(tasks[2].task_id, 16, 6)] and got[0] == got[1]
    assert got[0] == play(world, tasks[2], 16, "6")[1:]  # an environment without the memo


@pytest.mark.parametrize("text", ["x", "12", " 3 4", ""])
def test_malformed_width_runs_no_episode_and_earns_nothing(world, text):
    _, reward, done, info = play(world, world[2][1], 16, text)
    assert done and reward == 0.0
    assert info["components"]["valid"] == 0.0 and info["components"]["subagents"] == 0


def test_truncated_width_is_not_an_action(world):
    _, tools, tasks = world
    env = ParlWidthEnv(FMT, {t.task_id: t for t in tasks}, tools)
    env.reset(width_rl_task(tasks[0], 16))
    _, reward, done, info = asyncio.run(env.step(list(TOK.encode("5"))))  # no stop token
    assert done and info["truncated"] and reward == 0.0 and info["components"]["valid"] == 0.0


def test_parse_width_and_run_width_reject_non_actions(world):
    assert parse_width(" 7\n") == 7 and parse_width("07") is None and parse_width("a") is None
    with pytest.raises(ValueError, match="width=10"):
        asyncio.run(run_width(world[2][0], world[1], 10, SwarmConfig()))


def test_warmup_data_is_the_width_format_mostly_serial():
    task = make_task("parl_width", seed=0)
    exs = task.examples("train", 200, unique=False)
    for ex in exs:
        n, b = (int(p.split("=")[1]) for p in ex["prompt"].split()[:2])
        assert 8 <= n <= 24 and b in (16, 24, 40) and ex["prompt"].endswith(" k=")
        assert parse_width(ex["answer"]) is not None
    serial = sum(ex["answer"] == "0" for ex in exs) / len(exs)
    assert 0.4 < serial < 0.7
    with pytest.raises(ValueError, match="serial_fraction"):
        make_task("parl_width", serial_fraction=2.0)
    with pytest.raises(ValueError, match="budgets"):
        make_task("parl_width", budgets=())


def test_experiment_configs_and_stage_errors():
    from experiments import swarm
    from k25.train.stage import make_stage

    for arg in ("single", "swarm", "warmup", "parl", "parl_no_parallel", "parl_no_finish", "smoke"):
        swarm.get_config(arg)
    assert swarm.get_config("parl_no_parallel").parl.reward.lambda1 == 0.0
    assert swarm.get_config("parl_no_finish").parl.reward.lambda2 == 0.0
    with pytest.raises(ValueError, match="unknown ARG"):
        swarm.get_config("nope")
    c = swarm.get_config("smoke")
    c.parl.policy = "oracle"
    with pytest.raises(ValueError, match="config.parl.policy"):
        make_stage(c)
    c = swarm.get_config("smoke")
    c.rl.format = "chat"
    with pytest.raises(ValueError, match="config.rl.format"):
        make_stage(c)
    # the chat env: its own format, kinds, prompt variants and subagents, and no width-only fields
    for arg in ("warmup_chat", "parl_chat", "chat_smoke"):
        swarm.get_config(arg)
    # (config, field, bad value); the width env ("smoke") runs wide search with scripted subagents only
    bad = [("chat_smoke", "rl.format", "plain"), ("chat_smoke", "parl.kinds", ("browse",)),
           ("chat_smoke", "parl.prompt", "verbose"), ("chat_smoke", "parl.policy", "serial"),
           ("chat_smoke", "parl.env", "tree"), ("smoke", "parl.kinds", ("deep_search",)),
           ("smoke", "parl.subagent", "openai/x")]
    for arg, field, value in bad:
        c = swarm.get_config(arg)
        section, name = field.split(".")
        c[section][name] = value
        with pytest.raises(ValueError, match=f"config.{field}"):
            make_stage(c)
    c = swarm.get_config("chat_smoke")
    c.parl.subagent = "someone"
    with pytest.raises(ValueError, match="config.parl.subagent"):
        _ = make_stage(c).subagent


@pytest.mark.slow
def test_parl_smoke_trains_only_the_orchestrator_tokens(tmp_path):
    from experiments import swarm
    from k25.train import loop
    from k25.train.metrics import read_metrics

    c = swarm.get_config("smoke")
    c.eval_examples, c.mesh.devices = 1, 1
    out = loop.train(c, str(tmp_path))
    rows = read_metrics(str(tmp_path))
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    for r in rows:
        if "loss" in r:  # the orchestrator's tokens only: at most max_response_tokens per trajectory
            assert 0 < r["num_tokens"] <= c.batch_size * c.rl.rollout.max_response_tokens
            assert "parl/subagents" in r and "parl/lambda1" in r
    ev = out["eval"]
    for k in ("eval/item_f1", "eval/row_f1", "eval/critical_steps", "eval/subagents_per_episode"):
        assert k in ev


@pytest.mark.slow
def test_chat_parl_smoke_trains_the_whole_orchestrator_on_the_loop(tmp_path):
    """One PARL step of a fresh chat-format orchestrator: its sampled turns (and only those) are trained, the
    episodes' PARL terms are logged, and the held-out evaluation runs its episodes through ParlEnv."""
    from experiments import swarm
    from k25.train import loop
    from k25.train.metrics import read_metrics

    c = swarm.get_config("chat_smoke")
    c.mesh.devices, c.eval_every = 1, 1
    out = loop.train(c, str(tmp_path))
    rows = [r for r in read_metrics(str(tmp_path)) if "loss" in r]
    assert [r["step"] for r in rows] == [1]
    assert 0 < rows[0]["num_tokens"] <= c.batch_size * c.rl.rollout.max_response_tokens
    assert "parl/subagents" in rows[0] and "parl/valid" in rows[0] and "parl/critical_steps" in rows[0]
    ev = out["eval"]
    for k in ("eval/item_f1", "eval/row_f1", "eval/critical_steps", "eval/subagents_per_episode", "eval/valid"):
        assert k in ev


@pytest.mark.slow
def test_serial_baseline_evaluation_matches_the_runtime(tmp_path):
    from experiments import swarm
    from k25.train import loop

    c = swarm.get_config("single")
    c.eval_examples, c.parl.budgets, c.mesh.devices = 2, (16,), 1
    _model_small(c)
    ev = loop.train(c, str(tmp_path))["eval"]
    env = SwarmEnv(0)
    tasks = env.tasks("wide_search", "heldout")[:2]
    traces = [asyncio.run(run_width(t, env.tools(), 0, SwarmConfig.for_benchmark("widesearch", max_critical_steps=16)))
              for t in tasks]
    f1 = sum(t.score(tr.answer)["item_f1"] for t, tr in zip(tasks, traces)) / 2
    assert ev["eval/item_f1@init"] == pytest.approx(f1)
    assert ev["eval/critical_steps@init"] == pytest.approx(sum(tr.critical_steps for tr in traces) / 2)
    assert ev["eval/subagents_per_episode@init"] == 0.0


def _model_small(c):
    from experiments.common import model_config_dict
    from k25.model.config import tiny

    c.model = model_config_dict(tiny(vocab_size=272, hidden_size=32, num_hidden_layers=1))
