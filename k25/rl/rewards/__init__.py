"""Rewards for RL: rule-based verifiers, vision rewards, the GRM judge and per-task specs.

Every rule-based reward is a plain function returning a float in [0, 1]; its docstring gives the formula.
"""

from k25.rl.rewards.answers import counting_score, exact_match, math_answer, ocr_score
from k25.rl.rewards.code import code_tests, extract_code
from k25.rl.rewards.geometry import box_iou, grounding_f1, point_f1, polygon_iou, soft_f1
from k25.rl.rewards.grm import GRMJudge, JudgeError, Judgment, judge_client, parse_score
from k25.rl.rewards.parse import final_answer, parse_boxes, parse_number, parse_points, parse_polygon
from k25.rl.rewards.safety import refusal_match
from k25.rl.rewards.spec import RULES, RewardResult, RewardSpec, compute_reward

__all__ = [
    "RULES", "GRMJudge", "JudgeError", "Judgment", "RewardResult", "RewardSpec", "box_iou", "code_tests",
    "compute_reward", "counting_score", "exact_match", "extract_code", "final_answer", "grounding_f1", "judge_client",
    "math_answer", "ocr_score", "parse_boxes", "parse_number", "parse_points", "parse_polygon", "parse_score",
    "point_f1", "polygon_iou", "refusal_match", "soft_f1",
]
