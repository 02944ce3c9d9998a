"""GenEval rule engine (EVALUATION.md §1.3, §1.5, §1.6) on hand-made detections, plus the real shared metadata."""

from __future__ import annotations

import collections
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dmdr_cli.evaluation.benchfiles import SHARED_BENCHMARKS, load_geneval_metadata, load_object_names
from dmdr_cli.evaluation.geneval import (
    Detection,
    evaluate_detections,
    filter_detections,
    group_by_class,
    iou,
    relation,
    results_row,
    summarize,
)

GENEVAL_DIR = SHARED_BENCHMARKS / "geneval"
METADATA = GENEVAL_DIR / "evaluation_metadata.jsonl"
OBJECT_NAMES = GENEVAL_DIR / "object_names.txt"


def meta(tag, include, exclude=None, prompt="p"):
    m = {"tag": tag, "include": include, "prompt": prompt}
    if exclude is not None:
        m["exclude"] = exclude
    return m


def box(x, y, w=10, h=10, score=0.95):
    return (x, y, x + w, y + h, score)


# --------------------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------------------


def test_iou_inclusive_pixels():
    assert iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    # 10x10 inclusive boxes sharing a 5x10 strip: 50 / (100 + 100 - 50)
    assert iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)
    assert iou((0, 0, 9, 9), (20, 20, 29, 29)) == 0.0
    # degenerate boxes with zero inclusive area on both sides: union 0 -> 0
    assert iou((0, 0, -1, -1), (0, 0, -1, -1)) == 0.0
    # score and mask after the box are ignored
    assert iou((0, 0, 9, 9, 0.5), (0, 0, 9, 9, 0.9, None)) == 1.0


def test_relation_worked_example():
    a, b = [0, 0, 10, 10], [30, 0, 40, 10]
    assert relation(a, b, 0.1) == {"left of"}
    assert relation(b, a, 0.1) == {"right of"}
    # dx = -(30 - 2) / 30
    assert -28 / 30 == pytest.approx(-0.9333, abs=1e-4)


def test_relation_vertical_and_default_threshold():
    top, bottom = [0, 0, 10, 10], [0, 30, 10, 40]
    assert relation(top, bottom) == {"above"}
    assert relation(bottom, top) == {"below"}


def test_relation_overlapping_boxes_empty():
    assert relation([0, 0, 100, 100], [5, 5, 105, 105], 0.1) == set()
    assert relation([0, 0, 10, 10], [0, 0, 10, 10], 0.1) == set()


def test_relation_margin_boundaries():
    """Boxes 10 wide: margin = 0.1 * (10 + 10) = 2 px on each axis."""
    b = [100, 0, 110, 10]

    def a_at(offset):  # A shifted horizontally by `offset` relative to B
        return [100 + offset, 0, 110 + offset, 10]

    # |offset| just below / at the margin (+ < 1e-3): revised offset ~0 -> empty set
    assert relation(a_at(-1.99), b) == set()
    assert relation(a_at(-2.0005), b) == set()
    # just above the margin: revised is non-zero, but dx = 0.01 / 2.01 is far from 0.5 -> still empty
    assert relation(a_at(-2.01), b) == set()
    # the decision boundary is |offset| = 2 * margin (dx = 0.5)
    assert relation(a_at(-3.99), b) == set()  # dx = -1.99 / 3.99 = -0.4987
    assert relation(a_at(-4.01), b) == {"left of"}  # dx = -2.01 / 4.01 = -0.5012
    assert relation(a_at(4.01), b) == {"right of"}
    # the margin comes from position_threshold
    assert relation(a_at(-3.99), b, position_threshold=0.0) == {"left of"}
    assert relation(a_at(-4.01), b, position_threshold=0.2) == set()


def test_relation_diagonal_gives_two_relations():
    a, b = [0, 0, 10, 10], [50, 50, 60, 60]
    assert relation(a, b) == {"left of", "above"}
    assert relation(b, a) == {"right of", "below"}
    # shallow diagonal: only the dominant axis passes the 0.5 test
    assert relation([0, 40, 10, 50], [50, 50, 60, 60]) == {"left of"}


# --------------------------------------------------------------------------------------------------------------
# Filtering
# --------------------------------------------------------------------------------------------------------------


def test_score_exactly_at_threshold_is_dropped():
    m = meta("single_object", [{"class": "cat", "count": 1}])
    assert evaluate_detections(m, {"cat": [box(0, 0, score=0.3)]})[0] is False
    assert evaluate_detections(m, {"cat": [box(0, 0, score=0.3000001)]})[0] is True
    assert filter_detections({"cat": [box(0, 0, score=0.3)]}, "single_object") == {}
    assert evaluate_detections(m, {"cat": [box(0, 0, score=0.5)]}, threshold=0.5)[0] is False


def test_counting_threshold_switch():
    det = {"cat": [box(0, 0, score=0.85)], "dog": [box(50, 0, score=0.95)]}
    two = meta("two_object", [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}])
    assert evaluate_detections(two, det) == (True, "")
    counting = meta("counting", [{"class": "cat", "count": 1}])
    assert evaluate_detections(counting, det)[0] is False
    assert evaluate_detections(counting, det, counting_threshold=0.8)[0] is True
    # the counting threshold applies to every class, also ones only in `exclude`
    counting2 = meta("counting", [{"class": "dog", "count": 1}], [{"class": "cat", "count": 1}])
    assert evaluate_detections(counting2, det)[0] is True  # the 0.85 cat is not kept
    two2 = meta("two_object", [{"class": "dog", "count": 1}], [{"class": "cat", "count": 1}])
    assert evaluate_detections(two2, det)[0] is False


def test_sorted_by_score_any_input_order():
    dets = {"cat": [box(0, 0, score=0.4), box(50, 0, score=0.9), box(100, 0, score=0.6)]}
    kept = filter_detections(dets, "two_object")
    assert [d[4] for d in kept["cat"]] == [0.9, 0.6, 0.4]


def test_max_objects_cap_before_nms():
    # Three near-identical high-score boxes and one separate lower-score box.
    dup = [box(0, 0, 100, 100, score=s) for s in (0.99, 0.98, 0.97)]
    far = box(300, 300, 100, 100, score=0.5)
    dets = {"cat": dup + [far]}
    # NMS first would keep {0.99, far}; capping to 3 first removes `far` before NMS -> only one object.
    kept = filter_detections(dets, "two_object", max_objects=3, max_overlap=0.5)
    assert [d[4] for d in kept["cat"]] == [0.99]
    kept = filter_detections(dets, "two_object", max_objects=4, max_overlap=0.5)
    assert [d[4] for d in kept["cat"]] == [0.99, 0.5]
    m = meta("two_object", [{"class": "cat", "count": 2}])
    assert evaluate_detections(m, dets, max_objects=3, max_overlap=0.5)[0] is False
    assert evaluate_detections(m, dets, max_objects=4, max_overlap=0.5)[0] is True
    # without NMS the cap alone limits the count
    assert len(filter_detections(dets, "two_object", max_objects=2)["cat"]) == 2
    assert filter_detections(dets, "two_object", max_objects=0) == {}


def test_nms_off_at_one_on_at_half():
    a = (0, 0, 99, 99, 0.9)
    b = (10, 0, 109, 99, 0.8)  # iou = 90*100 / (2*10000 - 9000) = 0.818
    c = (0, 0, 99, 99, 0.7)  # identical to a: iou 1.0
    dets = {"cat": [a, b, c]}
    assert len(filter_detections(dets, "counting", counting_threshold=0.5)["cat"]) == 3  # max_overlap=1.0: no NMS
    assert filter_detections(dets, "counting", counting_threshold=0.5, max_overlap=0.5)["cat"] == [a]
    # NMS drops iou >= max_overlap: at exactly the iou of a/b, b goes
    assert filter_detections(dets, "counting", counting_threshold=0.5, max_overlap=iou(a, b))["cat"] == [a]
    assert filter_detections(dets, "counting", counting_threshold=0.5, max_overlap=0.99)["cat"] == [a, b]
    m = meta("counting", [{"class": "cat", "count": 3}], [{"class": "cat", "count": 4}])
    assert evaluate_detections(m, dets, counting_threshold=0.5)[0] is True
    assert evaluate_detections(m, dets, counting_threshold=0.5, max_overlap=0.5)[0] is False


def test_filter_is_idempotent_and_keeps_objects():
    mask = object()
    dets = {"cat": [(0, 0, 10, 10, 0.9, mask), (0, 0, 10, 10, 0.8), (50, 50, 60, 60, 0.7)],
            "dog": [box(0, 0, score=0.1)]}
    once = filter_detections(dets, "colors", max_overlap=0.5)
    assert "dog" not in once  # classes with nothing kept are absent
    assert once["cat"][0][5] is mask
    assert filter_detections(once, "colors", max_overlap=0.5) == once


def test_numpy_rows_accepted():
    np = pytest.importorskip("numpy")
    arr = np.array([[0, 0, 10, 10, 0.2], [50, 0, 60, 10, 0.9], [100, 0, 110, 10, 0.8]], dtype=np.float32)
    m = meta("two_object", [{"class": "cat", "count": 2}], [{"class": "cat", "count": 3}])
    assert evaluate_detections(m, {"cat": arr})[0] is True
    assert evaluate_detections(m, {"cat": arr}, threshold=0.1)[0] is False  # three kept -> exclude holds
    kept = filter_detections({"cat": arr}, "two_object")
    assert [round(float(d[4]), 2) for d in kept["cat"]] == [0.9, 0.8]


def test_group_by_class():
    dets = [Detection("cat", 0.9, (0, 0, 10, 10)), Detection("dog", 0.8, (1, 2, 3, 4), mask="M"),
            ("cat", 0.5, (5, 5, 6, 6))]
    assert group_by_class(dets) == {"cat": [(0.0, 0.0, 10.0, 10.0, 0.9), (5.0, 5.0, 6.0, 6.0, 0.5)],
                                    "dog": [(1.0, 2.0, 3.0, 4.0, 0.8, "M")]}


# --------------------------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------------------------


def test_single_and_two_object():
    m = meta("two_object", [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}])
    assert evaluate_detections(m, {"cat": [box(0, 0)], "dog": [box(50, 0)]}) == (True, "")
    ok, reason = evaluate_detections(m, {"cat": [box(0, 0)]})
    assert not ok and "dog" in reason
    ok, reason = evaluate_detections(m, {})
    assert not ok and len(reason.splitlines()) == 2


def test_exclude_boundary():
    m = meta("counting", [{"class": "clock", "count": 2}], [{"class": "clock", "count": 3}])
    two = [box(0, 0), box(50, 0)]
    three = two + [box(100, 0)]
    assert evaluate_detections(m, {"clock": two}) == (True, "")
    ok, reason = evaluate_detections(m, {"clock": three})
    assert not ok and "clock<3" in reason
    assert evaluate_detections(m, {"clock": three[:1]})[0] is False
    # exclude counts all kept detections, not only the top-`count`: 3 kept with a low-score third still fails
    assert evaluate_detections(m, {"clock": two + [box(100, 0, score=0.91)]})[0] is False
    # ... but a third that the counting threshold removes does not count
    assert evaluate_detections(m, {"clock": two + [box(100, 0, score=0.9)]})[0] is True


def test_colour_counting_and_missing_colour_fn():
    m = meta("colors", [{"class": "car", "count": 2, "color": "red"}])
    a, b = box(0, 0), box(50, 0)
    colours = {a: "red", b: "blue"}
    calls = []

    def color_of(name, det):
        calls.append((name, det))
        return colours[det]

    ok, reason = evaluate_detections(m, {"car": [a, b]}, color_of=color_of)
    assert not ok and "1 red" in reason and "1 blue" in reason
    assert calls == [("car", a), ("car", b)]  # score order, the detection object as given
    colours[b] = "red"
    assert evaluate_detections(m, {"car": [a, b]}, color_of=color_of) == (True, "")
    # only the top-`count` objects are classified: a third blue car is irrelevant (no exclude here)
    c = box(100, 0, score=0.5)
    colours[c] = "blue"
    calls.clear()
    assert evaluate_detections(m, {"car": [c, a, b]}, color_of=color_of)[0] is True
    assert [d for _, d in calls] == [a, b]
    with pytest.raises(ValueError, match="colour"):
        evaluate_detections(m, {"car": [a, b]})
    # no colour asked: no colour function needed
    assert evaluate_detections(meta("single_object", [{"class": "car", "count": 1}]), {"car": [a]})[0]


def test_colour_function_receives_mask():
    np = pytest.importorskip("numpy")
    mask = np.zeros((8, 8), dtype=bool)
    seen = []

    def color_of(name, det):
        seen.append(det[5] if len(det) > 5 else None)
        return "green"

    m = meta("colors", [{"class": "apple", "count": 1, "color": "green"}])
    assert evaluate_detections(m, {"apple": [(0, 0, 4, 4, 0.9, mask)]}, color_of=color_of)[0]
    assert seen[0] is mask


def test_color_attr():
    m = meta("color_attr", [{"class": "car", "count": 1, "color": "red"},
                            {"class": "bus", "count": 1, "color": "blue"}])
    dets = {"car": [box(0, 0)], "bus": [box(50, 0)]}
    assert evaluate_detections(m, dets, color_of=lambda n, d: {"car": "red", "bus": "blue"}[n])[0]
    assert not evaluate_detections(m, dets, color_of=lambda n, d: {"car": "blue", "bus": "red"}[n])[0]


def position_meta(rel):
    return meta("position", [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": [rel, 0]}])


def test_position_rules():
    dog, cat_left = box(100, 0), box(50, 0)
    assert evaluate_detections(position_meta("left of"), {"dog": [dog], "cat": [cat_left]}) == (True, "")
    ok, reason = evaluate_detections(position_meta("right of"), {"dog": [dog], "cat": [cat_left]})
    assert not ok and "left of" in reason
    # overlapping boxes: empty relation -> fail for every relation
    for rel in ("left of", "right of", "above", "below"):
        overlapping = {"dog": [box(0, 0, 100, 100)], "cat": [box(2, 1, 100, 100)]}
        assert not evaluate_detections(position_meta(rel), overlapping)[0]
    # diagonal: both "left of" and "above" hold
    dets = {"dog": [box(50, 50)], "cat": [box(0, 0)]}
    assert evaluate_detections(position_meta("left of"), dets)[0]
    assert evaluate_detections(position_meta("above"), dets)[0]
    assert not evaluate_detections(position_meta("below"), dets)[0]
    # only the top-scoring object is compared (count 1): a lower-score cat on the wrong side is ignored
    dets = {"dog": [dog], "cat": [cat_left, box(200, 0, score=0.5)]}
    assert evaluate_detections(position_meta("left of"), dets)[0]
    # position_threshold is honoured
    close = {"dog": [box(100, 0)], "cat": [box(96, 0)]}  # offset 4: dx = -(4 - 2)/4 = -0.5, not < -0.5
    assert not evaluate_detections(position_meta("left of"), close)[0]
    assert evaluate_detections(position_meta("left of"), close, position_threshold=0.05)[0]


def test_position_failed_reference_group():
    m = position_meta("left of")
    ok, reason = evaluate_detections(m, {"cat": [box(0, 0)]})  # no dog: reference clause fails
    assert not ok
    assert "no target for cat" in reason
    # reference failing its colour also removes the group
    m = meta("position", [{"class": "dog", "count": 1, "color": "red"},
                          {"class": "cat", "count": 1, "position": ["left of", 0]}])
    ok, reason = evaluate_detections(m, {"dog": [box(100, 0)], "cat": [box(0, 0)]}, color_of=lambda n, d: "blue")
    assert not ok and "no target" in reason


def test_position_all_pairs():
    # two reference objects, one cat that is left of only one of them -> fail
    m = meta("position", [{"class": "dog", "count": 2}, {"class": "cat", "count": 1, "position": ["left of", 0]}])
    assert evaluate_detections(m, {"dog": [box(100, 0), box(200, 0)], "cat": [box(0, 0)]})[0]
    assert not evaluate_detections(m, {"dog": [box(100, 0), box(-100, 0)], "cat": [box(0, 0)]})[0]


# --------------------------------------------------------------------------------------------------------------
# Results rows and summary
# --------------------------------------------------------------------------------------------------------------


def test_results_row_columns():
    m = meta("counting", [{"class": "clock", "count": 2}], [{"class": "clock", "count": 3}], prompt="two clocks")
    row = results_row("00003/samples/0001.png", m, True, "", {"clock": [(0, 0, 10, 10, 0.95, "mask")]},
                      "digits", "hsv", canonical=False)
    assert list(row) == ["filename", "tag", "prompt", "correct", "reason", "metadata", "details", "detector",
                         "color_model", "canonical"]
    assert row["metadata"] == json.dumps(m)
    assert json.loads(row["details"]) == {"clock": [[0.0, 0.0, 10.0, 10.0, 0.95]]}
    assert row["tag"] == "counting" and row["prompt"] == "two clocks" and row["correct"] is True
    assert results_row("f", json.dumps(m), False, "x", {}, "d", "c")["metadata"] == json.dumps(m)
    json.dumps(row)  # serialisable


def test_summary_task_mean_differs_from_image_mean():
    def rows(tag, prompt, flags):
        md = json.dumps(meta(tag, [{"class": "cat", "count": 1}], prompt=prompt))
        return [{"tag": tag, "correct": f, "metadata": md} for f in flags]

    results = (
        rows("single_object", "a", [True, True, True, True])  # 4/4
        + rows("position", "b", [False, False, False, True])  # prompt b: one correct image of 4
        + rows("position", "c", [False, False, False, False])
        + rows("position", "d", [False, False, False, False])  # position 1/12
        + rows("counting", "e", [False, True, False, False])  # 1/4
    )
    s = summarize(results)
    assert list(s["tasks"]) == ["single_object", "counting", "position"]  # print order, tasks present only
    assert s["tasks"]["position"] == {"accuracy": 1 / 12, "n_correct": 1, "n": 12}
    assert s["overall"] == pytest.approx((1 + 1 / 4 + 1 / 12) / 3)
    assert s["% correct images"] == pytest.approx(6 / 20)
    assert s["overall"] != pytest.approx(s["% correct images"])
    assert s["% correct prompts"] == pytest.approx(3 / 5)  # a, b (any image), e
    assert s["n_images"] == 20 and s["n_prompts"] == 5
    with pytest.raises(ValueError):
        summarize([])


# --------------------------------------------------------------------------------------------------------------
# No torch
# --------------------------------------------------------------------------------------------------------------


def test_modules_do_not_import_torch():
    code = ("import sys, dmdr_cli.evaluation.geneval, dmdr_cli.evaluation.benchfiles; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


# --------------------------------------------------------------------------------------------------------------
# The real shared metadata (skipped without ../shared/benchmarks)
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_metadata():
    if not METADATA.is_file() or not OBJECT_NAMES.is_file():
        pytest.skip(f"shared GenEval files not found under {GENEVAL_DIR} (../shared/benchmarks beside the checkout)")
    return load_geneval_metadata(METADATA, classes=load_object_names(OBJECT_NAMES))


def test_shared_metadata_file(shared_metadata):
    assert hashlib.sha256(METADATA.read_bytes()).hexdigest() == \
        "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13"
    assert hashlib.sha256(OBJECT_NAMES.read_bytes()).hexdigest() == \
        "608f6a0e5c8ca1c7a92b818430141fe268c85b7930b50f4160f1d65893b5bacd"
    md = shared_metadata
    assert len(md) == 553
    tags = collections.Counter(m["tag"] for m in md)
    assert tags == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100,
                    "color_attr": 100}
    assert sum("exclude" in m for m in md) == 80
    assert all(m["tag"] == "counting" for m in md if "exclude" in m)
    counting = [m for m in md if m["tag"] == "counting"]
    assert collections.Counter(m["include"][0]["count"] for m in counting) == {2: 26, 3: 28, 4: 26}
    assert all(m["exclude"] == [{"class": m["include"][0]["class"], "count": m["include"][0]["count"] + 1}]
               for m in counting)
    rels = collections.Counter(m["include"][1]["position"][0] for m in md if m["tag"] == "position")
    assert rels == {"left of": 19, "right of": 27, "above": 26, "below": 28}
    names = load_object_names(OBJECT_NAMES)
    assert sorted(m["include"][0]["class"] for m in md if m["tag"] == "single_object") == sorted(names)
    assert not any("color" in c and c["class"] == "person" for m in md for c in m["include"])
    # the folder metadata.jsonl convention: json.dumps of the parsed line reproduces the line exactly
    assert [json.dumps(m) for m in md] == METADATA.read_text(encoding="utf-8").splitlines()


def _oracle(m):
    """Detections (and their colours) that satisfy metadata line `m`: 60 px boxes, score 0.95, never overlapping;
    a position target sits 300 px from its reference (far beyond the 0.1 margin)."""
    dets: dict[str, list] = {}
    colours: dict[tuple, str] = {}
    size = 60
    slots = iter([(400 + 150 * i, 450) for i in range(8)])
    shifts = {"left of": (-300, 0), "right of": (300, 0), "above": (0, -300), "below": (0, 300)}
    placed: list[list[tuple]] = []
    for clause in m["include"]:
        if "position" in clause:
            rel, g = clause["position"]
            ref = placed[g][0]
            positions = [(ref[0] + shifts[rel][0], ref[1] + shifts[rel][1])]
        else:
            positions = [next(slots) for _ in range(clause["count"])]
        objs = [(float(x), float(y), float(x + size), float(y + size), 0.95) for x, y in positions]
        for d in objs:
            colours[d] = clause.get("color", "white")
        dets.setdefault(clause["class"], []).extend(objs)
        placed.append(objs)
    return dets, colours


def _sample(md, per_tag=5):
    out = []
    for tag in ("single_object", "two_object", "counting", "colors", "position", "color_attr"):
        idx = [i for i, m in enumerate(md) if m["tag"] == tag]
        step = len(idx) / per_tag
        out += [idx[int(k * step)] for k in range(per_tag)]
    return out


def test_oracle_detections_on_shared_metadata(shared_metadata):
    md = shared_metadata
    sample = _sample(md)
    assert len(sample) == 30 and len({md[i]["tag"] for i in sample}) == 6
    for i in sample:
        m = md[i]
        dets, colours = _oracle(m)
        color_of = lambda name, det: colours[det]  # noqa: E731
        assert evaluate_detections(m, dets, color_of=color_of) == (True, ""), (i, m)

        # drop an object of the first clause
        first = m["include"][0]["class"]
        dropped = {k: (v[1:] if k == first else v) for k, v in dets.items()}
        assert not evaluate_detections(m, dropped, color_of=color_of)[0], (i, "drop")

        # one object below the threshold counts as missing
        weak = {k: ([v[0][:4] + (0.3,)] + v[1:] if k == first else v) for k, v in dets.items()}
        assert not evaluate_detections(m, weak, color_of=color_of)[0], (i, "weak")

        if m["tag"] == "counting":
            extra = {k: v + [(900.0, 900.0, 960.0, 960.0, 0.95)] for k, v in dets.items()}
            assert not evaluate_detections(m, extra)[0], (i, "exclude")

        if m["tag"] == "position":
            ref_cls, cls = m["include"][0]["class"], m["include"][1]["class"]
            swapped = dict(dets)
            swapped[ref_cls], swapped[cls] = dets[cls], dets[ref_cls]
            assert not evaluate_detections(m, swapped)[0], (i, "swap")

        for c_idx, clause in enumerate(m["include"]):
            if "color" in clause:
                victim = dets[clause["class"]][0]
                other = "red" if clause["color"] != "red" else "blue"
                wrong = {**colours, victim: other}
                assert not evaluate_detections(m, dets, color_of=lambda n, d: wrong[d])[0], (i, "colour", c_idx)


def test_report_samples_are_spread_over_the_tags():
    from dmdr_cli.recipes.evaluate import spread_by_tag

    tags = ["single_object"] * 5 + ["two_object"] * 3 + ["counting"] * 1 + ["colors"] * 4
    meta = [{"tag": t, "prompt": f"p{i}"} for i, t in enumerate(tags)]
    # round-robin: first of each tag (0, 5, 8, 9), then second of each (1, 6, 10), ...
    assert spread_by_tag(meta, 4) == [0, 5, 8, 9]
    assert spread_by_tag(meta, 7) == [0, 1, 5, 6, 8, 9, 10]
    assert spread_by_tag(meta, 100) == list(range(len(tags)))
    assert spread_by_tag([], 3) == []


def test_repeated_prompts_get_new_seeds_unique_prompts_keep_seed_plus_j():
    from dmdr_cli.recipes.evaluate import line_seeds

    meta = [{"prompt": p} for p in ["a 1", "a 4", "a 1", "a 7", "a 1"]]
    assert line_seeds(meta, 4, 10) == [[10, 11, 12, 13], [10, 11, 12, 13], [14, 15, 16, 17], [10, 11, 12, 13],
                                       [18, 19, 20, 21]]
    unique = [{"prompt": f"p{i}"} for i in range(3)]
    assert line_seeds(unique, 2, 0) == [[0, 1]] * 3  # GenEval's own metadata: seed + j, as before
