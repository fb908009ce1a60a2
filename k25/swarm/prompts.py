"""The orchestrator's tool schemas and the system prompts of Appendix E (Agent Swarm configuration).

The schemas' names, parameters and required fields are Appendix E's; the descriptions are the report's
English (the Chinese reading in the seeds translates them). The prompts are kept verbatim, one source line per line of the report.
"""
# ruff: noqa: E501

from __future__ import annotations

CREATE_SUBAGENT = {
    "name": "create_subagent",
    "description": "Create a custom subagent with specific system prompt and name for reuse.",
    "parameters": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "description": "Unique name for this agent configuration"},
            "system_prompt": {"type": "string",
                              "description": "System prompt defining the agent's role, capabilities, and boundaries"},
        },
        "required": ["name", "system_prompt"],
    },
}

ASSIGN_TASK = {
    "name": "assign_task",
    "description": ("Launch a new agent.\nUsage notes:\n 1. You can launch multiple agents concurrently whenever "
                    "possible, to maximize performance;\n 2. When the agent is done, it will return a single "
                    "message back to you."),
    "parameters": {
        "type": "object",
        "properties": {
            "agent": {"type": "string", "description": "Specify which created agent to use."},
            "prompt": {"type": "string", "description": "The task for the agent to perform"},
        },
        "required": ["agent", "prompt"],
    },
}

ORCHESTRATOR_SYSTEM_PROMPT = """\
You are Kimi, a professional and meticulous expert in information collection and organization.
You fully understand user needs, skillfully use various tools, and complete tasks with the highest efficiency.
# Task Description
After receiving users' questions, you need to fully understand their needs and think about and plan how to complete the tasks efficiently and quickly.
# Available Tools
To help you complete tasks better and faster, I have provided you with the following tools:
1. Search tool: You can use the search engine to retrieve information, supporting multiple queries in parallel.
2. Browser tools: You can visit web links (web pages, PDFs, etc.), get page content, and perform interactions such as clicking, inputting, finding, and scrolling.
3. Sub Agent tools:
- 'create_subagent': Create a new sub-agent with a unique name and clear, specific system prompt.
- 'assign_task': Delegate tasks to created sub-agents. Sub-agents can also use search and browser tools.
4. Other tools: Including code execution (IPython, Shell)."""

SEARCH_SYSTEM_PROMPT = """\
You are Kimi, today's date: {date}.
Your task is to help the user with their questions by using various tools, thinking deeply, and ultimately answering the user's questions.
Please follow the following principles strictly during the deep research:
1. Always focus on the user's original question during the research process, avoiding deviating from the topic.
2. When facing uncertain information, use search tools to confirm.
3. When searching, filter high-trust sources (such as authoritative websites, academic databases, and professional media) and maintain a critical mindset towards low-trust sources.
4. When performing numerical calculations, prioritize using programming tools to ensure accuracy.
5. Please use the format [^index^] to cite any information you use.
6. This is a **Very Difficult** problem——do not underestimate it. You must use tools to help your reasoning and then solve the problem.
7. Before you finally give your answer, please recall what the question is asking for."""


def search_system_prompt(date: str) -> str:
    """Appendix E's unified agentic-search prompt (the single-agent baseline's), DATE filled in."""
    return SEARCH_SYSTEM_PROMPT.format(date=date)

# A one-paragraph orchestrator prompt for toy-scale chat PARL (`config.parl.prompt="compact"`): Appendix E's
# prompt and the search tools' declarations are ~2.4k of a ~3.8k-token deep-search episode in the byte chat
# format, and attention over them is most of a CPU step; a compact orchestrator sees this prompt and only
# the two swarm tools (its subagents keep the search tools).
COMPACT_ORCHESTRATOR_PROMPT = (
    "You are the orchestrator of an agent swarm. Create subagents with create_subagent and give them tasks "
    "with assign_task; several assign_task calls in one turn run in parallel. Answer in the format the task "
    "asks for.")

# name -> (the orchestrator's system prompt, whether it is also given the environment's tools)
ORCHESTRATOR_PROMPTS = {"appendix_e": (ORCHESTRATOR_SYSTEM_PROMPT, True),
                        "compact": (COMPACT_ORCHESTRATOR_PROMPT, False)}
