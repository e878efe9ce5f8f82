"""Evaluation data and statistics without a model: the loaders' shapes and errors, the majority
vote, the Wilson interval, the summary table and the plot, merging part files, naming the device."""

from __future__ import annotations

import ast
import json
import platform
from pathlib import Path

import pytest

from hogwild_ray import devices
from hogwild_ray.cli.eval import device_note
from hogwild_ray.errors import InvalidRequestError
from hogwild_ray.eval.experiment import Experiment, existing, merge, todo
from hogwild_ray.eval.loaders import load_problems, parse_row
from hogwild_ray.eval.report import figure, markdown, plot, series, summarise
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


def all_zero_rows(specs, budgets=(256, 512, 1024)):
    recs = [record(i, s.mode, s.workers, s.layout, b, False) for s in specs for b in budgets for i in range(4)]
    return summarise(recs, specs)


def test_lines_that_coincide_are_drawn_apart():
    specs = plan(["single", "independent", "hogwild"], [2, 4], ["combined", "interleaved"])
    lines = series(all_zero_rows(specs))  # every configuration at 0%: seven equal lines
    assert [s.label for s in lines] == [s.label for s in specs]
    assert all(s.y == [0.0, 0.0, 0.0] and s.budgets == [256, 512, 1024] for s in lines)
    for i, budget in enumerate((256, 512, 1024)):
        xs = [s.x[i] for s in lines]
        assert len(set(xs)) == len(lines) and xs == sorted(xs)  # each its own place, in legend order
        assert all(budget / 2 ** 0.2 < x < budget * 2 ** 0.2 for x in xs)  # near its budget: still readable
        assert xs[0] * xs[-1] == pytest.approx(budget ** 2)  # centred on the budget (log axis)
    assert len({s.marker for s in lines}) == len(lines)
    assert len({(s.color, s.linestyle) for s in lines}) == len(lines)
    # budgets close together: the lines stay closer to their own budget than to the next one
    close = series(all_zero_rows(specs, (100, 110)))
    assert max(s.x[0] for s in close) < min(s.x[1] for s in close)


def test_the_plots_title_and_legend_lie_within_the_figure(tmp_path):
    specs = plan(["single", "independent", "hogwild"], [2, 4, 8], ["combined", "contiguous", "interleaved"])
    title = "DeepSeek-R1-Distill-Qwen-32B-with-a-long-name: accuracy against sequential forward passes"
    fig = figure(all_zero_rows(specs), title)
    try:
        fig.canvas.draw()
        canvas = fig.bbox
        texts = [fig._suptitle, *fig.legends]
        assert fig._suptitle.get_text().replace("\n", " ") == title
        for artist in texts:
            box = artist.get_window_extent()
            assert canvas.x0 <= box.x0 and box.x1 <= canvas.x1 and canvas.y0 <= box.y0 and box.y1 <= canvas.y1
        axes = fig.axes[0].get_window_extent()
        assert not axes.overlaps(fig.legends[0].get_window_extent())  # the legend is outside the axes
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    plot(all_zero_rows(specs), tmp_path / "accuracy.png", title)
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_merge_folds_the_parts_in_and_removes_the_parts_directory(tmp_path):
    specs = [RunSpec("single", 1), RunSpec("hogwild", 2, "combined")]
    exp = Experiment([{"id": "a", "problem": "p", "answer": "1"}, {"id": "b", "problem": "q", "answer": "2"}],
                     specs, [8, 16], tmp_path)
    (tmp_path / "parts").mkdir()
    first = [record("b", "single", 1, None, b, True) for b in (8, 16)]
    second = [record("a", "single", 1, None, b, False) for b in (8, 16)]
    write_jsonl(tmp_path / "parts" / "part-1.jsonl", first)
    write_jsonl(tmp_path / "parts" / "part-0.jsonl", second)  # as an interrupted run leaves them
    assert len(todo(exp, existing(tmp_path))) == 2  # the hogwild runs
    assert merge(exp) == second + first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]
    assert len(todo(exp, existing(tmp_path))) == 2  # resuming reads results.jsonl: the same runs are left
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "notes.txt").write_text("mine")
    write_jsonl(tmp_path / "parts" / "part-0.jsonl", [record("a", "hogwild", 2, "combined", b, True)
                                                      for b in (8, 16)])
    assert len(merge(exp)) == 6 and len(todo(exp, existing(tmp_path))) == 1
    assert [p.name for p in (tmp_path / "parts").iterdir()] == ["notes.txt"]  # not ours: kept, and the directory


def test_a_merge_leaves_the_part_another_run_still_writes(tmp_path):
    """Two runs into one directory: the first to end merges what both wrote so far and removes its
    own part, not the one the other run still appends to; the other's merge then has everything."""
    from hogwild_ray.eval.experiment import new_part

    specs = [RunSpec("single", 1), RunSpec("hogwild", 2, "combined")]
    exp = Experiment([{"id": "a", "problem": "p", "answer": "1"}], specs, [8], tmp_path)
    mine, theirs = new_part(tmp_path), new_part(tmp_path)
    mine.write([record("a", "single", 1, None, 8, True)])
    theirs.write([record("a", "hogwild", 2, "combined", 8, True)])
    mine.close()
    assert len(merge(exp)) == 2  # both runs' records so far
    assert [p.name for p in (tmp_path / "parts").iterdir()] == [theirs.path.name]  # still being written: kept
    theirs.write([record("a", "hogwild", 2, "combined", 8, False)])  # (a later record of the same run)
    theirs.close()
    recs = merge(exp)
    assert [r["correct"] for r in recs] == [True, False] and not (tmp_path / "parts").exists()


def test_a_run_recorded_with_an_error_runs_again(tmp_path):
    specs = [RunSpec("single", 1)]
    exp = Experiment([{"id": "a", "problem": "p", "answer": "1"}, {"id": "b", "problem": "q", "answer": "2"}],
                     specs, [8, 16], tmp_path)
    (tmp_path / "parts").mkdir()
    failed = [{**record("b", "single", 1, None, b, False), "error": "the cache has 28 pages"} for b in (8, 16)]
    write_jsonl(tmp_path / "parts" / "part-0.jsonl", [record("a", "single", 1, None, b, True) for b in (8, 16)]
                + failed)
    assert [(i, p["id"]) for i, p, _ in todo(exp, existing(tmp_path))] == [(1, "b")]
    write_jsonl(tmp_path / "parts" / "part-1.jsonl", [record("b", "single", 1, None, b, True) for b in (8, 16)])
    assert todo(exp, existing(tmp_path)) == [] and all("error" not in r for r in merge(exp))


def test_a_rerun_may_add_problems_but_not_change_them_nor_the_model(tmp_path):
    from hogwild_ray.eval.settings_file import SETTINGS, check_and_keep

    specs = [RunSpec("single", 1)]
    a, b = {"id": "a", "problem": "2 + 2?", "answer": "4"}, {"id": "b", "problem": "3 + 3?", "answer": "6"}
    check_and_keep(tmp_path, Experiment([a], specs, [8], tmp_path, model="m").settings())  # a new directory
    check_and_keep(tmp_path, Experiment([a, b], specs, [8, 16], tmp_path, model="m").settings())  # more: fine
    assert set(json.loads((tmp_path / SETTINGS).read_text())["problems"]) == {"a", "b"}
    check_and_keep(tmp_path, Experiment([b], specs, [8], tmp_path, model="m").settings())  # fewer: fine too
    moved = {**a, "problem": "1 + 3?"}  # the same id and answer, another problem
    for exp, words in [(Experiment([moved], specs, [8], tmp_path, model="m"), "another problem text or answer "
                                                                               "under id 'a'"),
                       (Experiment([a], specs, [8], tmp_path, model="other"), "model 'm' there, 'other' now"),
                       (Experiment([a], specs, [8], tmp_path, seed=1, model="m"), "seed 0 there, 1 now")]:
        with pytest.raises(InvalidRequestError, match=words):
            check_and_keep(tmp_path, exp.settings())
    assert set(json.loads((tmp_path / SETTINGS).read_text())["problems"]) == {"a", "b"}  # left as it was
    # a directory whose runs stopped before their first record (a mistyped model, say) compares nothing
    check_and_keep(tmp_path, Experiment([moved], specs, [8], tmp_path, model="other").settings(), has_records=False)
    assert json.loads((tmp_path / SETTINGS).read_text())["model"] == "other"


def test_cpu_name_reads_proc_cpuinfo(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R)   Platinum 8480+\n"
                    "\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n")
    monkeypatch.setattr(devices, "CPUINFO", info)
    assert devices.cpu_name() == "Intel(R) Xeon(R) Platinum 8480+"
    info.write_text("processor\t: 0\nHardware\t: BCM2835\n")  # no model name (some ARM boards)
    assert devices.cpu_name() == (platform.machine() or platform.processor() or "unknown CPU")
    monkeypatch.setattr(devices, "CPUINFO", tmp_path / "missing")  # not Linux
    assert devices.cpu_name() == (platform.machine() or platform.processor() or "unknown CPU")


def test_cpu_name_on_this_machine():
    name = devices.cpu_name()
    assert name and name == name.strip()
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].split() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
              if line.startswith("model name")]
    if models:
        assert name == " ".join(models[0])


def test_device_label(monkeypatch):
    import torch

    cpu = devices.device_label("cpu")
    assert cpu == f"cpu: {devices.cpu_name()}, {devices.cpu_cores()} core{'s' * (devices.cpu_cores() != 1)}"
    assert devices.device_label(torch.device("cpu")) == cpu
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: asked.append(d) or "NVIDIA H200")
    assert devices.device_label("cuda:1") == "NVIDIA H200" == devices.device_label(torch.device("cuda"))
    assert asked == [torch.device("cuda:1"), torch.device("cuda")]
    assert device_note("cuda:1", 1) == "NVIDIA H200 (cuda:1); one engine, one run at a time (--concurrency 1)"
    assert device_note("cpu", None, 12) == (f"{cpu}; runs in shared forward passes of one engine, as many at once as fit "
                                            "in the K/V cache, 12 at the peak; wall s: each run's time, sharing passes "
                                            "with the others")
    assert device_note("cpu", 4) == (f"{cpu}; runs in shared forward passes of one engine, up to 4 at once "
                                     "(--concurrency 4); wall s: each run's time, sharing passes with the others")
    tree = ast.parse(Path(devices.__file__).read_text())  # torch only inside functions: cheap to import
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [n for n in top if "torch" in ast.dump(n)]
