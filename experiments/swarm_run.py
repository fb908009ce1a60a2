"""Run Agent Swarm, or the single-agent baseline, around any OpenAI-compatible model on the offline tasks.

    python -m experiments.swarm_run --endpoint http://127.0.0.1:8000/v1 --model NAME --tasks wide_search \
        [--single_agent] [--split heldout] [--num_tasks 4] [--benchmark widesearch] [--out traces.jsonl]
    python -m experiments.swarm_run --scripted --tasks wide_search,deep_search,long_doc   # the scripted baseline

Prints one line per episode and a JSON summary per task kind and overall (item_f1, row_f1, success,
critical_steps, subagents_per_episode, ...). Subagents use the same endpoint unless --subagent_endpoint /
--subagent_model name another (a frozen policy). The tasks need no network; only the model endpoint is called.
"""

from __future__ import annotations

import asyncio
import json

from absl import app, flags

_ENDPOINT = flags.DEFINE_string("endpoint", None, "Base URL of the OpenAI-compatible API, e.g. http://host:8000/v1.")
_MODEL = flags.DEFINE_string("model", None, "Model name to send.")
_TASKS = flags.DEFINE_list("tasks", ["wide_search"], "Task kinds: wide_search, deep_search, long_doc.")
_SINGLE = flags.DEFINE_bool("single_agent", False, "Run the single-agent baseline instead of the swarm.")
_SPLIT = flags.DEFINE_enum("split", "heldout", ["train", "heldout"], "Task split.")
_NUM = flags.DEFINE_integer("num_tasks", 4, "Tasks per kind.")
_SEED = flags.DEFINE_integer("seed", 0, "World / task seed.")
_BENCH = flags.DEFINE_enum("benchmark", "widesearch", ["browsecomp", "widesearch", "inhouse"],
                           "Appendix E step limits to use (orchestrator/subagent).")
_MAIN_STEPS = flags.DEFINE_integer("main_max_steps", None, "Override the orchestrator step limit.")
_SUB_STEPS = flags.DEFINE_integer("sub_max_steps", None, "Override the subagent step limit.")
_SINGLE_STEPS = flags.DEFINE_integer("single_max_steps", None, "Override the single-agent step limit.")
_BUDGET = flags.DEFINE_integer("max_critical_steps", None, "Critical-step budget per episode (default: none). "
                               "With --scripted --single_agent the scripted agent answers with what it has found "
                               "when it runs out.")
_CONTEXT = flags.DEFINE_enum("context", "none", ["none", "discard_all"], "Context management.")
_CONTEXT_TOKENS = flags.DEFINE_integer("context_max_tokens", 200_000, "discard-all threshold (tokens).")
_SUB_ENDPOINT = flags.DEFINE_string("subagent_endpoint", None, "Endpoint of the frozen subagent policy.")
_SUB_MODEL = flags.DEFINE_string("subagent_model", None, "Model name of the subagent policy.")
_API_KEY = flags.DEFINE_string("api_key", None, "API key (default: EMPTY).")
_TIMEOUT = flags.DEFINE_float("request_timeout_s", 300.0, "Per-request timeout.")
_RETRIES = flags.DEFINE_integer("max_retries", 2, "Retries per request.")
_SUB_TIMEOUT = flags.DEFINE_float("sub_timeout_s", 900.0, "Wall-time limit of one subagent run.")
_EPISODE_TIMEOUT = flags.DEFINE_float("episode_timeout_s", 3600.0, "Wall-time limit of one episode.")
_CONCURRENCY = flags.DEFINE_integer("concurrency", 4, "Episodes run at the same time.")
_SUB_CONCURRENCY = flags.DEFINE_integer("max_concurrent_subagents", 64, "Subagents running at once per episode.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (Appendix E: 1.0).")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "Top-p (Appendix E: 0.95).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 4096, "Completion tokens per turn.")
_OUT = flags.DEFINE_string("out", None, "Write every episode's trace here (JSONL).")
_KEEP = flags.DEFINE_bool("keep_subagent_messages", False, "With --out: keep each subagent's conversation too.")
_SCRIPTED = flags.DEFINE_bool("scripted", False, "Use the built-in scripted policies (k25.swarm.policies) in this "
                              "process instead of an endpoint: the reference baseline.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from k25.infer.client import OpenAIClient
    from k25.swarm.config import SwarmConfig
    from k25.swarm.evaluate import evaluate, summarize
    from k25.swarm.tasks import TASK_KINDS, SwarmEnv

    if not _SCRIPTED.value and not (_ENDPOINT.value and _MODEL.value):
        raise app.UsageError("--endpoint and --model are required (or --scripted for the built-in policies)")
    unknown = [k for k in _TASKS.value if k not in TASK_KINDS]
    if unknown:
        raise app.UsageError(f"--tasks: unknown kind(s) {unknown}; choose from {list(TASK_KINDS)}")
    overrides = {k: f.value for k, f in (("main_max_steps", _MAIN_STEPS), ("sub_max_steps", _SUB_STEPS),
                                         ("single_max_steps", _SINGLE_STEPS),
                                         ("max_critical_steps", _BUDGET)) if f.value is not None}
    config = SwarmConfig.for_benchmark(
        _BENCH.value, context=_CONTEXT.value, context_max_tokens=_CONTEXT_TOKENS.value,
        sub_timeout_s=_SUB_TIMEOUT.value, episode_timeout_s=_EPISODE_TIMEOUT.value, temperature=_TEMPERATURE.value,
        top_p=_TOP_P.value, max_tokens=_MAX_TOKENS.value, max_concurrent_subagents=_SUB_CONCURRENCY.value,
        **overrides)
    if _SCRIPTED.value:
        from k25.infer.client import ScriptedClient
        from k25.swarm.policies import scripted_policy

        budget = _BUDGET.value if _SINGLE.value else None
        client = subagent = ScriptedClient(scripted_policy(worker_budget=budget))
    else:
        client = subagent = OpenAIClient(_MODEL.value, base_url=_ENDPOINT.value, api_key=_API_KEY.value,
                                         timeout_s=_TIMEOUT.value, max_retries=_RETRIES.value)
    if not _SCRIPTED.value and (_SUB_ENDPOINT.value or _SUB_MODEL.value):
        subagent = OpenAIClient(_SUB_MODEL.value or _MODEL.value, base_url=_SUB_ENDPOINT.value or _ENDPOINT.value,
                                api_key=_API_KEY.value, timeout_s=_TIMEOUT.value, max_retries=_RETRIES.value)
    env = SwarmEnv(_SEED.value)
    tasks = [t for kind in _TASKS.value for t in env.tasks(kind, _SPLIT.value, _NUM.value)]
    rows, traces = asyncio.run(evaluate(tasks, env.tools(), orchestrator=client, subagent=subagent,
                                        single_agent=_SINGLE.value, config=config,
                                        concurrency=_CONCURRENCY.value, keep_messages=_KEEP.value))
    for r in rows:
        print(json.dumps(r))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            for r, t in zip(rows, traces):
                f.write(json.dumps({"result": r, "trace": t.to_dict()}, default=str) + "\n")
    mode = "single_agent" if _SINGLE.value else "swarm"
    summary = {"mode": mode, "model": "scripted" if _SCRIPTED.value else _MODEL.value, "split": _SPLIT.value,
               "overall": summarize(rows), **{k: summarize([r for r in rows if r["kind"] == k]) for k in _TASKS.value}}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    app.run(main)
