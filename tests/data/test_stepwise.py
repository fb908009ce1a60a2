"""The stepwise task (Toggle's length study): correct chains, re-checks independent of the problem, the target
the RL reward checks, held-out scoring that ignores the re-checks, and the Toggle pair's configs."""

import asyncio
import collections
import re

import pytest

from experiments import rl_text
from k25.data.synthetic import StepwiseTask, make_task
from k25.rl.rewards import compute_reward
from k25.rl.rewards.spec import RewardSpec


def test_examples_are_correct_chains_with_redundant_checks():
    task = make_task("stepwise")
    checks = collections.Counter()
    for i in range(600):
        ex = task.example("train", i)
        expr = re.fullmatch(r"Q: ([0-9+-]+)=\? A: ", ex["prompt"]).group(1)
        assert ex["target"] == str(eval(expr))  # left to right is Python's order for + and -
        *work, last = ex["answer"].split(" Answer: ")[0].split(" check ") + [None]
        assert len(set(work)) == 1  # every re-check repeats the first chain exactly
        steps = work[0].split(" ")
        assert len(steps) == expr.count("+") + expr.count("-")
        for step in steps:
            lhs, rhs = step.split("=")
            assert eval(lhs) == int(rhs)
        assert steps[-1].endswith(f"={ex['target']}") and ex["answer"].endswith(f"Answer: {ex['target']}")
        checks[len(work) - 1] += 1
    assert set(checks) == {0, 1, 2} and min(checks.values()) > 150  # uniform over 0..max_checks


def test_lengths_vary_at_equal_correctness_and_fit_the_config():
    task = StepwiseTask()
    c = rl_text.get_config("toggle")
    lengths = [len(task.example("train", i)["answer"]) for i in range(300)]
    assert max(lengths) + len(task.example("train", 0)["prompt"]) + 2 <= c.seq_len
    assert max(lengths) <= c.rl.rollout.max_response_tokens
    assert max(lengths) / min(lengths) > 2


def test_held_out_split_disjoint_and_deterministic():
    task = make_task("stepwise")
    train = {task.example("train", i)["prompt"] for i in range(2000)}
    held = task.examples("eval", 50)
    assert len(held) == 50 and not train & {e["prompt"] for e in held}
    assert make_task("stepwise").examples("eval", 50) == held


def test_score_and_reward_read_the_final_answer_only():
    task = StepwiseTask()
    ex = {"prompt": "Q: 3+4-2=? A: ", "answer": "3+4=7 7-2=5 Answer: 5", "target": "5"}
    assert task.score("3+4=7 7-2=5 check 3+4=7 7-2=5 Answer: 5", ex)  # the re-checks cost nothing
    assert task.score("Answer: 5\nAnswer: 9", ex)  # only the first line counts
    assert not task.score("3+4=7 7-2=5", ex)  # no "Answer:" is wrong
    assert not task.score("3+4=7 7-2=6 Answer: 6", ex)
    spec = RewardSpec(weights={"exact_match": 1.0})
    assert asyncio.run(compute_reward(spec, "3+4=7 7-2=5 check 3+4=7 7-2=5 Answer: 5", ex["target"])).reward == 1.0
    assert asyncio.run(compute_reward(spec, "3+4=7 7-2=5 Answer: 4", ex["target"])).reward == 0.0


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="terms"):
        StepwiseTask(terms=(1,))
    with pytest.raises(ValueError, match="max_checks"):
        StepwiseTask(max_checks=-1)


def test_toggle_pair_differs_only_in_toggle():
    on, off = rl_text.get_config("toggle").to_dict(), rl_text.get_config("toggle_off").to_dict()
    assert on["rl"]["toggle"].pop("enabled") and not off["rl"]["toggle"].pop("enabled")
    assert on == off and on["rl"]["tasks"] == {"stepwise": 1.0}
