"""Offline `search` and `open` tools over a local document collection (BM25 through `bm25s`).

They stand in for web search and browsing in the swarm's tasks: `search{query, top_k}` returns ranked
titles, ids and snippets; `open{id, page}` returns one page of a document (long documents are split into
pages, so reading one takes several steps). No network. Arguments arrive validated against `parameters` by
`k25.tools.base.Toolset`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import bm25s

from k25.tools.base import Tool, ToolResult


@dataclasses.dataclass(frozen=True)
class Document:
    doc_id: str
    title: str
    text: str


def split_pages(text: str, page_chars: int) -> list[str]:
    """Pages of at most ~`page_chars` characters, cut at line breaks (a longer single line is its own page)."""
    pages, current = [], ""
    for line in text.splitlines(keepends=True):
        if current and len(current) + len(line) > page_chars:
            pages.append(current)
            current = ""
        current += line
    if current or not pages:
        pages.append(current)
    return pages


class SearchIndex:
    """BM25 over titles and texts of `docs`; pages for `open`."""

    def __init__(self, docs: Sequence[Document], *, page_chars: int = 3000, snippet_chars: int = 200) -> None:
        if not docs:
            raise ValueError("SearchIndex needs at least one document")
        self.docs = list(docs)
        self.by_id = {d.doc_id: d for d in self.docs}
        if len(self.by_id) != len(self.docs):
            raise ValueError("document ids must be unique")
        self.page_chars, self.snippet_chars = page_chars, snippet_chars
        self.pages = {d.doc_id: split_pages(d.text, page_chars) for d in self.docs}
        tokens = bm25s.tokenize([f"{d.title}\n{d.text}" for d in self.docs], stopwords="en", show_progress=False)
        self.bm25 = bm25s.BM25()
        self.bm25.index(tokens, show_progress=False)

    def search(self, query: str, top_k: int = 5) -> list[tuple[Document, float]]:
        q = bm25s.tokenize([query], stopwords="en", show_progress=False, return_ids=False)
        if not q[0]:
            return []
        ids, scores = self.bm25.retrieve(q, k=min(top_k, len(self.docs)), show_progress=False)
        return [(self.docs[int(i)], float(s)) for i, s in zip(ids[0], scores[0]) if s > 0]


class SearchTool(Tool):
    name = "search"
    description = "Search the document collection. Returns the best-matching documents' titles, ids and snippets."
    parameters = {
        "type": "object",
        "properties": {"query": {"type": "string", "description": "search keywords"},
                       "top_k": {"type": "integer", "minimum": 1, "maximum": 20,
                                 "description": "number of results (default 5)"}},
        "required": ["query"],
    }

    def __init__(self, index: SearchIndex) -> None:
        self.index = index

    async def call(self, arguments: Mapping[str, Any]) -> ToolResult:
        hits = self.index.search(arguments["query"], arguments.get("top_k", 5))
        if not hits:
            return ToolResult(text=f"No results for {arguments['query']!r}.")
        lines = []
        for rank, (doc, _) in enumerate(hits, 1):
            snippet = " ".join(doc.text[: self.index.snippet_chars].split())
            lines.append(f"[{rank}] {doc.title} (id: {doc.doc_id})\n{snippet}...")
        return ToolResult(text="\n\n".join(lines))


class OpenTool(Tool):
    name = "open"
    description = "Open a document by its id (from search results) and read one page of it."
    parameters = {
        "type": "object",
        "properties": {"id": {"type": "string", "description": "document id"},
                       "page": {"type": "integer", "minimum": 1,
                                "description": "page number, starting at 1 (default 1)"}},
        "required": ["id"],
    }

    def __init__(self, index: SearchIndex) -> None:
        self.index = index

    async def call(self, arguments: Mapping[str, Any]) -> ToolResult:
        doc_id, page = arguments["id"].strip(), arguments.get("page", 1)
        doc = self.index.by_id.get(doc_id)
        if doc is None:
            return ToolResult(error=f"open: no document with id {doc_id!r}; use an id from the search results")
        pages = self.index.pages[doc_id]
        if page > len(pages):
            return ToolResult(error=f"open: {doc_id} has pages 1-{len(pages)}, got page {page}")
        return ToolResult(text=f"{doc.title} (id: {doc.doc_id}) - page {page} of {len(pages)}\n\n{pages[page - 1]}")


def search_tools(index: SearchIndex) -> list[Tool]:
    """The `search` and `open` tools over one index."""
    return [SearchTool(index), OpenTool(index)]
