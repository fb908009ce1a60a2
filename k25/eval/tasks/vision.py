"""Vision grounding, counting, OCR and chart reading (plus shapes and digits): the held-out procedural images
of `k25.data.vision` as an inspect task, images sent as PNG data URIs.

    inspect eval k25/vision_heldout -T config=RUN_DIR --model openai/NAME   # or k25/HF_DIR

The samples are the run's held-out images: for the joint stage (`stage` k25) the documents its `HeldOutTasks`
scores, with its document text; otherwise `VisionTextData(config.data).eval_samples` (the ViT stage's fixed
renders). Every sample is scored twice: `exact`, the stage's own `eval/<task>_exact` (the joint stage's
criterion: the answer, then eos; the ViT stage's `exact_match` otherwise), and `reward`, the task's RL reward
from `k25.rl.rewards` (grounding F1 of the box, counting score, OCR edit similarity, exact match for the rest),
so partial answers show up too.
"""

from __future__ import annotations

import base64
import io
from collections import defaultdict
from collections.abc import Callable

import ml_collections
import numpy as np
from inspect_ai import Task, task
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.model import ChatMessageUser, ContentImage, ContentText, GenerateConfig
from inspect_ai.scorer import Metric, SampleScore, Score, Target, metric, scorer
from inspect_ai.solver import TaskState, generate

from k25.data.synthetic import exact_match
from k25.data.tokenizer import load_tokenizer
from k25.data.vision.dataset import VisionTextData, default_vision_data_config
from k25.data.vision.tasks import Sample as VisionSample
from k25.eval.tasks.config import load_config
from k25.rl.rewards import RULES, parse_boxes

IMAGE_TASKS = ("grounding", "counting", "ocr", "chart", "shapes", "digits")
MAX_TOKENS = 48  # room for the longest answer and eos ("one purple triangle, bottom right": 33 bytes)


def png_data_uri(frame: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def reward(task: str, response: str, answer: str) -> float:
    """The task's RL reward for `response` (k25.rl.rewards), in [0, 1]."""
    if task == "grounding":
        return RULES["grounding_f1"](response, parse_boxes(answer))
    if task == "counting":
        return RULES["counting_score"](response, int(answer))
    if task == "ocr":
        return RULES["ocr_score"](response, answer)
    return float(exact_match(response, answer))


@metric
def per_task() -> Metric:
    """`<task>_exact` and `<task>_reward` per task, and their means over tasks."""

    def compute(scores: list[SampleScore]) -> dict[str, float]:
        by: dict[str, list[dict]] = defaultdict(list)
        if not scores:  # inspect also asks before any sample is scored
            return {}
        for s in scores:
            by[s.sample_metadata["task"]].append(s.score.value)
        out = {}
        for key in ("exact", "reward"):
            for t, vals in by.items():
                out[f"{t}_{key}"] = float(np.mean([v[key] for v in vals]))
            out[f"mean_{key}"] = float(np.mean([out[f"{t}_{key}"] for t in by]))
        return out

    return compute


@scorer(metrics=[per_task()])
def vision_scorer():
    async def score(state: TaskState, target: Target) -> Score:
        pred = state.output.completion if state.output else ""
        task_name = state.metadata["task"]
        if state.metadata.get("stage_criterion"):  # the joint stage's: the answer, then eos (greedy stopped)
            exact = pred == target.text and bool(state.output and state.output.stop_reason == "stop")
        else:
            exact = exact_match(pred, target.text)
        return Score(value={"exact": float(exact), "reward": reward(task_name, pred, target.text)}, answer=pred)

    return score


def heldout_images(config: str | None, n: int | None, tasks: str | None
                   ) -> tuple[dict[str, list[VisionSample]], Callable[[VisionSample], str], bool]:
    """(samples per task, the prompt text of a sample, whether `exact` is the joint stage's criterion).

    A k25-stage config (joint pre-training, `data.image_sizes`) gives the stage's own held-out images
    (`HeldOutTasks.image_sample`, `eval_per_task` each) and its document text; any other vision data config
    gives `VisionTextData(config.data).eval_samples` with the bare prompt."""
    run = load_config(config) if config else None
    joint = run is not None and "image_sizes" in run.data
    if run is not None and not joint and "image_size" not in run.data:
        raise ValueError(f"config={config!r}: its data config is not a k25.data.vision one (no image_size) nor the "
                         "joint stage's (no image_sizes); leave config unset for the vision data defaults.")
    known = sorted(run.data.image_tasks) if joint else list(IMAGE_TASKS)
    names = [t for t in (tasks or ",".join(known)).split(",") if t]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"tasks={tasks!r}: unknown {unknown}; choose from {known}")
    if joint:
        from k25.train.joint import prompt_text  # the training stack, only for joint runs
        from k25.train.joint_eval import HeldOutTasks

        held = HeldOutTasks.from_config(run)
        count = n or held.n
        if not count:
            raise ValueError(f"config={config!r} scores no held-out images (eval_per_task=0); pass -T n=")
        return {t: [held.image_sample(t, i) for i in range(count)] for t in names}, prompt_text, True
    cfg = ml_collections.ConfigDict((run.data if run is not None else default_vision_data_config()).to_dict())
    cfg.tasks, cfg.video_every = {t: 1.0 for t in names}, 0
    held = VisionTextData(cfg, load_tokenizer("byte")).eval_samples
    return {t: held[t][: n or len(held[t])] for t in names}, lambda s: s.prompt, False


@task
def vision_heldout(config: str | None = None, n: int | None = None, tasks: str | None = None) -> Task:
    """`n` held-out images per task (default: what the run's stage holds out) of the comma-separated `tasks`
    (default: all the config has), from `config` (a run directory or experiment config with vision data;
    default: the vision data defaults)."""
    held, prompt, stage_criterion = heldout_images(config, n, tasks)
    samples = []
    for t, task_samples in held.items():
        for i, s in enumerate(task_samples):
            content = [ContentImage(image=png_data_uri(s.frames[0]))]
            if prompt(s):
                content.append(ContentText(text=prompt(s)))
            samples.append(Sample(id=f"{t}-{i}", input=[ChatMessageUser(content=content)], target=s.answer,
                                  metadata={"task": t, "stage_criterion": stage_criterion}))
    return Task(dataset=MemoryDataset(samples, name="vision_heldout"), solver=generate(), scorer=vision_scorer(),
                config=GenerateConfig(temperature=0.0, max_tokens=MAX_TOKENS))
