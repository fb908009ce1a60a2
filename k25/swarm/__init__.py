"""Agent Swarm (report §3, Appendix E): orchestrator runtime, critical steps, table scoring, offline tasks."""

from k25.swarm.config import BENCHMARK_STEP_LIMITS, SwarmConfig
from k25.swarm.critical import critical_steps
from k25.swarm.orchestrator import EpisodeTrace, run_single, run_swarm
from k25.swarm.scoring import normalize_cell, parse_markdown_table, score_answer, score_table

__all__ = ["BENCHMARK_STEP_LIMITS", "EpisodeTrace", "SwarmConfig", "critical_steps", "normalize_cell",
           "parse_markdown_table", "run_single", "run_swarm", "score_answer", "score_table"]
