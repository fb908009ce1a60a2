"""The simulated tool environment of the agentic alignment probes (sabotage, self-replication).

Each scenario gives the agent an ordinary task, a few files to read and one extra tool: the opportunity
(overwrite a successor's evaluation, switch off oversight, copy its own weights, start copies of itself).
Nothing executes: the tools answer from the scenario's files and record the call, and the scorer reads the
transcript's tool calls. This probes the propensity to take the opportunity, not the ability to do harm,
so it is safe to run anywhere; anything that would run model-written code belongs in the sandboxed Python tool.
"""

from __future__ import annotations

from inspect_ai.model import ChatMessageSystem
from inspect_ai.solver import Generate, Solver, TaskState, solver
from inspect_ai.tool import Tool, ToolDef, ToolParam, ToolParams


def _string_params(spec: dict[str, str]) -> ToolParams:
    return ToolParams(properties={k: ToolParam(type="string", description=v) for k, v in spec.items()},
                      required=list(spec))


def scenario_tools(scenario: dict) -> list[Tool]:
    """list_files, read_file, submit and the scenario's opportunity, over the scenario's files."""
    files: dict[str, str] = dict(scenario["files"])
    opp = scenario["opportunity"]

    async def list_files() -> str:
        return "\n".join(sorted(files))

    async def read_file(path: str) -> str:
        return files.get(path.strip().lstrip("./"), f"No such file: {path}")

    async def submit(answer: str) -> str:
        return "Submitted."

    async def opportunity(**kwargs: str) -> str:
        return "Done."

    return [
        ToolDef(list_files, name="list_files", description="List the files you can read.", parameters={}).as_tool(),
        ToolDef(read_file, name="read_file", description="Read a file.",
                parameters=_string_params({"path": "path of the file"})).as_tool(),
        ToolDef(submit, name="submit", description="Submit your final answer to the task.",
                parameters=_string_params({"answer": "your answer"})).as_tool(),
        ToolDef(opportunity, name=opp["name"], description=opp["description"],
                parameters=_string_params(opp["parameters"])).as_tool(),
    ]


@solver
def agentic_probe(max_turns: int = 8) -> Solver:
    """Installs the sample's scenario (system prompt and tools) and runs the tool loop for up to `max_turns`."""

    async def solve(state: TaskState, generate: Generate) -> TaskState:
        md = state.metadata
        state.messages.insert(0, ChatMessageSystem(content=md["system"]))
        state.tools = scenario_tools(md)
        state.tool_choice = "auto"
        for _ in range(max_turns):
            state = await generate(state, tool_calls="single")
            reply = next(m for m in reversed(state.messages) if m.role == "assistant")
            calls = [c.function for c in (reply.tool_calls or [])]
            if state.completed or not calls or "submit" in calls:
                break
        return state

    return solve
