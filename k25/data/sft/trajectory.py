"""Tool-use trajectories made real: reference code run step by step in the sandboxed Python tool.

A generator describes an example as a `Plan` (the user turn, the images bound in the session, the code of
each tool call and the ground-truth answer it computed itself); `run_plan` executes every step in a
`PythonSandbox`, records the tool results exactly as the tool returned them (text and displayed images), and
ends with the answer turn. With `verify` the last step's printed output must equal the answer, so every
trajectory's answer is checked by its own execution, not only asserted by the generator.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from k25.data.sft.records import Record, image_part
from k25.tools.python import PythonSandbox, PythonTool

# The declaration every SFT conversation and the evaluation give the model: the python tool's schema with a
# one-line description (PythonTool's own runs to ~500 characters, several times a tiny model's whole turn).
PYTHON_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": PythonTool.name, "description": "Run Python; images are bound as PIL images.",
    "parameters": PythonTool.parameters}}
PRELUDE = "import numpy as np\nfrom scipy import ndimage\n"


@dataclasses.dataclass
class Plan:
    """One example before execution. `user` is the user turn's content (text or parts); `images` are bound in
    the session under their names; `steps` is the code of each tool call; `answer` the ground truth."""

    kind: str
    user: str | list[dict[str, Any]]
    images: dict[str, Any]
    steps: list[str]
    answer: str
    verify: bool = True  # the last step prints the answer


class TrajectoryError(RuntimeError):
    """A reference step failed or its output disagrees with the generator's answer (a generator bug)."""


def answer_text(answer: str) -> str:
    """The final assistant content (what `k25.rl.rewards.parse` reads back)."""
    return f"Answer: {answer}"


def run_plan(sandbox: PythonSandbox, plan: Plan) -> Record:
    """Execute `plan` in `sandbox` (a live session; its variables persist) -> an SFT record with the real tool
    results. Raises TrajectoryError if a step errors or (with `plan.verify`) the output is not the answer."""
    sandbox.bind_images(plan.images)
    messages: list[dict[str, Any]] = [{"role": "user", "content": plan.user}]
    last = ""
    for k, code in enumerate(plan.steps):
        result = sandbox.run(code)
        if result.error is not None:
            raise TrajectoryError(f"{plan.kind}: step {k} failed: {result.error}\ncode:\n{code}")
        call_id = f"functions.python:{k}"
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function",
             "function": {"name": "python", "arguments": json.dumps({"code": code})}}]})
        content: str | list[dict[str, Any]] = result.text
        if result.images:
            content = ([{"type": "text", "text": result.text}] if result.text else []) + \
                [image_part(im) for im in result.images]
        messages.append({"role": "tool", "tool_call_id": call_id, "content": content})
        last = result.text
    if plan.verify and last.strip() != plan.answer:
        raise TrajectoryError(f"{plan.kind}: the reference code printed {last.strip()!r}, the generator's answer "
                              f"is {plan.answer!r}")
    messages.append({"role": "assistant", "content": answer_text(plan.answer)})
    return {"messages": messages, "tools": [PYTHON_TOOL], "meta": {"kind": plan.kind, "answer": plan.answer}}
