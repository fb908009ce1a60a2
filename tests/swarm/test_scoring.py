"""score_table on hand-built tables, WideSearch's definitions (item / row P, R, F1; success = all of them 1)."""

import pytest

from k25.swarm import normalize_cell, parse_markdown_table, score_answer, score_table
from k25.swarm.scoring import extract_answer, markdown_table

GOLD = [{"name": "Alpha", "year": "1990", "city": "Oslo"},
        {"name": "Beta", "year": "2001", "city": "Rome"},
        {"name": "Gamma", "year": "1875", "city": "Lima"},
        {"name": "Delta", "year": "1950", "city": "New York"}]


def f1(p, r):
    return 2 * p * r / (p + r) if p + r else 0.0


def test_perfect_table_with_case_and_whitespace_differences():
    pred = [{"Name": " alpha ", "YEAR": "1990", "city": "OSLO"}, {"name": "beta", "year": " 2001", "city": "rome"},
            {"name": "GAMMA", "year": "1875", "city": "lima"}, {"name": "Delta", "year": "1950", "city": "new   york"}]
    assert score_table(pred, GOLD, "name") == {"item_f1": 1.0, "row_f1": 1.0, "success": 1.0}


def test_missing_rows_lower_recall_only():
    pred = GOLD[:3]  # Delta missing
    s = score_table(pred, GOLD, "name")
    assert s["row_f1"] == pytest.approx(f1(3 / 3, 3 / 4))
    assert s["item_f1"] == pytest.approx(f1(9 / 9, 9 / 12))
    assert s["success"] == 0.0


def test_extra_rows_lower_precision_only():
    pred = GOLD + [{"name": "Epsilon", "year": "1999", "city": "Pisa"}, {"name": "Zeta", "year": "1", "city": "x"}]
    s = score_table(pred, GOLD, "name")
    assert s["row_f1"] == pytest.approx(f1(4 / 6, 4 / 4))
    assert s["item_f1"] == pytest.approx(f1(12 / 18, 12 / 12))
    assert s["success"] == 0.0


def test_wrong_cells_count_per_item_and_spoil_the_row():
    pred = [dict(r) for r in GOLD]
    pred[0]["year"] = "1991"   # one wrong cell
    pred[1]["city"] = "Paris"  # another row, one wrong cell
    pred[2] = {"name": "Gamma", "year": "1875"}  # city missing
    s = score_table(pred, GOLD, "name")
    # key cells count as correct in matched rows: 12 - 3 wrong = 9 correct items of 12; 1 of 4 rows fully right
    assert s["item_f1"] == pytest.approx(9 / 12)
    assert s["row_f1"] == pytest.approx(1 / 4)


def test_unmatched_keys_and_duplicates():
    # a misspelled key matches nothing (a wrong row and a missing one); duplicated keys are kept once
    pred = [GOLD[0], GOLD[0], GOLD[1], {"name": "Gama", "year": "1875", "city": "Lima"}]
    s = score_table(pred, GOLD, "name")
    assert s["row_f1"] == pytest.approx(f1(2 / 3, 2 / 4))
    assert s["item_f1"] == pytest.approx(f1(6 / 9, 6 / 12))


def test_composite_key_and_empty_prediction():
    gold = [{"a": "1", "b": "x", "v": "p"}, {"a": "1", "b": "y", "v": "q"}]
    assert score_table([{"a": "1", "b": "y", "v": "Q"}], gold, ["a", "b"])["row_f1"] == pytest.approx(f1(1, 0.5))
    assert score_table([], gold, ["a", "b"]) == {"item_f1": 0.0, "row_f1": 0.0, "success": 0.0}


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="gold_rows is empty"):
        score_table([], [], "name")
    with pytest.raises(ValueError, match="key column"):
        score_table([], GOLD, "id")
    with pytest.raises(ValueError, match=r"pred_rows\[0\]"):
        score_table(["Alpha"], GOLD, "name")


def test_markdown_round_trip_takes_the_last_table():
    text = ("Here is a draft:\n| x |\n|---|\n| 1 |\n\nFinal table:\n\n" + markdown_table(GOLD, ["name", "year", "city"])
            + "\n\nDone.")
    assert parse_markdown_table(text) == GOLD
    assert parse_markdown_table("no table here") == []
    assert normalize_cell("  New\tYork \n") == "new york"


def test_short_answers():
    assert extract_answer("thinking...\nAnswer: Oslo Works\n") == "Oslo Works"
    assert extract_answer("**Final answer:** 42") == "42"
    assert score_answer("The total is large.\nAnswer: 132,504.", "132504") == {"success": 1.0}
    assert score_answer("Answer:  oslo  works", "Oslo Works") == {"success": 1.0}
    assert score_answer("Answer: Oslo", "Oslo Works") == {"success": 0.0}
