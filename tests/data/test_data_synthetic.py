"""Synthetic text tasks: determinism, sizes, correct answers, disjoint eval split, exact_match."""

import contextlib
import io

import pytest

from k25.data.synthetic import TASKS, KnowledgeTask, exact_match, make_task

N_TRAIN = 3000
# The quickstart's three text tasks (Table 1's text columns). Other registered tasks (long-context retrieval,
# the PARL width warm-up) have other shapes and their own tests (tests/train/test_retrieval_data.py,
# tests/swarm/test_parl_stage.py).
TEXT_TASKS = ("code", "knowledge", "reasoning")


@pytest.fixture(scope="module", params=TEXT_TASKS)
def task_and_samples(request):
    task = make_task(request.param)
    return task, [task.example("train", i) for i in range(N_TRAIN)], task.examples("eval", 300)


def test_deterministic_and_seeded(task_and_samples):
    task, train, _ = task_and_samples
    again = make_task(task.name)
    assert [again.example("train", i) for i in range(50)] == train[:50]
    assert [task.example("train", i, stream=1) for i in range(50)] != train[:50]  # stream reorders
    if task.name == "knowledge":  # world seed changes the facts
        assert KnowledgeTask(seed=1).facts != task.facts


def test_sizes_fit_a_tiny_byte_model(task_and_samples):
    _, train, evals = task_and_samples
    for ex in train + evals:
        assert set(ex) == {"prompt", "answer"}
        assert len(ex["prompt"].encode()) < 60
        assert 1 <= len(ex["answer"].encode()) <= 6
        assert ex["prompt"].isascii() and ex["answer"].isascii()


def test_eval_split_disjoint_from_train(task_and_samples):
    task, train, evals = task_and_samples
    train_prompts = {ex["prompt"] for ex in train}
    eval_prompts = {ex["prompt"] for ex in evals}
    assert len(eval_prompts) == len(evals) >= 20  # unique and not trivially small
    assert not train_prompts & eval_prompts
    assert all(task.split_of(p) == "train" for p in train_prompts)
    assert all(task.split_of(p) == "eval" for p in eval_prompts)
    assert len(train_prompts) > len(eval_prompts)  # the train split is the bigger, varied one


def _program_output(prompt: str) -> str:
    program = prompt.rsplit("\nOutput: ", 1)[0]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(program, {})  # noqa: S102 - our own generated program
    return buf.getvalue().strip()


def test_answers_are_correct(task_and_samples):
    task, train, evals = task_and_samples
    for ex in train[:500] + evals:
        prompt, answer = ex["prompt"], ex["answer"]
        if task.name == "code":
            assert prompt.endswith("\nOutput: ")
            assert _program_output(prompt) == answer
        elif task.name == "reasoning":
            assert prompt.startswith("Q: ") and prompt.endswith("? A: ")
            body = prompt[3:-5]
            if body.endswith("="):
                assert str(eval(body[:-1])) == answer
            elif body.startswith("sort "):
                assert answer == " ".join(sorted(body[5:].split()))
            elif body.startswith(("max(", "min(")):
                assert str(eval(body)) == answer
            else:
                assert answer == ("T" if eval(body.replace("T", "True").replace("F", "False")) else "F")
        else:
            facts = {(e, rel): v for e, rel, v in task.facts}
            entity = next(e for e in task.entities if e in prompt)
            rel = next(
                r
                for r, phrase in (("capital", "capital"), ("color", "flag color"), ("animal", "animal"))
                if phrase in prompt
            )
            assert facts[(entity, rel)] == answer


def test_knowledge_heldout_facts_are_stated_in_train():
    task = make_task("knowledge")
    train = [task.example("train", i) for i in range(N_TRAIN)]
    evals = task.examples("eval", 1000)
    assert len(evals) == round(task.eval_fraction * len(task.facts))  # every held-out fact asked once, no more
    assert all(ex["prompt"].startswith("Q: What is the") for ex in evals)
    for ex in evals[:10]:
        entity = ex["prompt"].split(" of ")[-1].split("?")[0]
        assert any(entity in t["prompt"] and t["answer"] == ex["answer"] for t in train)
    assert any(t["prompt"].startswith("Q: ") for t in train)  # question form of the other facts is trained


def test_exact_match():
    assert exact_match("5", "5")
    assert exact_match(" 5 ", "5")
    assert exact_match("2 5 8\nQ: sort 1 2 3? A: 1 2 3", "2 5 8")
    assert exact_match("2  5 8", "2 5 8")
    assert not exact_match("", "5")
    assert not exact_match("55", "5")
    assert not exact_match("-5", "5")
    assert not exact_match("Melk2", "Melk")
    assert TASKS["code"].exact_match("14\n", "14")


def test_unknown_task():
    with pytest.raises(KeyError):
        make_task("vision")
    with pytest.raises(ValueError):
        make_task("code").example("test", 0)
