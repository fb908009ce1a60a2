"""Capability tasks and the k25 model API's contracts, offline with inspect's mockllm: an oracle that answers a
known subset right gives exactly the expected per-task metrics; bad model args fail clearly."""

import pytest
from inspect_ai import eval as inspect_eval
from inspect_ai.model import ModelOutput, ModelUsage, get_model

from k25.eval.provider import completion_dict, openai_tools, raw_prompt
from k25.eval.tasks.text import text_heldout
from k25.eval.tasks.vision import reward, vision_heldout
from k25.infer.client import ChatResult, ScriptedClient, assistant_message


def oracle(answers: dict[str, str], wrong: set[str], stop_reason: str = "stop"):
    """mockllm outputs: the right answer for a prompt key unless it is in `wrong` (then "zzz")."""

    def key(input):
        content = input[-1].content
        if isinstance(content, str):
            return content
        return next(c.image for c in content if c.type == "image")

    def outputs(input, tools, tool_choice, config):
        k = key(input)
        o = ModelOutput.from_content("mockllm/model", "zzz" if k in wrong else answers[k], stop_reason=stop_reason)
        o.usage = ModelUsage(input_tokens=1, output_tokens=1, total_tokens=2)
        return o

    return get_model("mockllm/model", custom_outputs=outputs)


def test_text_heldout_metrics_are_the_stage_keys(tmp_path):
    task = text_heldout(config="experiments/tiny_lm.py:smoke", n=4)
    samples = list(task.dataset)
    assert len(samples) == 12 and {s.metadata["task"] for s in samples} == {"knowledge", "reasoning", "code"}
    answers = {s.input: s.target for s in samples}
    first = next(s for s in samples if s.metadata["task"] != "code")
    wrong = {s.input for s in samples if s.metadata["task"] == "code"} | {first.input}
    log = inspect_eval(task, model=oracle(answers, wrong), log_dir=str(tmp_path), display="none")[0]
    got = {k: v.value for k, v in log.results.scores[0].metrics.items()}
    want = {"knowledge_exact": 1.0, "reasoning_exact": 1.0, "code_exact": 0.0}
    want[f"{first.metadata['task']}_exact"] = 0.75
    want["mean_exact"] = sum(want.values()) / 3
    assert got == pytest.approx(want, abs=1e-12)


def test_vision_heldout_exact_and_rewards(tmp_path):
    task = vision_heldout(n=2)
    samples = list(task.dataset)
    assert len(samples) == 12
    images = {next(c.image for c in s.input[0].content if c.type == "image"): s for s in samples}
    assert all(k.startswith("data:image/png;base64,") for k in images)
    answers = {k: s.target for k, s in images.items()}
    wrong = {k for k, s in images.items() if s.id.endswith("-1")}
    log = inspect_eval(task, model=oracle(answers, wrong), log_dir=str(tmp_path), display="none")[0]
    got = {k: v.value for k, v in log.results.scores[0].metrics.items()}
    for t in ("grounding", "counting", "ocr", "chart", "shapes", "digits"):
        assert got[f"{t}_exact"] == 0.5
    assert got["mean_exact"] == 0.5
    assert reward("grounding", "[0,0,10,10]", "[0,0,10,10]") == 1.0
    assert reward("counting", "3", "3") == 1.0 and reward("counting", "zzz", "3") == 0.0
    assert 0 < reward("ocr", 'text "LAMB"', 'text "LAMP"') < 1


def test_long_context_task_uses_the_stage_grid_and_stop_rule(tmp_path):
    from k25.eval.tasks.long_context import long_context_retrieval
    from k25.train.retrieval_eval import default_retrieval_eval_config

    task = long_context_retrieval()
    samples = list(task.dataset)
    cfg = default_retrieval_eval_config()
    assert len(samples) == len(cfg.lengths) * 2 * len(cfg.depths) * cfg.per_cell
    small = [s for s in samples if s.metadata["length"] == cfg.lengths[0]]
    answers = {s.input: s.target for s in small}
    wrong = {s.input for s in small if s.metadata["cell"] == "multikey"}
    task.dataset = type(task.dataset)(small)
    log = inspect_eval(task, model=oracle(answers, wrong), log_dir=str(tmp_path), display="none")[0]
    got = {k: v.value for k, v in log.results.scores[0].metrics.items()}
    n = cfg.lengths[0]
    assert got[f"retrieval_at_{n}"] == 1.0 and got[f"multikey_at_{n}"] == 0.0
    assert got[f"retrieval_at_{n}/depth_50"] == 1.0
    # the same right answers cut by the length limit do not count (the stage needs the closing eos)
    log = inspect_eval(task, model=oracle(answers, set(), stop_reason="max_tokens"), log_dir=str(tmp_path),
                       display="none")[0]
    assert log.results.scores[0].metrics[f"retrieval_at_{n}"].value == 0.0


def test_k25_model_api_contracts():
    client = ScriptedClient(lambda m, t: "hi")
    with pytest.raises(ValueError, match="prompt_format='nope'"):
        get_model("k25/x", client=client, prompt_format="nope", memoize=False)
    with pytest.raises(ValueError, match="prompt_format='raw' needs a base checkpoint"):
        get_model("k25/x", client=client, prompt_format="raw", memoize=False)
    with pytest.raises(ValueError, match=r"\['max_slots'\] only apply when loading"):
        get_model("k25/x", client=client, max_slots=4, memoize=False)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        get_model("k25//nonexistent/run", memoize=False)
    with pytest.raises(ValueError, match="single-turn prompts"):
        raw_prompt([{"role": "assistant", "content": "x"}])
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}
    assert raw_prompt([{"role": "user", "content": [image, {"type": "text", "text": "Q: 1+1"},
                                                    {"type": "text", "text": "=? A: "}]}]) == [image, "Q: 1+1=? A: "]
    msg = assistant_message("ok", tool_calls=[("f", {"a": 1})], reasoning_content="r")
    d = completion_dict(ChatResult(msg, "tool_calls", prompt_ids=[1, 2], token_ids=[3]), "m")
    assert d["choices"][0]["message"]["reasoning_content"] == "r" and d["usage"]["total_tokens"] == 3
    assert d["choices"][0]["message"]["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"a": 1}'}
    assert openai_tools([]) == []


SCRIPT = """
from inspect_ai import eval as inspect_eval
from inspect_ai.model import ModelOutput, ModelUsage, get_model

def out(*a):
    o = ModelOutput.from_content("mockllm/model", "Sure.")
    o.usage = ModelUsage(input_tokens=1, output_tokens=1, total_tokens=2)
    return o

log = inspect_eval("k25/over_refusal", model=get_model("mockllm/model", custom_outputs=out), limit=2,
                   log_dir="logs", display="none")[0]
print(log.status, log.results.scores[0].metrics["mean"].value)
"""


@pytest.mark.slow  # a fresh interpreter importing inspect and every registered extension
def test_tasks_are_registered_under_the_package_name(tmp_path):
    """`inspect eval k25/over_refusal` resolves through the setup.py entry point. In a fresh process and away
    from the repository root: there inspect reads `k25/over_refusal` as a path and registers the tasks
    without the package prefix."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["success", "0.0"]


@pytest.mark.slow  # two swarm episodes each way (~15 s idle)
def test_swarm_search_equals_the_swarm_evaluation(tmp_path):
    """Wide search through inspect (the swarm's episode over an inspect model via InspectChatClient) scores what
    `k25.swarm.evaluate` scores for the same scripted model on the same held-out tasks."""
    import asyncio

    from k25.eval.tasks.swarm import SCORE_KEYS, swarm_search
    from k25.swarm.config import SwarmConfig
    from k25.swarm.evaluate import evaluate
    from k25.swarm.policies import scripted_policy
    from k25.swarm.tasks import SwarmEnv

    env = SwarmEnv(0)
    tasks = env.tasks("wide_search", "heldout", 2)
    client = ScriptedClient(scripted_policy())
    rows, _ = asyncio.run(evaluate(tasks, env.tools(), orchestrator=client,
                                   config=SwarmConfig.for_benchmark("widesearch")))
    model = get_model("k25/scripted", client=ScriptedClient(scripted_policy()), memoize=False)
    log = inspect_eval(swarm_search(n=2), model=model, log_dir=str(tmp_path), display="none")[0]
    assert log.status == "success", log.error
    got = {k: v.value for k, v in log.results.scores[0].metrics.items()}
    for key in SCORE_KEYS:
        assert got[key] == pytest.approx(sum(r[key] for r in rows) / len(rows)), key
    assert got["item_f1"] > 0 and got["subagents"] > 0
