"""The rollout manager under load: >= 1,000 concurrent episodes with tool calls, failing and hanging tools,
hanging policy calls (timeouts, retries, failures) and partial rollouts carried over an iteration; every
episode ends exactly once and its tokens are kept exactly (token-in-token-out)."""

import asyncio
import json
import random
import zlib

import pytest

from k25.data.chat import byte_chat_format
from k25.rl.env import AgentEnv, ChatTurns, RewardJudge, Task
from k25.rl.rollout import EnvPool, RolloutConfig, RolloutManager, TokenCompletion
from k25.tools.base import Tool, ToolResult, Toolset

CHAT = byte_chat_format()
END = CHAT.im_end_id


class Lookup(Tool):
    name, description = "lookup", "Look a key up."
    parameters = {"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]}

    async def call(self, arguments):
        key = arguments["key"]
        await asyncio.sleep(0.001)
        if key.startswith("boom"):
            raise ValueError("backend down")  # Toolset turns this into ToolResult.error
        if key.startswith("hang"):
            await asyncio.sleep(60)  # the env's tool timeout cuts it
        return ToolResult(text=f"value of {key} is {zlib.crc32(key.encode()) % 10}")


class FakePolicy:
    """A fast token-level policy: first turn a tool call (if the task asks for one), then the answer; a task
    with meta "long" writes a long answer (more than one iteration's budget); "hang" tasks hang on every call,
    "hang_once" tasks on their first call only. Logprobs are a deterministic function of (seed, position)."""

    max_slots = 64

    def __init__(self, tasks):
        self.meta = {t.id: t.meta for t in tasks}
        self.calls, self.hung = 0, set()
        self.inflight = self.max_inflight = 0

    async def generate(self, prompt_ids, *, max_new_tokens, temperature, top_p, stop_ids, seed):
        self.calls += 1
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            text = CHAT.decode(prompt_ids)
            tid = text.split("task ", 1)[1].split(":", 1)[0]
            meta = self.meta[tid]
            if meta.get("hang") or (meta.get("hang_once") and tid not in self.hung):
                self.hung.add(tid)
                await asyncio.sleep(60)
            await asyncio.sleep(random.Random(seed).random() * 0.002)
            last_turn = text.rsplit("<|im_assistant|>", 1)[1]
            if "<|tool_calls_section_begin|>" in last_turn:  # continuing a turn cut by the budget: finish it
                out = "<|tool_call_end|><|tool_calls_section_end|>"
            elif meta.get("tool") and "## Return of" not in text and "<|tool_calls_section_begin|>" not in text:
                args = json.dumps({"key": meta["tool"]})
                out = f"<|tool_calls_section_begin|><|tool_call_begin|>functions.lookup:0" \
                      f"<|tool_call_argument_begin|>{args}<|tool_call_end|><|tool_calls_section_end|>"
            else:
                out = ("x" * 300 if meta.get("long") else "") + f"Answer: {meta['answer']}"
            ids = CHAT.encode_text(out) + [END]
            done = len(last_turn.split("<|im_middle|>", 1)[1]) if "<|im_middle|>" in last_turn else 0
            # resume where this turn's earlier calls stopped (the decoded text of this turn so far)
            already = CHAT.encode_text(last_turn.split("<|im_middle|>", 1)[1].removeprefix("<think></think>")) \
                if done else []
            ids = ids[len(already):] if ids[: len(already)] == already else ids
            ids = ids[:max_new_tokens]
            rng = random.Random(seed)
            lps = [-rng.random() for _ in ids]
            return TokenCompletion(ids, lps, "stop" if ids and ids[-1] == END else "length")
        finally:
            self.inflight -= 1


def make_tasks(n):
    rng = random.Random(0)
    tasks = []
    for i in range(n):
        kind = rng.random()
        meta = {"answer": str(i % 7)}
        if kind < 0.5:
            meta["tool"] = rng.choice(["k", "boom", "hang"]) + str(i)
        if i % 50 == 7:
            meta["long"] = True
        if i % 97 == 3:
            meta["hang"] = True
        if i % 89 == 5:
            meta["hang_once"] = True
        tasks.append(Task(id=f"t{i}", messages=[{"role": "user", "content": f"task t{i}: answer"}],
                          target=str(i % 7), meta=meta))
    return tasks


def test_thousand_concurrent_episodes_none_lost_or_double_counted():
    tasks = make_tasks(300)
    policy = FakePolicy(tasks)
    judge = RewardJudge({"weights": {"exact_match": 1.0}})
    pool = EnvPool(lambda: AgentEnv(ChatTurns(CHAT), judge, Toolset([Lookup()]), max_turns=3, tool_timeout_s=0.2),
                   size=2000)
    cfg = RolloutConfig(group_size=4, tokens_per_iteration=200, max_response_tokens=1000, max_turn_tokens=120,
                        generate_timeout_s=0.3, episode_timeout_s=30, max_retries=1, max_staleness=2)
    mgr = RolloutManager(policy, pool, cfg)

    async def main():
        r0 = await mgr.run_iteration(tasks, 0)
        carried_prefix = {e.uid: (list(e.ids), list(e.logprobs), list(e.mask)) for e in r0.carried}
        mgr.version = 1
        r1 = await mgr.run_iteration([], 1)
        return r0, r1, carried_prefix

    r0, r1, carried_prefix = asyncio.run(main())
    n = len(tasks) * cfg.group_size
    assert pool.max_in_use >= 1000  # episodes in flight at once
    assert policy.max_inflight <= FakePolicy.max_slots  # policy calls bounded by the sampler's slots
    # iteration 0 partitions the episodes; iteration 1 only sees the carried ones
    uids0 = [e.uid for e in r0.finished + r0.failed + r0.carried]
    assert sorted(uids0) == sorted(f"{t.id}".join(["0:", f"/{k}"]) for t in tasks for k in range(4))
    assert len(set(uids0)) == n
    assert r0.carried and not r1.carried
    assert sorted(e.uid for e in r1.finished + r1.failed) == sorted(carried_prefix)
    ended = [e.uid for e in r0.finished + r0.failed + r1.finished + r1.failed]
    assert len(ended) == len(set(ended)) == n
    # failures: every always-hanging task's episodes, nothing else; hang-once tasks recovered by a retry
    failed = {e.uid.split("/")[0].split(":")[1] for e in r0.failed + r1.failed}
    assert failed == {t.id for t in tasks if t.meta.get("hang")}
    assert all("failed after" in e.error for e in r0.failed + r1.failed)
    assert mgr.totals["timeouts"] > 0 and mgr.totals["retries"] > 0
    # groups: each emitted once, with exactly its finished members
    groups = r0.groups + r1.groups
    assert len({g[0].group for g in groups}) == len(groups) == len(tasks) - len(failed)
    assert sum(len(g) for g in groups) == len(r0.finished) + len(r1.finished)
    assert not mgr.pending
    done = r0.finished + r1.finished
    tool_errors = sum(e.tool_errors for e in done)
    assert tool_errors > 0  # raising and hanging tools came back as errors, episodes went on
    for e in done:
        assert len(e.ids) == len(e.logprobs) == len(e.mask) == len(e.versions)
        assert all(lp == 0.0 for lp, m in zip(e.logprobs, e.mask) if m == 0)
        assert all((v >= 0) == bool(m) for v, m in zip(e.versions, e.mask))
        assert e.reward == 1.0  # every answer is right: the judge saw the whole final turn
        if e.uid in carried_prefix:  # the partial rollout continued from exactly what was recorded
            ids, lps, mask = carried_prefix[e.uid]
            assert e.ids[: len(ids)] == ids and e.logprobs[: len(lps)] == lps and e.mask[: len(mask)] == mask
            assert e.versions[0] == 0 and e.versions[-1] == 1
    # the trajectory is the chat format's own rendering of the conversation
    e = next(e for e in done if e.tool_calls and e.uid not in carried_prefix)
    assert CHAT.decode(e.prompt_ids + e.ids).count("## Return of functions.lookup:0") == 1


def test_stale_partial_rollouts_restart_or_flag():
    tasks = [Task(id="a", messages=[{"role": "user", "content": "task a: answer"}], target="1",
                  meta={"answer": "1", "long": True})]
    judge = RewardJudge({"weights": {"exact_match": 1.0}})
    for stale, expect_restart in (("restart", True), ("flag", False)):
        policy = FakePolicy(tasks)
        pool = EnvPool(lambda: AgentEnv(ChatTurns(CHAT), judge), size=4)
        mgr = RolloutManager(policy, pool, RolloutConfig(group_size=2, tokens_per_iteration=100,
                                                         max_response_tokens=1000, max_staleness=1, stale=stale))
        r0 = asyncio.run(mgr.run_iteration(tasks, 0))
        assert len(r0.carried) == 2
        mgr.version = 2  # two trainer steps later: the carried tokens are 2 > max_staleness versions old
        r1 = asyncio.run(mgr.run_iteration([], 1))
        assert mgr.totals["restarted_stale" if expect_restart else "flagged_stale"] == 2
        e = (r1.finished + r1.carried)[0]
        assert (min(v for v in e.versions if v >= 0) == 2) == expect_restart


def test_state_dict_round_trip_continues_identically():
    tasks = make_tasks(12)
    tasks = [t for t in tasks if not (t.meta.get("hang") or t.meta.get("hang_once"))]
    for t in tasks:
        t.meta["long"] = True
    judge = RewardJudge({"weights": {"exact_match": 1.0}})

    def fresh():
        pool = EnvPool(lambda: AgentEnv(ChatTurns(CHAT), judge, Toolset([Lookup()]), tool_timeout_s=0.2), size=64)
        return RolloutManager(FakePolicy(tasks), pool, RolloutConfig(group_size=2, tokens_per_iteration=150,
                                                                      max_response_tokens=800))

    a = fresh()
    asyncio.run(a.run_iteration(tasks, 0))
    b = fresh()
    b.load_state_dict(__import__("json").loads(__import__("json").dumps(a.state_dict())))
    key = lambda r: sorted((e.uid, tuple(e.ids), tuple(e.logprobs), e.reward) for e in r.finished)
    finished = 0
    for it in range(1, 6):
        ra, rb = asyncio.run(a.run_iteration([], it)), asyncio.run(b.run_iteration([], it))
        assert key(ra) == key(rb)
        finished += len(ra.finished)
    assert finished == 2 * len(tasks) and not a.carried


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="tokens_per_iteration"):
        RolloutConfig(tokens_per_iteration=0)
    with pytest.raises(ValueError, match="stale"):
        RolloutConfig(stale="drop-ish")
