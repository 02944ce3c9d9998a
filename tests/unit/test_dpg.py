"""DPG-Bench scoring (EVALUATION.md §2): tiling order, CSV parsing, cascade masking, ×100, both quirk modes, skip
accounting, and the VQA backends (scripted; BLIP on a tiny random checkpoint, plumbing only)."""

from __future__ import annotations

import csv

import pytest
from PIL import Image

from dmdr_cli.errors import ConfigError, InputError
from dmdr_cli.evaluation import dpg
from dmdr_cli.evaluation.dpg import (
    CSV_COLUMNS,
    DpgImageError,
    ScriptedVqa,
    build_vqa,
    load_questions,
    score_folder,
    score_image,
    split_tiles,
    tile_2x2,
    tile_boxes,
)

R = 8  # tile size
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}
NAME_OF = {v: k for k, v in COLOURS.items()}

# item "first": its first row is the CSV's first data row (upstream quirk 1), referenced by q2 (variant A only)
FIRST_A = [  # qid, dependency, tuple, question
    (1, "0", "entity - whole (dog)", "Is there a dog?"),
    (2, "1", "attribute - color (dog, brown)", "Is the dog brown?"),
    (3, "0", "other - time (daytime)", "Is it daytime?"),
]
FIRST_B = [  # variant B: nobody names row 0 as a parent -> the item just loses a question in compat mode
    (1, "0", "entity - whole (dog)", "Is there a dog?"),
    (2, "0", "other - time (daytime)", "Is it daytime?"),
]
CHAIN = [  # a `0` parent, a chain 1 -> 2 -> 3, a multi-parent row (1 and 3) and an independent question
    (1, "0", "entity - whole (cat)", "Is there a cat?"),
    (2, "1", "attribute - color (cat, red)", "Is the cat red?"),
    (3, "2", "relation - spatial (cat, mat, on)", "Is the cat on the mat?"),
    (4, "1, 3", "relation - spatial (mat, floor, on)", "Is the mat on the floor?"),
    (5, "0", "other - count (cat, ==1)", "Is there one cat?"),
]
SMALL = [(1, "0", "entity - whole (box)", "Is there a box?")]

# chain answers per tile colour (anything not listed: "yes")
CHAIN_ANSWERS = {
    "red": {},                                                      # all yes -> 1.0
    "green": {"Is there a cat?": "no"},                             # q1 no cascades to 2, 3 and 4 -> 1/5
    "blue": {"Is the cat on the mat?": "no"},                       # q3 no masks multi-parent q4 -> 3/5
    "white": {"Is the cat red?": "no", "Is there one cat?": "Yes"},  # q2 no -> q3 -> q4 (in place); "Yes" != "yes"
}
CHAIN_TILES = [1.0, 0.2, 0.6, 0.2]
# raw (unmasked) answers per question for the tiles red, green, blue, white
CHAIN_RAW = {1: [1, 0, 1, 1], 2: [1, 1, 1, 0], 3: [1, 1, 0, 1], 4: [1, 1, 1, 1], 5: [1, 1, 1, 0]}


def _write_csv(path, items):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for item, rows in items:
            for qid, dep, tup, question in rows:
                w.writerow([item, f"prompt of {item}", "kw", qid, dep, tup.split(" - ")[0], tup.split(" (")[0],
                            tup, question])
    return path


def colour_key(image):
    return NAME_OF[image.getpixel((0, 0))]


def _vqa():
    table = {(c, q): a for c, answers in CHAIN_ANSWERS.items() for q, a in answers.items()}
    table["Is the dog brown?"] = "yes"
    table["Is it daytime?"] = "yes"  # "Is there a dog?" falls back to the default "no"
    return _ChainVqa(table)


class _ChainVqa(ScriptedVqa):
    """Chain questions answer "yes" unless CHAIN_ANSWERS says otherwise; the "first" item uses the table."""

    chain_questions = {q for _, _, _, q in CHAIN}

    def __init__(self, table):
        super().__init__(table, default="no", key=colour_key)

    def __call__(self, image, question):
        answer = super().__call__(image, question)
        if question in self.chain_questions and (colour_key(image), question) not in self.table:
            return "yes"
        return answer


def _solid(name, size=R):
    return Image.new("RGB", (size, size), COLOURS[name])


def _chain_image():
    return tile_2x2([_solid(c) for c in ("red", "green", "blue", "white")])


@pytest.fixture
def csv_a(tmp_path):
    return _write_csv(tmp_path / "dpg_a.csv", [("first", FIRST_A), ("chain", CHAIN), ("small", SMALL)])


@pytest.fixture
def csv_b(tmp_path):
    return _write_csv(tmp_path / "dpg_b.csv", [("first", FIRST_B), ("chain", CHAIN)])


def _folder(tmp_path, name="images"):
    d = tmp_path / name
    d.mkdir()
    _chain_image().save(d / "chain.png")
    tile_2x2([_solid("red")] * 4).save(d / "first.png")
    return d


# --------------------------------------------------------------------------------------------------------------
# tiles
# --------------------------------------------------------------------------------------------------------------

def test_tile_order_round_trip():
    image = _chain_image()
    assert image.size == (2 * R, 2 * R)
    # upstream boxes: top-left, top-right, bottom-left, bottom-right
    assert tile_boxes(R) == [(0, 0, R, R), (R, 0, 2 * R, R), (0, R, R, 2 * R), (R, R, 2 * R, 2 * R)]
    assert tile_boxes(R, 1) == [(0, 0, R, R)]
    assert image.getpixel((R, 0)) == COLOURS["green"]  # top-right
    assert image.getpixel((0, R)) == COLOURS["blue"]  # bottom-left
    tiles = split_tiles(image, R)
    assert [colour_key(t) for t in tiles] == ["red", "green", "blue", "white"]
    assert all(t.size == (R, R) and len(set(t.getdata())) == 1 for t in tiles)


def test_tile_errors():
    with pytest.raises(InputError, match="expected 16×16"):
        split_tiles(Image.new("RGB", (2 * R + 2, 2 * R)), R)
    with pytest.raises(InputError, match="4 images"):
        tile_2x2([_solid("red")] * 3)
    with pytest.raises(InputError, match="same size"):
        tile_2x2([_solid("red")] * 3 + [_solid("red", R + 1)])
    with pytest.raises(InputError, match="1 or 4"):
        tile_boxes(R, 2)


# --------------------------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------------------------

def test_load_questions(csv_a):
    qs = load_questions(csv_a)
    assert list(qs) == ["first", "chain", "small"]
    chain = qs["chain"]
    assert [q.qid for q in chain] == [1, 2, 3, 4, 5]
    assert [q.parents for q in chain] == [(), (1,), (2,), (1, 3), ()]  # `0` = no parent; "1, 3" multi-parent
    assert chain[3].category_l2 == "relation - spatial" and chain[3].category_l1 == "relation"
    assert chain[0].question == "Is there a cat?"
    assert [q.row for q in qs["first"]] == [0, 1, 2]
    assert chain[0].row == 3


def test_load_questions_errors(tmp_path):
    with pytest.raises(InputError) as err:
        load_questions(tmp_path / "nope.csv")
    msg = str(err.value)
    assert "user-supplied" in msg and "--questions" in msg and "TencentQQGYLab/ELLA dpg_bench/dpg_bench.csv" in msg
    assert "\n" not in msg
    bad = tmp_path / "bad.csv"
    bad.write_text("item_id,text\nx,y\n")
    with pytest.raises(InputError, match="missing column"):
        load_questions(bad)
    split = _write_csv(tmp_path / "split.csv", [("a", SMALL), ("b", SMALL), ("a", [(2, "0", "x - y (z)", "q?")])])
    with pytest.raises(InputError, match="not contiguous"):
        load_questions(split)
    nonint = _write_csv(tmp_path / "nonint.csv", [("a", [(1, "zero", "x - y (z)", "q?")])])
    with pytest.raises(InputError, match="dependency must be an integer"):
        load_questions(nonint)


# --------------------------------------------------------------------------------------------------------------
# scoring one image
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compat", [True, False])
def test_cascade_masking_and_tile_scores(csv_a, compat):
    qs = load_questions(csv_a)
    score, raw, tiles = score_image(split_tiles(_chain_image(), R), qs["chain"], _vqa(), compat=compat)
    assert tiles == pytest.approx(CHAIN_TILES)
    assert score == pytest.approx(sum(CHAIN_TILES) / 4) == pytest.approx(0.5)
    if compat:  # quirk 2: the last (bottom-right, white) tile's unmasked answers
        assert raw == {q: float(v[-1]) for q, v in CHAIN_RAW.items()}
    else:
        assert raw == pytest.approx({q: sum(v) / 4 for q, v in CHAIN_RAW.items()})


def test_exact_yes_only():
    question = dpg.Question("x", 1, (), "Is it?", "entity - whole (x)", "entity - whole", "entity", 5)
    for answer, expected in (("yes", 1.0), ("Yes", 0.0), ("yes ", 0.0), ("yes.", 0.0), ("no", 0.0)):
        score, _, _ = score_image([_solid("red")], [question], ScriptedVqa(default=answer))
        assert score == expected, answer


def test_quirk1_drop_and_fix(csv_a):
    qs = load_questions(csv_a)
    tiles = split_tiles(tile_2x2([_solid("red")] * 4), R)
    with pytest.raises(DpgImageError) as err:
        score_image(tiles, qs["first"], _vqa(), compat=True)
    assert err.value.quirk and "ELLA#61" in str(err.value)
    # --dpg-fix keeps row 0: q1 "no" masks q2, q3 yes -> 1/3 per tile
    score, raw, per_tile = score_image(tiles, qs["first"], _vqa(), compat=False)
    assert per_tile == pytest.approx([1 / 3] * 4) and score == pytest.approx(1 / 3)
    assert raw == {1: 0.0, 2: 1.0, 3: 1.0}


def test_quirk1_shrink(csv_b):
    qs = load_questions(csv_b)
    tiles = split_tiles(tile_2x2([_solid("red")] * 4), R)
    vqa = _vqa()
    score, raw, _ = score_image(tiles, qs["first"], vqa, compat=True)
    assert score == 1.0 and raw == {2: 1.0}  # scored with one question fewer ("Is there a dog?" never asked)
    assert all(q != "Is there a dog?" for _, q in vqa.calls)
    score, raw, _ = score_image(tiles, qs["first"], vqa, compat=False)
    assert score == 0.5 and raw == {1: 0.0, 2: 1.0}


def test_unknown_parent_is_an_error_in_both_modes(tmp_path):
    path = _write_csv(tmp_path / "q.csv", [("pad", SMALL), ("x", [(1, "0", "a - b (c)", "q1?"),
                                                                   (2, "7", "a - b (c)", "q2?")])])
    for compat in (True, False):
        with pytest.raises(DpgImageError) as err:
            score_image([_solid("red")], load_questions(path)["x"], ScriptedVqa(default="yes"), compat=compat)
        assert not err.value.quirk and "parent 7" in str(err.value)


# --------------------------------------------------------------------------------------------------------------
# scoring a folder
# --------------------------------------------------------------------------------------------------------------

def _l_scores(raw_lists, qs_items, level):
    pooled = {}
    for item_questions, raws in zip(qs_items, raw_lists):
        for q in item_questions:
            if q.qid in raws:
                pooled.setdefault(getattr(q, level), []).append(raws[q.qid])
    return {k: 100 * sum(v) / len(v) for k, v in pooled.items()}


def test_score_folder_compat(csv_a, tmp_path):
    qs = load_questions(csv_a)
    res = score_folder(_folder(tmp_path), qs, _vqa(), R)  # compat, no allow_missing: the quirk drop is no error
    assert res["compat_mode"] is True
    assert res["n_images"] == 1 and res["n_files"] == 2
    assert res["dpg_score"] == pytest.approx(50.0)  # ×100
    assert [s["file"] for s in res["skipped_images"]] == ["first.png"]
    assert res["skipped_images"][0]["quirk"] is True
    assert res["items_without_image"] == 1  # "small"
    assert res["rows"] == [{"id": "chain", "file": "chain.png", "tile_scores": pytest.approx(CHAIN_TILES),
                            "image_score": pytest.approx(0.5)}]
    # quirk 2: categories from the white tile's raw answers only
    assert res["categories_l1"] == {"attribute": 0.0, "entity": 100.0, "other": 0.0, "relation": 100.0}
    assert res["categories_l2"] == {"attribute - color": 0.0, "entity - whole": 100.0, "other - count": 0.0,
                                    "relation - spatial": 100.0}


def test_score_folder_fix(csv_a, tmp_path):
    qs = load_questions(csv_a)
    res = score_folder(_folder(tmp_path), qs, _vqa(), R, compat=False)
    assert res["compat_mode"] is False and res["n_images"] == 2 and res["skipped_images"] == []
    assert res["dpg_score"] == pytest.approx(100 * (0.5 + 1 / 3) / 2)
    chain_raw = {q: sum(v) / 4 for q, v in CHAIN_RAW.items()}
    first_raw = {1: 0.0, 2: 1.0, 3: 1.0}
    expected_l1 = _l_scores([chain_raw, first_raw], [qs["chain"], qs["first"]], "category_l1")
    expected_l2 = _l_scores([chain_raw, first_raw], [qs["chain"], qs["first"]], "category_l2")
    assert res["categories_l1"] == pytest.approx(expected_l1)
    assert res["categories_l2"] == pytest.approx(expected_l2)
    assert res["categories_l1"]["entity"] == pytest.approx(37.5)  # chain q1 0.75 pooled with first q1 0
    assert list(res["categories_l1"]) == sorted(expected_l1)


def test_skip_accounting(csv_a, tmp_path):
    qs = load_questions(csv_a)
    d = _folder(tmp_path)
    (d / "results.txt").write_text("upstream writes its result file here\n")  # no such id
    (d / "first.json").write_text("{}\n")  # known id, not an image
    tile_2x2([_solid("red")] * 4).save(d / "unknown.png")  # no questions for this id
    Image.new("RGB", (3 * R, 3 * R)).save(d / "small.png")  # wrong size
    _chain_image().save(d / ".hidden.png")  # ignored
    (d / "sub").mkdir()  # ignored
    vqa = _vqa()
    with pytest.raises(InputError, match="4 of 6 file") as err:
        score_folder(d, qs, vqa, R)
    assert "--allow-missing" in str(err.value)
    assert vqa.calls == []  # fails before any VQA call
    res = score_folder(d, qs, vqa, R, allow_missing=True)
    reasons = {s["file"]: s["reason"] for s in res["skipped_images"]}
    assert set(reasons) == {"first.png", "first.json", "results.txt", "small.png", "unknown.png"}
    assert "not a readable image" in reasons["first.json"]
    assert "no questions for id 'results'" in reasons["results.txt"]
    assert "no questions for id 'unknown'" in reasons["unknown.png"]
    assert "expected 16×16" in reasons["small.png"]
    assert res["n_images"] == 1 and res["n_files"] == 6 and res["dpg_score"] == pytest.approx(50.0)
    assert res["items_without_image"] == 0


def test_score_folder_nothing_scored(tmp_path):
    path = _write_csv(tmp_path / "q.csv", [("first", FIRST_A)])
    d = tmp_path / "imgs"
    d.mkdir()
    tile_2x2([_solid("red")] * 4).save(d / "first.png")
    res = score_folder(d, load_questions(path), _vqa(), R)
    assert res["dpg_score"] is None and res["n_images"] == 0 and res["categories_l1"] == {}
    with pytest.raises(InputError, match="not found"):
        score_folder(tmp_path / "missing", load_questions(path), _vqa(), R)


def test_info_id_reaches_backend(csv_a, tmp_path):
    qs = load_questions(csv_a)
    d = _folder(tmp_path)
    vqa = ScriptedVqa({"chain": "yes", ("first", "Is it daytime?"): "yes"}, default="no")  # keyed by image id
    res = score_folder(d, qs, vqa, R, compat=False)
    by_id = {r["id"]: r["image_score"] for r in res["rows"]}
    assert by_id == {"chain": 1.0, "first": pytest.approx(1 / 3)}
    assert {k for k, _ in vqa.calls} == {"chain", "first"}


# --------------------------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------------------------

def test_build_vqa_scripted_and_errors(tmp_path):
    assert build_vqa("scripted")(_solid("red"), "anything?") == "yes"
    table = tmp_path / "t.json"
    table.write_text('{"default": "no", "answers": {"Is it?": "yes", "img1": {"Other?": "yes"}}}')
    v = build_vqa("scripted", table)
    im = _solid("red")
    assert v(im, "Is it?") == "yes" and v(im, "Other?") == "no"
    im.info[dpg.INFO_ID] = "img1"
    assert v(im, "Other?") == "yes"
    with pytest.raises(ConfigError, match="Did you mean 'blip-vqa'"):
        build_vqa("blip-vq")
    with pytest.raises(ConfigError, match="local BLIP"):
        build_vqa("blip-vqa")


def test_modelscope_backend_is_optional(monkeypatch, tmp_path):
    real = dpg.importlib.util.find_spec
    monkeypatch.setattr(dpg.importlib.util, "find_spec", lambda n, *a: None if n == "modelscope" else real(n, *a))
    with pytest.raises(ConfigError) as err:
        build_vqa("modelscope-mplug", tmp_path)
    msg = str(err.value)
    assert "optional" in msg and "modelscope" in msg and "damo/mplug_visual-question-answering_coco_large_en" in msg


def _tiny_blip(path):
    pytest.importorskip("transformers")
    import torch
    from transformers import BertTokenizerFast, BlipConfig, BlipForQuestionAnswering, BlipImageProcessor, \
        BlipProcessor

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "is", "there", "a", "cat", "?", "yes", "no"]
    path.mkdir()
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = BertTokenizerFast(vocab_file=str(path / "vocab.txt"), bos_token="[DEC]")
    proc = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    torch.manual_seed(0)
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                         num_attention_heads=2, num_hidden_layers=1, max_position_embeddings=64, bos_token_id=5,
                         pad_token_id=0, eos_token_id=3, sep_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                           image_size=32, patch_size=16),
        projection_dim=32)
    BlipForQuestionAnswering(cfg).save_pretrained(path)
    proc.save_pretrained(path)
    return path


def test_blip_vqa_tiny_plumbing(tmp_path):
    try:
        path = _tiny_blip(tmp_path / "blip")
    except (ImportError, TypeError, ValueError) as err:  # pragma: no cover - depends on the transformers version
        pytest.skip(f"cannot build a tiny random BLIP VQA model with this transformers: {err}")
    vqa = build_vqa("blip-vqa", path)
    assert isinstance(vqa, dpg.BlipVqa) and vqa.label == "DPG (BLIP-VQA backend)" and not vqa.canonical
    answer = vqa(_solid("red", 40), "is there a cat?")
    assert isinstance(answer, str) and answer == answer.strip().lower()
    vqa.processor.decode = lambda *a, **k: "  Yes \n"  # the answer is stripped and lower-cased
    assert vqa(_solid("red", 40), "is there a cat?") == "yes"
    with pytest.raises(Exception, match="cannot load a BLIP VQA model"):
        build_vqa("blip-vqa", tmp_path / "missing")
