"""Vision RL tasks for the rl stage: the image tasks of `k25.data.sft.vision_tasks` with outcome rewards, the
sandboxed Python tool with the images bound, and the text held-out scores (the report's Table 2 analog).

A task is named `vision/<kind>` in `config.rl.tasks` (kinds: counting, grounding, ocr, chart, maze, pie,
spot_difference). Its images are never stored: the user turn holds references `vtask:<kind>:<key>:<name>`,
and `resolve` rebuilds the image from the kind's generator and the seed key (k25.rl.media), so the
JSON rollout state names them and a resumed run sees the same pixels. Training tasks draw keys
(seed, TRAIN_SALT, index), held-out ones the zero-vision evaluation's (seed, 7919, i, j) stream
(`vision_tasks.eval_key`), so `eval/accuracy` is on the same held-out tasks as that evaluation.

Rewards (`KIND_REWARDS`, `k25.rl.rewards`): counting-like kinds `counting_score` (exact 1, linear decay in
the relative error), grounding `grounding_f1` (IoU-soft F1 of the boxes), OCR `ocr_score` (1 - normalised
edit distance), chart bar heights `exact_match`. `grade` is the strict right/wrong of the zero-vision
evaluation (`VisionTask.grade`), logged as `eval/solved` beside the reward.
"""

from __future__ import annotations

import functools
from typing import Any

import ml_collections
import numpy as np

from k25.data.sft.trajectory import PYTHON_TOOL
from k25.data.sft.vision_tasks import VISION_TASKS, VisionTask, eval_key
from k25.rl.env import Task
from k25.rl.media import ref_part
from k25.rl.rewards.parse import parse_boxes
from k25.tools.base import Toolset
from k25.tools.python import PythonSandbox, PythonTool

PREFIX = "vision/"
SCHEME = "vtask"
TRAIN_SALT = 31337  # training keys (seed, TRAIN_SALT, index) never meet the held-out (seed, 7919, i, j) ones
KIND_REWARDS: dict[str, str] = {"counting": "counting_score", "grounding": "grounding_f1", "ocr": "ocr_score",
                                "chart": "exact_match", "maze": "counting_score", "pie": "counting_score",
                                "spot_difference": "counting_score"}


def default_vision_config() -> ml_collections.ConfigDict:
    """`config.rl.vision`: the tool and image limits of vision episodes."""
    return ml_collections.ConfigDict(dict(
        tool=True,  # offer the sandboxed Python tool (images bound as `image`, `image2`); the policy may answer
        tool_images=1,  # images a tool result passes back to the model (what the code `display`ed)
        max_tool_image_pixels=112 * 112,  # the sandbox refuses to return larger images (bounds vision tokens)
        max_tool_chars=200,  # tool output text kept per call (byte-level tokens are precious)
        sandbox_timeout_s=10.0,
        text_eval_per_task=16,  # held-out text documents per task for eval/text/* (0: none)
        text_eval_tasks=["knowledge", "reasoning", "code"],
        text_eval_seq_len=128,
    ))


def is_vision(name: str) -> bool:
    return name.startswith(PREFIX)


@functools.lru_cache(maxsize=1024)
def build(kind: str, key: tuple[int, ...]) -> VisionTask:
    """The vision task of `kind` drawn from the seed `key` (deterministic)."""
    return VISION_TASKS[kind](np.random.default_rng(list(key)))


def resolve(rest: str) -> np.ndarray:
    """`<kind>:<k0.k1...>:<name>` -> that task's image (the `vtask` scheme of k25.rl.media)."""
    kind, key, name = rest.split(":")
    return build(kind, tuple(int(k) for k in key.split("."))).images[name]


def reward_target(task: VisionTask) -> Any:
    """The rule reward's target: an int count, a list of boxes, or the answer text."""
    rule = KIND_REWARDS[task.kind]
    if rule == "counting_score":
        return int(task.answer)
    if rule == "grounding_f1":
        return [list(b) for b in parse_boxes(task.answer)]
    return task.answer


class VisionSource:
    """One kind of vision task as an rl-stage task source (`rl_task`, `eval_rl_tasks`, `grade`)."""

    def __init__(self, name: str):
        self.kind = name.removeprefix(PREFIX)
        if self.kind not in VISION_TASKS:
            raise ValueError(f"config.rl.tasks: unknown vision task {name!r}; choose from "
                             f"{[PREFIX + k for k in VISION_TASKS]}")
        self.name = name

    def _task(self, key: tuple[int, ...], task_id: str) -> Task:
        vt = build(self.kind, key)
        refs = [ref_part(f"{SCHEME}:{self.kind}:{'.'.join(map(str, key))}:{n}") for n in vt.images]
        question = vt.user_content()[-1]  # the text part, worded as the zero-vision evaluation words it
        rule = KIND_REWARDS[self.kind]
        return Task(id=task_id, messages=[{"role": "user", "content": refs + [question]}],
                    target=reward_target(vt), spec={"weights": {rule: 1.0}},
                    meta={"kind": self.kind, "key": list(key), "images": list(vt.images)})

    def rl_task(self, index: int, seed: int) -> Task:
        return self._task((int(seed), TRAIN_SALT, int(index)), f"{self.name}:{index}")

    def eval_rl_tasks(self, n: int, seed: int) -> list[Task]:
        j = list(VISION_TASKS).index(self.kind)
        return [self._task(tuple(eval_key(seed, i, j)), f"eval/{self.name}:{i}") for i in range(n)]

    @staticmethod
    def grade(task: dict[str, Any], reply: str) -> float:
        """Strict right/wrong of the final answer (`VisionTask.grade`)."""
        return build(task["meta"]["kind"], tuple(task["meta"]["key"])).grade(reply)


def task_images(task: Task) -> dict[str, np.ndarray]:
    """The images a vision task binds in the Python session ({} for other tasks)."""
    meta = task.meta or {}
    if "kind" not in meta or "key" not in meta:
        return {}
    return dict(build(meta["kind"], tuple(meta["key"])).images)


def python_toolset(cfg: ml_collections.ConfigDict):
    """A per-episode toolset factory: a fresh sandbox (started on its first call) with the task's images."""
    def make(task: Task) -> Toolset:
        sandbox = PythonSandbox(timeout_s=float(cfg.sandbox_timeout_s), memory_mb=768, images=task_images(task),
                                max_image_pixels=int(cfg.max_tool_image_pixels))
        return Toolset([PythonTool(sandbox)])

    return make


TOOL_SCHEMAS = [PYTHON_TOOL]  # the declaration the zero-vision SFT trained on (a one-line description)


class TextHeldOut:
    """The text held-out scores before and after vision RL (the report's Table 2 analog): the joint stage's
    teacher-forced greedy exact match and token accuracy (`k25.train.joint_eval.HeldOutTasks`) on held-out
    synthetic text documents, the format the K2.5 base was pre-trained on. Logged as `eval/text/<task>_exact`,
    `eval/text/<task>_token_acc` and their means `eval/text/mean_exact`, `eval/text/mean_token_acc`."""

    def __init__(self, cfg: ml_collections.ConfigDict, merge_area: int, seed: int):
        from k25.data.tokenizer import ByteTokenizer
        from k25.train.joint import JointData, default_joint_data_config
        from k25.train.joint_eval import HeldOutTasks

        data = default_joint_data_config()
        data.text_tasks = list(cfg.text_eval_tasks)
        # HeldOutTasks scores the data's image tasks too: one small one, whose scores are not reported
        data.image_tasks, data.image_sizes = {"shapes": 1.0}, [28]
        self.names = list(cfg.text_eval_tasks)
        self.scorer = HeldOutTasks(JointData(data, int(cfg.text_eval_seq_len), ByteTokenizer(), merge_area),
                                   int(cfg.text_eval_per_task), seed)

    def __call__(self, model: Any) -> dict[str, float]:
        scores = self.scorer(model)
        out = {}
        for name in self.names:
            for metric in ("exact", "token_acc"):
                out[f"eval/text/{name}_{metric}"] = float(scores[f"eval/{name}_{metric}"])
        for metric in ("exact", "token_acc"):
            out[f"eval/text/mean_{metric}"] = float(np.mean([out[f"eval/text/{n}_{metric}"] for n in self.names]))
        return out
