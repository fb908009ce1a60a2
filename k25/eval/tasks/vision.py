"""Vision grounding, counting, OCR and chart reading (plus shapes and digits): the held-out procedural images
of `k25.data.vision` as an inspect task, images sent as PNG data URIs.

    inspect eval k25/vision_heldout -T config=RUN_DIR --model openai/NAME   # or k25/HF_DIR

The samples are `VisionTextData(config.data).eval_samples` (the stages' fixed held-out renders). Every sample is
scored twice: `exact`, the whole-caption exact match the vision stages report (`eval/<task>_exact`), and
`reward`, the task's RL reward from `k25.rl.rewards` (grounding F1 of the box, counting score, OCR edit
similarity, exact match for the rest), so partial answers show up too.
"""

from __future__ import annotations

import base64
import io
from collections import defaultdict

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
from k25.eval.tasks.config import load_config
from k25.rl.rewards import RULES, parse_boxes

IMAGE_TASKS = ("grounding", "counting", "ocr", "chart", "shapes", "digits")


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
        return Score(value={"exact": float(exact_match(pred, target.text)),
                            "reward": reward(task_name, pred, target.text)}, answer=pred)

    return score


@task
def vision_heldout(config: str | None = None, n: int | None = None, tasks: str = ",".join(IMAGE_TASKS)) -> Task:
    """`n` held-out images per task (default: the data config's `eval_per_task`) of the comma-separated `tasks`,
    from `config` (a run directory or experiment config with vision data; default: the vision data defaults)."""
    cfg = load_config(config).data if config else default_vision_data_config()
    if "image_size" not in cfg:
        raise ValueError(f"config={config!r}: its data config is not a k25.data.vision one (no image_size); "
                         "leave config unset for the vision data defaults.")
    names = [t for t in tasks.split(",") if t]
    unknown = sorted(set(names) - set(IMAGE_TASKS))
    if unknown:
        raise ValueError(f"tasks={tasks!r}: unknown {unknown}; choose from {IMAGE_TASKS}")
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.tasks, cfg.video_every = {t: 1.0 for t in names}, 0
    held = VisionTextData(cfg, load_tokenizer("byte")).eval_samples
    samples = []
    for t in names:
        for i, s in enumerate(held[t][: n or len(held[t])]):
            content = [ContentImage(image=png_data_uri(s.frames[0]))]
            if s.prompt:
                content.append(ContentText(text=s.prompt))
            samples.append(Sample(id=f"{t}-{i}", input=[ChatMessageUser(content=content)], target=s.answer,
                                  metadata={"task": t}))
    return Task(dataset=MemoryDataset(samples, name="vision_heldout"), solver=generate(), scorer=vision_scorer(),
                config=GenerateConfig(temperature=0.0, max_tokens=32))

