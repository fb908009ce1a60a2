"""Rule-based rewards on hand-computed cases, and the Hungarian soft-F1 against a brute-force reference."""

import itertools
import math

import numpy as np
import pytest

from k25.rl.rewards import (
    box_iou,
    code_tests,
    counting_score,
    exact_match,
    extract_code,
    final_answer,
    grounding_f1,
    math_answer,
    ocr_score,
    parse_boxes,
    parse_number,
    parse_points,
    point_f1,
    polygon_iou,
)

A, B, C = (0, 0, 10, 10), (20, 20, 30, 30), (100, 100, 110, 110)


def brute_soft_f1(scores, p, g):
    """Best one-to-one total of the p x g `scores` by trying every assignment (plain loops), then 2 TP/(P+G)."""
    p, g = int(p), int(g)
    if p + g == 0:
        return 1.0
    if p == 0 or g == 0:
        return 0.0
    best = 0.0
    if p <= g:
        for cols in itertools.permutations(range(g), p):
            best = max(best, sum(scores[i][c] for i, c in enumerate(cols)))
    else:
        for rows in itertools.permutations(range(p), g):
            best = max(best, sum(scores[r][j] for j, r in enumerate(rows)))
    return 2 * best / (p + g)


def loop_iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda x: max(0.0, x[2] - x[0]) * max(0.0, x[3] - x[1])
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def test_grounding_hand_cases():
    assert grounding_f1([A], [A]) == 1.0
    assert grounding_f1([], []) == 1.0  # nothing to find, nothing predicted
    assert grounding_f1([], [A]) == 0.0  # empty prediction
    assert grounding_f1([A], []) == 0.0
    # IoU((0,0,10,10), (0,0,10,20)) = 100 / 200 = 0.5: a soft match of 0.5 at threshold 0.5, a miss at 0.6
    assert grounding_f1([(0, 0, 10, 10)], [(0, 0, 10, 20)]) == pytest.approx(0.5)
    assert grounding_f1([(0, 0, 10, 10)], [(0, 0, 10, 20)], iou_threshold=0.6) == 0.0
    # duplicates match once: TP = 1, P = 2, G = 1 -> 2/3
    assert grounding_f1([A, A], [A]) == pytest.approx(2 / 3)
    # more predictions than targets: TP = 2, P = 3, G = 2 -> 4/5
    assert grounding_f1([A, B, C], [A, B]) == pytest.approx(4 / 5)
    # fewer: TP = 1, P = 1, G = 3 -> 2/4
    assert grounding_f1([B], [A, B, C]) == pytest.approx(0.5)
    # degenerate predicted box (x2 < x1) has zero area
    assert grounding_f1([(10, 0, 0, 10)], [A]) == 0.0


def test_grounding_optimal_not_greedy():
    """P1 overlaps both targets, P2 only G1: greedy (P1-G1 first) leaves P2 unmatched; Hungarian does not."""
    g1, g2 = (0, 0, 10, 10), (3, 0, 13, 10)
    p1, p2 = (1, 0, 11, 10), (0, 0, 8, 10)
    ious = [[loop_iou(p, g) for g in (g1, g2)] for p in (p1, p2)]
    assert ious[0][0] > ious[1][0] and ious[1][1] < 0.5 <= ious[0][1]  # the greedy trap is set
    want = 2 * (ious[0][1] + ious[1][0]) / 4
    greedy = 2 * ious[0][0] / 4
    assert grounding_f1([p1, p2], [g1, g2]) == pytest.approx(want)
    assert want > greedy


def test_grounding_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(30):
        p, g = rng.integers(0, 5), rng.integers(0, 5)
        mk = lambda n: [tuple(float(v) for v in (x, y, x + w, y + h)) for x, y, w, h in rng.uniform(0, 20, (n, 4))]
        pred, gt = mk(p), mk(g)
        thr = float(rng.choice([0.0, 0.3, 0.5]))
        scores = [[(lambda v: v if v >= thr else 0.0)(loop_iou(a, b)) for b in gt] for a in pred]
        assert grounding_f1(pred, gt, iou_threshold=thr) == pytest.approx(brute_soft_f1(scores, p, g), abs=1e-12)
        if p and g:
            np.testing.assert_allclose(box_iou(np.array(pred), np.array(gt)),
                                       [[loop_iou(a, b) for b in gt] for a in pred], atol=1e-12)


def test_point_f1_hand_cases():
    # distance 5, sigma 5: s = exp(-25 / 50); one pred, one target -> F1 = s
    assert point_f1([(0, 0)], [(3, 4)], sigma=5.0) == pytest.approx(math.exp(-0.5))
    assert point_f1([], [(3, 4)], sigma=5.0) == 0.0
    assert point_f1([], [], sigma=5.0) == 1.0
    assert point_f1([(1, 1), (1, 1)], [(1, 1)], sigma=2.0) == pytest.approx(2 / 3)  # duplicate
    # swapped order still matches each point to its own target
    assert point_f1([(50, 50), (0, 0)], [(0, 0), (50, 50)], sigma=1.0) == pytest.approx(1.0)
    rng = np.random.default_rng(1)
    for _ in range(20):
        p, g = rng.integers(0, 4), rng.integers(0, 4)
        pred, gt = rng.uniform(0, 10, (p, 2)), rng.uniform(0, 10, (g, 2))
        scores = [[math.exp(-((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2) / (2 * 9.0)) for b in gt] for a in pred]
        assert point_f1(pred.tolist(), gt.tolist(), sigma=3.0) == pytest.approx(brute_soft_f1(scores, p, g))
    with pytest.raises(ValueError, match="sigma"):
        point_f1([(0, 0)], [(0, 0)], sigma=0)
    with pytest.raises(ValueError, match="pred_points"):
        point_f1([(0, 0, 1)], [(0, 0)], sigma=1)


def test_polygon_iou():
    sq = [(0, 0), (2, 0), (2, 2), (0, 2)]
    shifted = [(1, 0), (3, 0), (3, 2), (1, 2)]
    assert polygon_iou(sq, sq) == pytest.approx(1.0)
    assert polygon_iou(shifted, sq) == pytest.approx(2 / 6)
    # a bow-tie (self-intersecting) is repaired into two triangles of area 1 each, inside the square
    assert polygon_iou([(0, 0), (2, 2), (2, 0), (0, 2)], sq) == pytest.approx(2 / 4)
    assert polygon_iou([], sq) == 0.0
    assert polygon_iou([(0, 0), (1, 1)], sq) == 0.0
    assert polygon_iou([(0, 0), (1, 1), (2, 2)], sq) == 0.0  # collinear: zero area
    with pytest.raises(ValueError, match="gt"):
        polygon_iou(sq, [(0, 0), (1, 1)])
    # rasterised masks (the report's way): Pillow fills boundary pixels, so a square from 10 to 50 covers
    # 41 x 41 pixels; shifted by 20 the overlap is 21 x 41
    a = [(10, 10), (50, 10), (50, 50), (10, 50)]
    b = [(30, 10), (70, 10), (70, 50), (30, 50)]
    inter, each = 21 * 41, 41 * 41
    assert polygon_iou(a, b, image_size=(100, 100)) == pytest.approx(inter / (2 * each - inter))
    assert abs(polygon_iou(a, b, image_size=(100, 100)) - polygon_iou(a, b)) < 0.02


def test_ocr_score():
    assert ocr_score("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert ocr_score("", "") == 1.0
    assert ocr_score("", "abc") == 0.0
    assert ocr_score("abc", "abc") == 1.0
    assert ocr_score("abcd", "abc") == pytest.approx(0.75)


def test_counting_score():
    assert counting_score(4, 4) == 1.0
    assert counting_score(3, 4) == pytest.approx(0.75)
    assert counting_score(5, 4) == pytest.approx(0.75)
    assert counting_score(8, 4) == 0.0
    assert counting_score(0, 0) == 1.0 and counting_score(1, 0) == 0.0
    assert counting_score("There are\nAnswer: 5", 4) == pytest.approx(0.75)
    assert counting_score(None, 4) == 0.0 and counting_score("no idea", 4) == 0.0
    with pytest.raises(ValueError, match="gt"):
        counting_score(3, -1)


def test_exact_match_and_parsers():
    assert exact_match(" Paris\n", "Paris") == 1.0
    assert exact_match("paris", "Paris") == 0.0 and exact_match("paris", "Paris", ignore_case=True) == 1.0
    assert exact_match("New  York", ["NYC", "New York"]) == 1.0
    assert final_answer("think... \\boxed{\\frac{1}{2}} then \\boxed{7}") == "7"
    assert final_answer("reasoning\nAnswer: 42") == "42"
    assert parse_boxes("Answer: [(1, 2, 3, 4), [5,6,7,8]] (9, 9)") == [(1, 2, 3, 4), (5, 6, 7, 8)]
    assert parse_points("Answer: [(1.5, 2), (3, -4)]") == [(1.5, 2.0), (3.0, -4.0)]
    assert parse_number("Answer: 1,234") == 1234.0 and parse_number("Answer: none") is None
    assert extract_code("text\n```python\nx = 1\n```\nmore\n```python\ny = 2\n```") == "y = 2"


def test_math_answer():
    assert math_answer("So the answer is \\boxed{\\frac{1}{2}}.", "0.5") == 1.0
    assert math_answer("Answer: x^2 - 1", "(x-1)(x+1)") == 1.0  # plain text, needs the LaTeX re-parse
    assert math_answer("Answer: x^2 + 1", "(x-1)(x+1)") == 0.0
    assert math_answer("\\boxed{3}", "4") == 0.0
    assert math_answer("", "3") == 0.0
    assert math_answer('Answer: __import__("os").system("true")', "0") == 0.0  # never evaluated


class RecordingSandbox:
    """Stands in for the Python tool to check the reward's composition: a snippet 'fails' when it contains
    a marker; nothing is executed."""

    class Result:
        def __init__(self, error):
            self.error, self.text, self.images = error, "", []

    def __init__(self):
        self.runs = []

    def run(self, code):
        self.runs.append(code)
        return self.Result("AssertionError" if "FAIL" in code else None)


def test_code_tests_composition():
    sb = RecordingSandbox()
    assert code_tests("def f(): pass", ["assert 1", "assert 2 # FAIL", "assert 3"], sandbox=sb) == pytest.approx(2 / 3)
    assert sb.runs[0] == "def f(): pass" and all(r.startswith("def f(): pass\n\n") for r in sb.runs[1:])
    assert code_tests("def f(): pass", ["assert 1", "FAIL"], sandbox=RecordingSandbox(), all_or_nothing=True) == 0.0
    assert code_tests("FAIL", ["assert 1"], sandbox=RecordingSandbox()) == 0.0  # the program itself fails
    with pytest.raises(ValueError, match="tests"):
        code_tests("x = 1", [], sandbox=RecordingSandbox())


def test_code_tests_in_sandbox():
    python = pytest.importorskip("k25.tools.python")
    sandbox = python.PythonSandbox()
    program = "def add(a, b):\n    return a + b\n"
    assert code_tests(program, ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"], sandbox=sandbox) == 1.0
    assert code_tests(program, ["assert add(1, 2) == 3", "assert add(1, 1) == 3"], sandbox=sandbox) == 0.5
    assert code_tests("def add(a, b) return", ["assert add(1, 2) == 3"], sandbox=sandbox) == 0.0
    # a test that rebinds the function does not decide the next one
    assert code_tests(program, ["add = None", "assert add(2, 2) == 4"], sandbox=sandbox) == 1.0
    sandbox.close()
    with python.PythonSandbox(timeout_s=1.0) as slow:
        assert code_tests("while True:\n    pass\n", ["assert True"], sandbox=slow) == 0.0
    # the default: a fresh sandbox per call, from the response's code block
    response = "Here:\n```python\n" + program + "```"
    assert code_tests(extract_code(response), ["assert add(3, 4) == 7"]) == 1.0
