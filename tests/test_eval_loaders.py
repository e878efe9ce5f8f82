"""Evaluation data and statistics without a model: the loaders' shapes and errors, the majority
vote, the Wilson interval, the summary table and the plot."""

from __future__ import annotations

import json

import pytest

from hogwild_ray.errors import InvalidRequestError
from hogwild_ray.eval.loaders import load_problems, parse_row
from hogwild_ray.eval.report import markdown, plot, summarise
from hogwild_ray.eval.runner import RunSpec, plan
from hogwild_ray.eval.stats import majority, wilson


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("row, want", [
    ({"problem": "2+2?", "answer": "4"}, {"id": 0, "problem": "2+2?", "answer": "4"}),
    ({"id": "q7", "problem": "2+2?", "answer": 4}, {"id": "q7", "problem": "2+2?", "answer": "4"}),
    # GSM8K: the reference is the text after the last ####
    ({"question": "Tom has 3 ...", "answer": "He has 3 + 4 = <<3+4=7>>7.\n#### 1,007"},
     {"id": 0, "problem": "Tom has 3 ...", "answer": "1,007"}),
    # MATH: no answer field, the solution's last \boxed{}
    ({"problem": "Find x.", "solution": "So $x = \\boxed{\\frac{1}{2}}$.", "level": "Level 3",
      "unique_id": "test/algebra/1.json"},
     {"id": "test/algebra/1.json", "problem": "Find x.", "answer": "\\frac{1}{2}"}),
    # MATH-500 / LIMO: an answer field wins over the solution
    ({"question": "Find y.", "solution": "... \\boxed{3}", "answer": "3/1"}, {"id": 0, "problem": "Find y.", "answer": "3/1"}),
    # an answer field holding a whole solution is cut to its box
    ({"problem": "Find z.", "answer": "Thus z is \\boxed{12}."}, {"id": 0, "problem": "Find z.", "answer": "12"}),
    # AIME: capitalised fields, integer answers
    ({"ID": "2024-I-1", "Problem": "Every morning Aya ...", "Answer": 204, "Solution": "..."},
     {"id": "2024-I-1", "problem": "Every morning Aya ...", "answer": "204"}),
    ({"id": 3, "PROBLEM": "Q?", "ANSWER": "033"}, {"id": 3, "problem": "Q?", "answer": "033"}),
])
def test_every_shape(row, want):
    assert parse_row(row, 0, "f.jsonl:1") == want


@pytest.mark.parametrize("row, words", [
    ({"text": "2+2?", "label": "4"}, ["f.jsonl:3", "lacks a problem", "text, label"]),
    ({"question": "2+2?", "solution": "it is four"}, ["f.jsonl:3", "lacks an answer", "question, solution"]),
    ({"problem": "  ", "answer": "4"}, ["lacks a problem"]),
    (["2+2?", "4"], ["f.jsonl:3", "not an object"]),
    ({"problem": "2+2?", "answer": "4", "id": [1]}, ["f.jsonl:3", "ids must be"]),
])
def test_a_row_that_fits_no_shape_names_line_and_fields(row, words):
    with pytest.raises(InvalidRequestError) as e:
        parse_row(row, 2, "f.jsonl:3")
    for w in words:
        assert w in str(e.value)


def test_load_problems_files(tmp_path):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "a?", "answer": "x #### 5"}, "",
                                                 {"question": "b?", "answer": "#### 6"}])
    assert load_problems(path) == [{"id": 0, "problem": "a?", "answer": "5"}, {"id": 1, "problem": "b?", "answer": "6"}]
    array = tmp_path / "aime.json"
    array.write_text(json.dumps([{"ID": "a", "Problem": "p", "Answer": 1}]))
    assert load_problems(array) == [{"id": "a", "problem": "p", "answer": "1"}]
    with pytest.raises(InvalidRequestError, match=r"bad.jsonl:2 is not JSON"):
        load_problems(write_jsonl(tmp_path / "bad.jsonl", [{"problem": "p", "answer": 1}, "{oops"]))
    with pytest.raises(InvalidRequestError, match=r"dup.jsonl:2: id 'x' appears twice"):
        load_problems(write_jsonl(tmp_path / "dup.jsonl", [{"id": "x", "problem": "p", "answer": 1}] * 2))
    with pytest.raises(InvalidRequestError, match=r"shape.jsonl:2 fits no known shape"):
        load_problems(write_jsonl(tmp_path / "shape.jsonl", [{"problem": "p", "answer": 1}, {"prompt": "p"}]))
    with pytest.raises(InvalidRequestError, match="is not a file"):
        load_problems(tmp_path / "missing.jsonl")
    with pytest.raises(InvalidRequestError, match="holds no problems"):
        load_problems(write_jsonl(tmp_path / "empty.jsonl", [""]))


@pytest.mark.parametrize("answers, want", [
    (["42", "41", "42"], "42"),
    (["41", "42"], "41"),  # a tie: the first given
    (["7", "42", "$42", "42.0", "7"], "42"),  # equal numbers vote together; the first spelling is kept
    ([None, None, "5"], "5"),  # no answer does not vote
    ([None, "5", "6", None, "6"], "6"),
    ([None, None], None),
    (["x = 3", "3", "\\text{3}"], "x = 3"),
    (["", " ", "9"], "9"),
])
def test_majority(answers, want):
    assert majority(answers) == want


@pytest.mark.parametrize("k, n, lo, hi", [
    (0, 10, 0.0, 0.2775),
    (5, 10, 0.2366, 0.7634),
    (10, 10, 0.7225, 1.0),
    (1, 2, 0.0945, 0.9055),
    (81, 100, 0.7222, 0.8749),
])
def test_wilson_interval(k, n, lo, hi):
    got = wilson(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson(11, 10)


def test_plan_of_configurations():
    specs = plan(["single", "independent", "hogwild"], [1, 2, 4], ["combined", "interleaved"])
    assert [s.label for s in specs] == [
        "single", "independent x2", "independent x4", "hogwild combined x1", "hogwild interleaved x1",
        "hogwild combined x2", "hogwild interleaved x2", "hogwild combined x4", "hogwild interleaved x4"]
    assert plan(["independent"], [1], ["combined"]) == []


def record(pid, mode, workers, layout, budget, correct):
    return {"id": pid, "mode": mode, "workers": workers, "layout": layout, "budget": budget, "correct": correct,
            "tokens_per_worker": [budget, budget + 2], "forward_passes": budget, "seconds": 1.0}


def test_summary_table_and_plot(tmp_path):
    recs = [record(i, "hogwild", 2, "combined", b, i < k) for b, k in ((8, 1), (16, 3)) for i in range(4)]
    recs += [record(i, "single", 1, None, b, False) for b in (8, 16) for i in range(4)]
    rows = summarise(recs, [RunSpec("single", 1), RunSpec("hogwild", 2, "combined")])
    assert [(r.spec.mode, r.budget, r.n, r.correct) for r in rows] == [
        ("single", 8, 4, 0), ("single", 16, 4, 0), ("hogwild", 8, 4, 1), ("hogwild", 16, 4, 3)]
    assert rows[3].accuracy == 0.75 and rows[3].tokens_per_worker == 17
    table = markdown(rows).splitlines()
    assert table[0].startswith("| mode | layout | workers | budget | accuracy | 95% CI |")
    assert table[2].startswith("| single | - | 1 | 8 | 0.0% | 0.0% - 49.0% | 4 |")
    assert table[5].startswith("| hogwild | combined | 2 | 16 | 75.0% | 30.1% - 95.4% | 4 |")
    plot(rows, tmp_path / "accuracy.png")
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
