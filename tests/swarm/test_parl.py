"""PARL: the reward's terms and annealing on hand-built traces, and the orchestrator's token-level environment
(frozen subagents, critical-step budget) against the runtime's own trace of the same policy."""

import asyncio

import pytest

from k25.data.chat import byte_chat_format
from k25.infer.client import ScriptedClient
from k25.rl.env import ChatTurns
from k25.swarm import SwarmConfig, run_swarm
from k25.swarm.parl import ParlEnv, ParlRewardConfig, parl_reward, swarm_rl_task
from k25.swarm.policies import ScriptedWorker, scripted_policy
from k25.swarm.tasks import SwarmEnv

CHAT = byte_chat_format()


def wave(statuses):
    return {"main_steps": 1, "sub_steps": [3] * len(statuses), "subagents": [{"status": s} for s in statuses]}


SOLO = {"main_steps": 1, "sub_steps": [], "subagents": []}


def test_reward_terms_on_hand_built_traces():
    cfg = ParlRewardConfig(lambda1=0.2, lambda2=0.3, anneal_steps=100, parallel_target=4)
    serial = parl_reward([SOLO] * 6, 0.5, 0, cfg)
    assert serial["r_parallel"] == serial["r_finish"] == 0.0 and serial["reward"] == pytest.approx(0.5)
    good = parl_reward([SOLO, wave(["done"] * 4), SOLO], 1.0, 0, cfg)
    assert good["r_parallel"] == good["r_finish"] == 1.0 and good["reward"] == pytest.approx(0.2 + 0.3 + 1.0)
    assert good["critical_steps"] == 1 + 4 + 1 and good["subagents"] == 4
    # spurious parallelism: many subagents, few finish
    spurious = parl_reward([SOLO, wave(["done", "done"] + ["error"] * 6 + ["timeout", "step_limit"]), SOLO], 0.0, 0,
                           cfg)
    assert spurious["r_parallel"] == 1.0 and spurious["r_finish"] == pytest.approx(0.2)
    assert spurious["reward"] == pytest.approx(0.2 + 0.3 * 0.2)
    two = parl_reward([wave(["done"]), wave(["error"])], 0.0, 0, cfg)
    assert two["r_parallel"] == pytest.approx(0.5) and two["r_finish"] == pytest.approx(0.5)


def test_lambdas_anneal_linearly_to_zero():
    cfg = ParlRewardConfig(lambda1=0.2, lambda2=0.4, anneal_steps=100)
    assert cfg.lambdas(0) == pytest.approx((0.2, 0.4))
    assert cfg.lambdas(25) == pytest.approx((0.15, 0.3))
    assert cfg.lambdas(100) == cfg.lambdas(1000) == (0.0, 0.0)
    late = parl_reward([SOLO, wave(["done"] * 4), SOLO], 0.7, 500, cfg)
    assert late["reward"] == pytest.approx(0.7)  # only the task outcome is left
    with pytest.raises(ValueError, match="lambda1"):
        ParlRewardConfig(lambda1=-1)
    with pytest.raises(ValueError, match="anneal_steps"):
        ParlRewardConfig(anneal_steps=0)


def action_ids(env, message):
    """The token ids a policy would generate for `message` as its next turn (the trailing loss-mask-1 span)."""
    enc = CHAT.encode([*env.messages, message], env.tools, thinking=False)
    k = len(enc.ids)
    while k and enc.loss_mask[k - 1]:
        k -= 1
    return enc.ids[k:]


def play(env, task, policy):
    """Drive the environment with a policy over messages; return the trajectory, the infos and the reward."""
    ids = env.reset(task)
    mask = [0] * len(ids)
    infos = []
    while True:
        out = policy(env.messages, env.tools)
        msg = {"role": "assistant", "content": out} if isinstance(out, str) else out
        action = action_ids(env, msg)
        obs, reward, done, info = asyncio.run(env.step(action))
        ids += action + obs
        mask += [1] * len(action) + [0] * len(obs)
        infos.append(info)
        if done:
            return ids, mask, infos, reward


@pytest.fixture(scope="module")
def world():
    return SwarmEnv(0)


def test_parl_env_matches_the_runtime_trace(world):
    task = world.tasks("deep_search", "heldout", 1)[0]
    policy = scripted_policy()
    cfg = ParlRewardConfig(anneal_steps=10)
    env = ParlEnv(ChatTurns(CHAT), world.tools(), ScriptedClient(policy), reward=cfg, step_fn=lambda: 5)
    ids, mask, infos, reward = play(env, swarm_rl_task(task), policy)
    trace = asyncio.run(run_swarm(task.prompt, orchestrator=ScriptedClient(policy), subagent=ScriptedClient(policy),
                                  tools=world.tools()))
    assert [s["sub_steps"] for s in env.stages] == [s["sub_steps"] for s in trace.stages]
    assert infos[-1]["critical_steps"] == trace.critical_steps == 8
    want = parl_reward(trace.stages, 1.0, 5, cfg)
    assert reward == pytest.approx(want["reward"]) == pytest.approx(0.1 + 0.1 + 1.0)
    assert infos[-1]["r_perf"] == 1.0 and infos[-1]["subagents"] == 4
    # token-in-token-out: the subagents' tokens are not in the trajectory; every observation token has mask 0
    whole = CHAT.encode(env.messages, env.tools, thinking=False)
    assert ids == whole.ids and mask == whole.loss_mask
    assert sum(mask) == sum(whole.loss_mask) and len(env.messages) == 2 + 3 + 4 + 1


def test_serial_orchestrator_gets_no_parallel_reward(world):
    task = world.tasks("long_doc", "heldout", 1)[0]
    env = ParlEnv(ChatTurns(CHAT), world.tools(), ScriptedClient(scripted_policy()),
                  swarm_config=SwarmConfig(main_max_steps=30))
    _, _, infos, reward = play(env, swarm_rl_task(task), ScriptedWorker())
    assert infos[-1]["r_parallel"] == infos[-1]["r_finish"] == 0.0 and infos[-1]["r_perf"] == 1.0
    assert reward == pytest.approx(1.0) and infos[-1]["critical_steps"] == task.info["pages"] + 1


def test_critical_step_budget_ends_the_episode(world):
    task = world.tasks("deep_search", "heldout", 1)[0]
    policy = scripted_policy()
    env = ParlEnv(ChatTurns(CHAT), world.tools(), ScriptedClient(policy),
                  swarm_config=SwarmConfig(max_critical_steps=4))
    _, _, infos, reward = play(env, swarm_rl_task(task), policy)
    # create (1); a wave whose subagents get 4 - 2 - 1 = 1 step each and cannot finish (1 + 1); the retry is
    # refused for lack of budget (1): 4 critical steps, no answer
    assert [s["sub_steps"] for s in env.stages] == [[], [1] * 4, []]
    assert infos[-1]["budget_exhausted"] and infos[-1]["critical_steps"] == 4
    assert infos[-1]["r_perf"] == 0.0 and infos[-1]["r_finish"] == 0.0 and infos[-1]["r_parallel"] == 1.0
    assert reward == pytest.approx(0.2)


def test_task_budget_overrides_the_environment_budget(world):
    task = world.tasks("deep_search", "heldout", 1)[0]
    policy = scripted_policy()
    env = ParlEnv(ChatTurns(CHAT), world.tools(), ScriptedClient(policy))  # no budget of its own
    _, _, infos, reward = play(env, swarm_rl_task(task, budget=4), policy)
    assert [s["sub_steps"] for s in env.stages] == [[], [1] * 4, []]
    assert infos[-1]["budget_exhausted"] and infos[-1]["critical_steps"] == 4 and infos[-1]["r_perf"] == 0.0
    # the logged terms are there on a budget-ended episode too, with the widest wave and no answer
    comp = infos[-1]["components"]
    assert comp["width"] == 4 and comp["valid"] == 0.0 and comp["item_f1"] == comp["success"] == 0.0
    assert reward == pytest.approx(infos[-1]["reward"])
    # the same task without a budget in it runs to the answer
    _, _, infos, _ = play(env, swarm_rl_task(task), policy)
    assert infos[-1]["r_perf"] == 1.0 and infos[-1]["components"]["valid"] == 1.0
    assert infos[-1]["components"]["item_f1"] == 1.0  # an answer that is not a table: F1 = success


@pytest.mark.parametrize("prompt", ["appendix_e", "compact"])
def test_orchestrator_sft_records_are_the_parl_env_rendering(world, prompt):
    """The warm-up's conversations render, token for token and mask for mask, as ParlEnv renders the same
    scripted episode for the same prompt variant: SFT clones exactly what PARL then trains."""
    from k25.swarm.prompts import ORCHESTRATOR_PROMPTS
    from k25.swarm.trajectories import orchestrator_records

    record = orchestrator_records(1, 0, prompt=prompt)[0]
    task = world.tasks("deep_search", "train", 1)[0]
    system, env_tools = ORCHESTRATOR_PROMPTS[prompt]
    policy = scripted_policy()
    env = ParlEnv(ChatTurns(CHAT), world.tools(), ScriptedClient(policy), orchestrator_env_tools=env_tools)
    ids, mask, _, reward = play(env, swarm_rl_task(task, system), policy)
    assert record["messages"][1]["content"] == task.prompt and reward > 1.0
    enc = CHAT.encode(record["messages"], record["tools"], thinking=False)
    assert enc.ids == ids and enc.loss_mask == mask
    names = [t["function"]["name"] for t in record["tools"]]
    assert names[-2:] == ["create_subagent", "assign_task"] and (len(names) > 2) == env_tools
    # another seed is another stream of training questions (the sft stage's held-out conversations)
    other = orchestrator_records(2, 1, prompt=prompt)
    assert {r["messages"][1]["content"] for r in other}.isdisjoint({record["messages"][1]["content"]})
    with pytest.raises(ValueError, match="orchestrator prompt"):
        orchestrator_records(1, 0, prompt="verbose")


def test_chat_parl_stage_pieces_drive_the_orchestrator_env():
    """`config.parl.env="chat"`: the stage's tasks carry their budget and the compact prompt, its environment is
    ParlEnv with only the swarm tools declared, and an episode's logged terms are `episode_reward`'s."""
    from experiments import swarm
    from k25.swarm.parl import episode_reward
    from k25.swarm.parl_stage import LOGGED
    from k25.swarm.prompts import COMPACT_ORCHESTRATOR_PROMPT
    from k25.train.stage import make_stage

    c = swarm.get_config("chat_smoke")
    c.mesh.devices = 1
    stage = make_stage(c)
    task = stage.task(3, 0)
    assert task.target["budget"] == 24 and task.target["kind"] == "deep_search"
    assert task.messages[0]["content"] == COMPACT_ORCHESTRATOR_PROMPT and task.id.endswith("#3")
    assert [t.target["budget"] for t in stage.eval_tasks()] == [24, 24]
    assert all(t.meta["split"] == "heldout" for t in stage.eval_tasks())
    env = stage.make_env()
    assert isinstance(env, ParlEnv)
    policy = scripted_policy()
    _, _, infos, reward = play(env, task, policy)
    assert [t["function"]["name"] for t in env.tools] == ["create_subagent", "assign_task"]
    comp = infos[-1]["components"]
    assert set(LOGGED) - {"reward"} <= set(comp)
    want = episode_reward(env.stages, {"success": 1.0}, 0, stage.reward_cfg, 4)
    assert reward == pytest.approx(want["reward"]) and comp["width"] == 4 and comp["success"] == 1.0


def test_an_episode_cut_off_by_the_rollout_still_logs_its_terms(world):
    """The rollout ends an episode whose environment reply does not fit `max_response_tokens` with reward 0;
    ParlEnv's `cut_off` still reports what the episode did (its wave, critical steps, no answer), so the
    logged `parl/*` means and the chat eval count it instead of treating it as an episode that ran nothing."""
    from k25.rl.rollout import EnvPool, RolloutConfig, RolloutManager, TokenCompletion

    task = swarm_rl_task(world.tasks("deep_search", "heldout", 1)[0])
    policy = scripted_policy()
    env = ParlEnv(ChatTurns(CHAT), world.tools(), ScriptedClient(policy))

    class Scripted:  # the scripted orchestrator's turns as token ids
        max_slots = 1

        async def generate(self, prompt_ids, *, max_new_tokens, temperature, top_p, stop_ids, seed, media=()):
            ids = action_ids(env, policy(env.messages, env.tools))[:max_new_tokens]
            return TokenCompletion(ids, [0.0] * len(ids), "stop" if ids[-1] in stop_ids else "length")

    ids, mask, _, _ = play(ParlEnv(ChatTurns(CHAT), world.tools(), ScriptedClient(policy)), task, policy)
    answer = len(mask) - max(i for i, m in enumerate(mask) if m == 0) - 1  # the final turn's tokens
    # room for everything up to the wave's results, but not for the answer after them: the results do not fit
    cfg = RolloutConfig(group_size=1, tokens_per_iteration=10_000,
                        max_response_tokens=len(ids) - len(env.reset(task)) - answer, max_turn_tokens=2000)
    res = asyncio.run(RolloutManager(Scripted(), EnvPool(lambda: env, 1), cfg).run_iteration([task], 0))
    (ep,) = res.finished
    assert ep.truncated and ep.reward == 0.0 and env.done
    comp = ep.info["components"]
    assert comp["subagents"] == 4 and comp["width"] == 4 and comp["valid"] == 0.0 and comp["r_perf"] == 0.0
    assert comp["critical_steps"] == critical_steps_of(env) > 0


def critical_steps_of(env):
    from k25.swarm import critical_steps

    return critical_steps(env.stages)
