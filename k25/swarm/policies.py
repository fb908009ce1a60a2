"""Scripted policies that solve the offline tasks through the tools: baselines and end-to-end tests.

`ScriptedWorker` is a sequential agent (one tool call per turn) that reads the generated documents with the
regular expressions their sentences follow; it answers a whole task (the single-agent baseline) or a
subtask written by `ScriptedOrchestrator`, which splits a task into waves of `assign_task` calls, retries a
failed subtask once, and merges the answers. `scripted_policy` dispatches on whether `assign_task` is among
the tools, so one function can serve both roles behind an OpenAI-compatible endpoint. Policies read their
state from the conversation only, so they are stateless and safe to share between concurrent episodes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from k25.infer.client import Message, assistant_message
from k25.swarm.scoring import extract_answer, markdown_table, parse_markdown_table
from k25.swarm.tasks import WIDE_COLUMNS

_HIT = re.compile(r"^\[\d+\] (.+) \(id: ([^)]+)\)$", re.MULTILINE)
_OPENED = re.compile(r"^(.+) \(id: ([^)]+)\) - page (\d+) of (\d+)\n")
_COMPANY = {
    "founded": re.compile(r"(?:founded|established) in (\d+)"),
    "headquarters": re.compile(r"(?:headquarters are in|headquartered in) ([^.]+)\."),
    "employees": re.compile(r"(?:employs (\d+) people|numbers (\d+) employees)"),
    "chief executive": re.compile(r"(?:chief executive is ([^.]+)\.|(?:^|\. )([^.]+?) serves as chief executive)"),
}
_BORN = re.compile(r"born (?:in )?(\d{4})")
_POPULATION = re.compile(r"Population: (\d+)")
_ENTRY = re.compile(r"Entry \d+: (.+?) paid (\d+) crowns")

_FAILED = ("Error:", "task failed:", "assign_task:")  # a failed subtask, as the runtime or AgentEnv shows it
_WIDE_ALL = re.compile(r"every company in the (.+?) sector")
_WIDE_SOME = re.compile(r"the following companies: (.+?)\. Columns")
_DEEP_ALL = re.compile(r"Which of these companies (has the oldest chief executive|is headquartered in the most "
                       r"populous city)[^:]*: (.+?)\? Give")
_DEEP_ONE = re.compile(r"Find the (birth year of the chief executive|population of the headquarters city) of (.+?)\. ")
_LONG_ALL = re.compile(r"\(id: ([^)]+)\) is a long ledger.*?that (.+?) paid across the whole ledger", re.DOTALL)
_LONG_SOME = re.compile(r"document with id (\S+), read pages (\d+) to (\d+) and add up the amounts that (.+?) paid")


def tool_history(messages: Sequence[Message]) -> list[tuple[str, dict, str]]:
    """(tool name, arguments, result text) of every call so far, paired within each turn by call id."""
    out = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant" or not m.get("tool_calls"):
            continue
        results = {}
        for t in messages[i + 1:]:
            if t.get("role") != "tool":
                break
            results[t.get("tool_call_id")] = t.get("content") or ""
        for c in m["tool_calls"]:
            fn = c.get("function") or {}
            args = fn.get("arguments")
            try:
                args = json.loads(args) if isinstance(args, str) else dict(args or {})
            except (json.JSONDecodeError, TypeError, ValueError):
                args = {}
            out.append((fn.get("name", ""), args, results.get(c.get("id"), "")))
    return out


class _Reader:
    """What the agent has found so far: search hits (title -> id), opened pages (id -> {page: text})."""

    def __init__(self, history):
        self.final = False  # no more calls: what is not read yet counts as missing
        self.hits: dict[str, str] = {}
        self.searched: set[str] = set()
        self.pages: dict[str, dict[int, str]] = {}
        self.n_pages: dict[str, int] = {}
        for name, args, text in history:
            if name == "search":
                self.searched.add(args.get("query", ""))
                for title, doc_id in _HIT.findall(text):
                    self.hits.setdefault(title, doc_id)
            elif name == "open" and (m := _OPENED.match(text)):
                self.pages.setdefault(m.group(2), {})[int(m.group(3))] = text[m.end():]
                self.n_pages[m.group(2)] = int(m.group(4))
                self.hits.setdefault(m.group(1), m.group(2))

    def doc(self, title: str, query: str | None = None):
        """The first page of the document titled `title`, or the next call that gets it (None when it
        cannot be found)."""
        doc_id = self.hits.get(title)
        if self.final and (doc_id is None or 1 not in self.pages.get(doc_id, {})):
            return "missing", None
        if doc_id is None:
            query = query or title
            return ("call", ("search", {"query": query})) if query not in self.searched else ("missing", None)
        if 1 not in self.pages.get(doc_id, {}):
            return "call", ("open", {"id": doc_id})
        return "text", self.pages[doc_id][1]


def _company_row(name: str, text: str) -> dict:
    row = {"company": name}
    for col, rx in _COMPANY.items():
        m = rx.search(text)
        row[col] = next((g for g in m.groups() if g), "") if m else ""
    return row


def _call(name: str, args: dict) -> Message:
    return assistant_message(None, tool_calls=[(name, args)])


class ScriptedWorker:
    """A sequential searcher: one tool call per turn, then the answer. With `step_budget`, it answers with
    what it has found on its last budgeted turn (a partial table, or the best value so far)."""

    def __init__(self, step_budget: int | None = None) -> None:
        if step_budget is not None and step_budget < 1:
            raise ValueError(f"step_budget must be >= 1 or None, got {step_budget}")
        self.step_budget = step_budget

    def __call__(self, messages: Sequence[Message], tools) -> Message | str:
        task = next((m.get("content") or "" for m in messages if m.get("role") == "user"), "")
        r = _Reader(tool_history(messages))
        last = self.step_budget is not None and sum(m.get("role") == "assistant" for m in messages) + 1 >= \
            self.step_budget
        out = self._act(task, r)
        if last and isinstance(out, dict):  # no turn left for the call: answer from what is known
            r.final = True
            out = self._act(task, r)
        return out

    def _act(self, task: str, r: _Reader) -> Message | str:
        if m := _WIDE_ALL.search(task):
            return self._wide(r, None, m.group(1))
        if m := _WIDE_SOME.search(task):
            return self._wide(r, [n.strip() for n in m.group(1).split(";")], None)
        if m := _DEEP_ALL.search(task):
            kind = "born" if "oldest" in m.group(1) else "population"
            return self._deep(r, kind, [c.strip() for c in m.group(2).split(";")])
        if m := _DEEP_ONE.search(task):
            kind = "born" if "birth year" in m.group(1) else "population"
            return self._deep(r, kind, [m.group(2).strip()])
        if m := _LONG_ALL.search(task):
            return self._long(r, m.group(1), None, None, m.group(2))
        if m := _LONG_SOME.search(task):
            return self._long(r, m.group(1), int(m.group(2)), int(m.group(3)), m.group(4))
        return "I cannot parse this task."

    def _wide(self, r: _Reader, names, sector):
        if names is None:
            state, got = r.doc(f"Corporate registry: {sector} companies", f"corporate registry {sector} companies")
            if state == "call":
                return _call(*got)
            names = re.findall(r"^- (.+)$", got or "", re.MULTILINE)
        rows = []
        for name in names:
            state, got = r.doc(name)
            if state == "call":
                return _call(*got)
            if state == "text":
                rows.append(_company_row(name, got))
        return markdown_table(rows, WIDE_COLUMNS)

    def _deep(self, r: _Reader, kind: str, companies):
        values = {}
        for company in companies:
            state, got = r.doc(company)
            if state == "call":
                return _call(*got)
            if state == "missing":
                continue
            row = _company_row(company, got)
            target = row["chief executive"] if kind == "born" else row["headquarters"]
            state, got = r.doc(target)
            if state == "call":
                return _call(*got)
            m = (_BORN if kind == "born" else _POPULATION).search(got or "")
            if m:
                values[company] = int(m.group(1))
        if not values:
            return "Answer: unknown"
        if len(companies) == 1:
            return f"Answer: {values[companies[0]]}"
        pick = min if kind == "born" else max
        return f"Answer: {pick(values, key=values.get)}"

    def _long(self, r: _Reader, doc_id: str, first, last, department: str):
        pages = r.pages.get(doc_id, {})
        if first is None:
            if 1 not in pages:
                return "Answer: 0" if r.final else _call("open", {"id": doc_id, "page": 1})
            first, last = 1, r.n_pages[doc_id]
        for p in range(first, last + 1):
            if p not in pages and not r.final:
                return _call("open", {"id": doc_id, "page": p})
        total = sum(int(a) for p in range(first, last + 1) if p in pages for d, a in _ENTRY.findall(pages[p])
                    if d == department)
        return f"Answer: {total}"


WORKER_PROMPT = ("You are a meticulous research assistant. Use the search and open tools to find exactly what the "
                 "task asks for, then answer concisely in the requested format.")


class ScriptedOrchestrator:
    """Splits a task into subtasks of `per_agent` items, assigns them all in one turn, retries failures once."""

    def __init__(self, per_agent: int = 4, pages_per_agent: int = 2) -> None:
        if per_agent < 1 or pages_per_agent < 1:
            raise ValueError("per_agent and pages_per_agent must be >= 1")
        self.per_agent, self.pages_per_agent = per_agent, pages_per_agent

    def __call__(self, messages: Sequence[Message], tools) -> Message | str:
        task = next((m.get("content") or "" for m in messages if m.get("role") == "user"), "")
        history = tool_history(messages)
        if not any(n == "create_subagent" for n, _, _ in history):
            first = [("create_subagent", {"name": "researcher", "system_prompt": WORKER_PROMPT})]
        else:
            first = []
        r = _Reader(history)
        if m := _WIDE_ALL.search(task):
            state, got = r.doc(f"Corporate registry: {m.group(1)} companies",
                               f"corporate registry {m.group(1)} companies")
            if state == "call":
                return assistant_message(None, tool_calls=[*first, got])
            names = re.findall(r"^- (.+)$", got or "", re.MULTILINE)
            chunks = [names[i:i + self.per_agent] for i in range(0, len(names), self.per_agent)]
            prompts = [f"Compile a table of the following companies: {'; '.join(c)}. Columns: "
                       f"{', '.join(WIDE_COLUMNS)} (founding year and employees as plain integers). Answer with one "
                       f"markdown table." for c in chunks]
            return self._waves(history, first, prompts, self._merge_tables)
        if m := _DEEP_ALL.search(task):
            cands = [c.strip() for c in m.group(2).split(";")]
            oldest = "oldest" in m.group(1)
            what = "birth year of the chief executive" if oldest else "population of the headquarters city"
            prompts = [f"Find the {what} of {c}. Give the number on a final line 'Answer: <number>'." for c in cands]
            pick = min if oldest else max
            return self._waves(history, first, prompts, lambda results: self._pick(cands, prompts, results, pick))
        if m := _LONG_ALL.search(task):
            doc_id, dept = m.group(1), m.group(2)
            if doc_id not in r.n_pages:
                return assistant_message(None, tool_calls=[*first, ("open", {"id": doc_id, "page": 1})])
            n, k = r.n_pages[doc_id], self.pages_per_agent
            prompts = [f"In the document with id {doc_id}, read pages {a} to {min(a + k - 1, n)} and add up the "
                       f"amounts that {dept} paid on those pages. Give the integer on a final line 'Answer: <total>'."
                       for a in range(1, n + 1, k)]
            return self._waves(history, first, prompts, self._sum)
        return "I cannot parse this task."

    def _waves(self, history, first, prompts, finish):
        """Create the subagent (a turn of its own unless it rode along an earlier call), then assign every
        subtask without a good result yet, at most twice each; when none is left, finish."""
        if first:
            return assistant_message(None, tool_calls=first)
        results: dict[str, str] = {}
        tries: dict[str, int] = {}
        for name, args, text in history:
            if name == "assign_task":
                p = args.get("prompt", "")
                tries[p] = tries.get(p, 0) + 1
                if not text.startswith(_FAILED):
                    results[p] = text
        todo = [p for p in prompts if p not in results and tries.get(p, 0) < 2]
        if todo:
            return assistant_message(None, tool_calls=[("assign_task", {"agent": "researcher", "prompt": p})
                                                       for p in todo])
        return finish(results)

    @staticmethod
    def _merge_tables(results: dict[str, str]) -> str:
        rows = [row for text in results.values() for row in parse_markdown_table(text)]
        return markdown_table(rows, WIDE_COLUMNS)

    @staticmethod
    def _pick(cands, prompts, results, pick) -> str:
        values = {}
        for c, p in zip(cands, prompts):
            a = extract_answer(results.get(p, ""))
            if a.isdigit():
                values[c] = int(a)
        return f"Answer: {pick(values, key=values.get)}" if values else "Answer: unknown"

    @staticmethod
    def _sum(results: dict[str, str]) -> str:
        return f"Answer: {sum(int(a) for a in map(extract_answer, results.values()) if a.isdigit())}"


def scripted_policy(per_agent: int = 4, pages_per_agent: int = 2, worker_budget: int | None = None):
    """One function for both roles: the orchestrator when `assign_task` is offered, else the worker
    (`ScriptedWorker(worker_budget)`)."""
    orchestrator, worker = ScriptedOrchestrator(per_agent, pages_per_agent), ScriptedWorker(worker_budget)

    def policy(messages: Sequence[Message], tools) -> Message | str:
        names = {(t.get("function") or {}).get("name") for t in tools or ()}
        return (orchestrator if "assign_task" in names else worker)(messages, tools)

    return policy
