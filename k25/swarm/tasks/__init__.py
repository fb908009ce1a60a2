"""Offline tasks that reward parallel decomposition (report §3 "Prompt Construction"): wide search (a table
over many entities), deep search (several branches, aggregated at the end) and long-document analysis.

`SwarmEnv(seed)` builds the generated world, its search index and the `search` / `open` tools;
`env.tasks(kind, split, n)` draws seeded tasks of a split; `task.score(answer_text)` scores a final answer
(wide search: `score_table`'s item_f1 / row_f1 / success; the others: exact match as `success`).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from k25.swarm.scoring import parse_markdown_table, score_answer, score_table
from k25.swarm.tasks.kb import SPLITS, World, build_world
from k25.tools.search import SearchIndex, search_tools

TASK_KINDS = ("wide_search", "deep_search", "long_doc")
WIDE_COLUMNS = ("company", "founded", "headquarters", "employees", "chief executive")


@dataclasses.dataclass(frozen=True)
class SwarmTask:
    task_id: str
    kind: str
    split: str
    prompt: str
    gold: Any  # wide_search: list of row dicts; otherwise the answer string
    info: dict = dataclasses.field(default_factory=dict)  # what the task was generated from

    def score(self, answer: str) -> dict[str, float]:
        if self.kind == "wide_search":
            return score_table(parse_markdown_table(answer), self.gold, key=WIDE_COLUMNS[0])
        return score_answer(answer, self.gold)


def wide_prompt(sector: str) -> str:
    return (f"Compile a table of every company in the {sector} sector listed in the corporate registry, with the "
            f"columns: {', '.join(WIDE_COLUMNS)}. Give the founding year and the number of employees as plain "
            f"integers. Answer with one markdown table with exactly these columns and one row per company.")


def deep_prompt(question: str, candidates: list[str]) -> str:
    q = {"oldest_ceo": "Which of these companies has the oldest chief executive (the one born earliest)",
         "largest_hq": "Which of these companies is headquartered in the most populous city"}[question]
    return f"{q}: {'; '.join(candidates)}? Give the company name on a final line 'Answer: <company>'."


def long_doc_prompt(title: str, doc_id: str, department: str) -> str:
    return (f"The document '{title}' (id: {doc_id}) is a long ledger of payments spread over several pages. "
            f"What is the total amount, in crowns, that {department} paid across the whole ledger? "
            f"Give the integer on a final line 'Answer: <total>'.")


class SwarmEnv:
    """The world of one seed, its search index and tools. Tools are stateless and shared by episodes."""

    def __init__(self, seed: int = 0, *, page_chars: int = 1000, **world_kwargs) -> None:
        self.seed = seed
        self.world: World = build_world(seed, **world_kwargs)
        self.index = SearchIndex(self.world.docs, page_chars=page_chars)

    def tools(self) -> list:
        return search_tools(self.index)

    def tasks(self, kind: str, split: str = "heldout", n: int | None = None, *, branches: int = 4,
              stream: int = 0) -> list[SwarmTask]:
        """`n` seeded tasks of `kind` from `split` (all wide-search sectors of the split when n is None).
        `stream` > 0 draws another sequence of deep-search questions from the same split (the other kinds
        enumerate a fixed set and take it in another order)."""
        if kind not in TASK_KINDS:
            raise ValueError(f"unknown task kind {kind!r}; known: {TASK_KINDS}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
        rng = random.Random(f"{self.seed}/{kind}/{split}" + (f"/{stream}" if stream else ""))
        make = {"wide_search": self._wide, "deep_search": self._deep, "long_doc": self._long}[kind]
        return make(split, n, rng, branches, stream)

    def _wide(self, split, n, rng, branches, stream):
        w = self.world
        sectors = [s for s in w.sectors if w.sector_split[s] == split]
        rng.shuffle(sectors)
        if n is not None and n > len(sectors):
            raise ValueError(f"wide_search has {len(sectors)} {split} tasks (one per sector), asked for {n}")
        out = []
        for s in sectors[: n if n is not None else len(sectors)]:
            rows = [{"company": c.name, "founded": str(c.founded), "headquarters": c.headquarters,
                     "employees": str(c.employees), "chief executive": c.ceo}
                    for c in (w.companies[m] for m in w.sectors[s])]
            out.append(SwarmTask(f"wide/{split}/{s.replace(' ', '_')}", "wide_search", split, wide_prompt(s), rows,
                                 {"sector": s, "entities": len(rows)}))
        return out

    def _deep(self, split, n, rng, branches, stream):
        w = self.world
        pool = sorted(c for s, members in w.sectors.items() if w.sector_split[s] == split for c in members)
        value = {"oldest_ceo": lambda c: w.people[w.companies[c].ceo].born,
                 "largest_hq": lambda c: w.cities[w.companies[c].headquarters].population}
        out = []
        for i in range(10 if n is None else n):
            question = ("oldest_ceo", "largest_hq")[i % 2]
            while True:  # candidates with distinct values, so the answer is unique
                cands = rng.sample(pool, branches)
                vals = [value[question](c) for c in cands]
                if len(set(vals)) == len(vals):
                    break
            pick = min if question == "oldest_ceo" else max
            gold = pick(cands, key=value[question])
            tid = f"deep/{split}/{i:03d}" if not stream else f"deep/{split}/s{stream}/{i:03d}"
            out.append(SwarmTask(tid, "deep_search", split, deep_prompt(question, cands), gold,
                                 {"question": question, "candidates": cands}))
        return out

    def _long(self, split, n, rng, branches, stream):
        w = self.world
        pairs = [(led, d) for led in w.ledgers if led.split == split for d in sorted({e[1] for e in led.entries})]
        rng.shuffle(pairs)
        if n is not None and n > len(pairs):
            raise ValueError(f"long_doc has {len(pairs)} {split} tasks, asked for {n}")
        out = []
        for led, dept in pairs[: 10 if n is None else n]:
            total = sum(amount for _, d, amount, _ in led.entries if d == dept)
            title = f"Ledger of the {led.org}"
            out.append(SwarmTask(f"long/{split}/{led.doc_id}/{dept.replace(' ', '_')}", "long_doc", split,
                                 long_doc_prompt(title, led.doc_id, dept), str(total),
                                 {"doc_id": led.doc_id, "department": dept,
                                  "pages": len(self.index.pages[led.doc_id])}))
        return out
