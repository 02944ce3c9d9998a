"""Benchmark file resolution (EVALUATION.md §7.1), loaders and the GenEval image-folder layout (§1.2)."""

from __future__ import annotations

import hashlib
import json

import pytest

from dmdr_cli.errors import InputError
from dmdr_cli.evaluation import benchfiles
from dmdr_cli.evaluation.benchfiles import (
    BENCH_FILES,
    bench_file_spec,
    load_geneval_metadata,
    load_object_names,
    load_prompt_list,
    resolve_bench_file,
)
from dmdr_cli.evaluation.geneval import iter_image_folder, write_prompt_folder

LINE = {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
        "prompt": "a photo of two clocks"}


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Empty DMDR_HOME, no DMDR_ASSET_* variables and an empty stand-in for ../shared/benchmarks."""
    home, shared = tmp_path / "home", tmp_path / "shared"
    home.mkdir()
    shared.mkdir()
    monkeypatch.setenv("DMDR_HOME", str(home))
    for files in BENCH_FILES.values():
        for spec in files.values():
            monkeypatch.delenv(spec.env_var, raising=False)
    monkeypatch.setattr(benchfiles, "SHARED_BENCHMARKS", shared)
    return home, shared


def _put(path, text="hello\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _pin(monkeypatch, bench, filename, text):
    """Pin the sha256 of `bench/filename` to that of `text` (the spec table is frozen: swap the entry)."""
    spec = BENCH_FILES[bench][filename]
    pinned = benchfiles.BenchFile(**{**spec.__dict__, "sha256": hashlib.sha256(text.encode()).hexdigest()})
    monkeypatch.setitem(BENCH_FILES[bench], filename, pinned)


def test_spec_table():
    assert set(BENCH_FILES) == {"geneval", "dpg_bench", "drawbench"}
    gm = BENCH_FILES["geneval"]["evaluation_metadata.jsonl"]
    assert gm.sha256 == "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13"
    assert gm.upstream.startswith("https://raw.githubusercontent.com/djghosh13/geneval/")
    assert gm.env_var == "DMDR_ASSET_GENEVAL_METADATA"
    assert BENCH_FILES["geneval"]["object_names.txt"].sha256.startswith("608f6a0e")
    assert BENCH_FILES["dpg_bench"]["prompts.jsonl"].sha256.startswith("dbacb0c4")
    assert BENCH_FILES["drawbench"]["prompts.txt"].sha256.startswith("7c4d2518")
    assert bench_file_spec("dpg", "prompts.jsonl") is BENCH_FILES["dpg_bench"]["prompts.jsonl"]
    with pytest.raises(InputError, match="genevall"):
        bench_file_spec("genevall", "x")


def test_resolution_order(env, tmp_path, monkeypatch):
    home, shared = env
    text = "a prompt\n"
    _pin(monkeypatch, "drawbench", "prompts.txt", text)
    s = _put(shared / "drawbench" / "prompts.txt", text)
    assert resolve_bench_file("drawbench", "prompts.txt") == s
    h = _put(home / "benchmarks" / "drawbench" / "prompts.txt", text)
    assert resolve_bench_file("drawbench", "prompts.txt") == h
    a = _put(home / "assets" / "drawbench" / "prompts.txt", text)
    assert resolve_bench_file("drawbench", "prompts.txt") == a
    e = _put(tmp_path / "env" / "prompts.txt", text)
    monkeypatch.setenv("DMDR_ASSET_DRAWBENCH", str(e.parent))  # a folder holding the file
    assert resolve_bench_file("drawbench", "prompts.txt") == e
    x = _put(tmp_path / "explicit.txt", text)
    assert resolve_bench_file("drawbench", "prompts.txt", str(x)) == x
    assert resolve_bench_file("drawbench", "prompts.txt", x) == x  # PathLike too


def test_explicit_path_missing_is_an_error(env, tmp_path):
    home, _ = env
    _put(home / "benchmarks" / "drawbench" / "prompts.txt")
    with pytest.raises(InputError, match="does not exist"):
        resolve_bench_file("drawbench", "prompts.txt", str(tmp_path / "nope.txt"))


def test_sha_mismatch(env, tmp_path):
    home, _ = env
    bad = _put(home / "benchmarks" / "geneval" / "evaluation_metadata.jsonl", json.dumps(LINE) + "\n")
    with pytest.raises(InputError) as err:
        resolve_bench_file("geneval", "evaluation_metadata.jsonl")
    msg = str(err.value)
    assert "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13" in msg
    assert hashlib.sha256(bad.read_bytes()).hexdigest() in msg
    assert "expected" in msg and "actual" in msg
    # an explicit file is verified too, unless verification is turned off
    with pytest.raises(InputError, match="sha256"):
        resolve_bench_file("geneval", "evaluation_metadata.jsonl", bad)
    assert resolve_bench_file("geneval", "evaluation_metadata.jsonl", bad, verify=False) == bad


def test_missing_message(env):
    with pytest.raises(InputError) as err:
        resolve_bench_file("geneval", "evaluation_metadata.jsonl")
    msg = str(err.value)
    assert "evaluation_metadata.jsonl" in msg
    assert "https://raw.githubusercontent.com/djghosh13/geneval/main/prompts/evaluation_metadata.jsonl" in msg
    assert "--metadata" in msg and "$DMDR_HOME/benchmarks/geneval/evaluation_metadata.jsonl" in msg
    with pytest.raises(InputError) as err:
        resolve_bench_file("dpg", "prompts.jsonl")
    msg = str(err.value)
    assert "github.com/TencentQQGYLab/ELLA" in msg and "--prompts" in msg
    with pytest.raises(InputError, match="no pinned upstream URL"):
        resolve_bench_file("drawbench", "prompts.txt")


def test_shared_files_resolve_from_checkout():
    if not (benchfiles.SHARED_BENCHMARKS / "geneval" / "evaluation_metadata.jsonl").is_file():
        pytest.skip(f"shared benchmark files not found under {benchfiles.SHARED_BENCHMARKS}")
    for bench, files in BENCH_FILES.items():
        for filename in files:
            path = resolve_bench_file(bench, filename)  # hash-verified
            assert path.name == filename
    names = load_object_names(resolve_bench_file("geneval", "object_names.txt"))
    assert len(names) == 80 and names[0] == "person" and "computer mouse" in names
    draw = load_prompt_list(resolve_bench_file("drawbench", "prompts.txt"))
    assert len(draw) == 200 and draw[0].id == "0"
    dpg = load_prompt_list(resolve_bench_file("dpg_bench", "prompts.jsonl"))
    assert len(dpg) == 1065 and dpg[0] == ("0", dpg[0].prompt) and len({p.id for p in dpg}) == 1065


# --------------------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------------------


def test_load_geneval_metadata_validates(tmp_path):
    good = tmp_path / "m.jsonl"
    pos = {"tag": "position", "prompt": "p", "include": [{"class": "dog", "count": 1},
                                                         {"class": "cat", "count": 1, "position": ["left of", 0]}]}
    _put(good, json.dumps(LINE) + "\n" + json.dumps(pos) + "\n\n")
    assert load_geneval_metadata(good) == [LINE, pos]
    assert load_geneval_metadata(good, classes=["clock", "dog", "cat"]) == [LINE, pos]
    with pytest.raises(InputError, match="not a known class"):
        load_geneval_metadata(good, classes=["clock"])

    bad_lines = [
        {**LINE, "tag": "count"},
        {**LINE, "include": []},
        {**LINE, "include": [{"class": "clock"}]},
        {**LINE, "include": [{"class": "clock", "count": 0}]},
        {**LINE, "include": [{"class": "clock", "count": True}]},
        {**LINE, "include": [{"class": "clock", "count": 1, "colour": "red"}]},
        {**LINE, "include": [{"class": "clock", "count": 1, "color": "teal"}]},
        {**LINE, "exclude": [{"class": "clock", "count": 3, "color": "red"}]},
        {**pos, "include": [pos["include"][0], {"class": "cat", "count": 1, "position": ["near", 0]}]},
        {**pos, "include": [pos["include"][0], {"class": "cat", "count": 1, "position": ["left of", 1]}]},
        {k: v for k, v in LINE.items() if k != "prompt"},
    ]
    for bad in bad_lines:
        _put(good, json.dumps(LINE) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(InputError, match=r"m\.jsonl:2:"):
            load_geneval_metadata(good)
    _put(good, json.dumps(LINE) + "\n{not json\n")
    with pytest.raises(InputError, match=r":2: not valid JSON"):
        load_geneval_metadata(good)
    _put(good, json.dumps(LINE) + "\n\n" + json.dumps(LINE) + "\n")
    with pytest.raises(InputError, match=r":2: empty line"):
        load_geneval_metadata(good)
    with pytest.raises(InputError, match="does not exist"):
        load_geneval_metadata(tmp_path / "missing.jsonl")


def test_load_object_names(tmp_path):
    p = _put(tmp_path / "names.txt", "".join(f"c{i}\n" for i in range(80)))
    assert load_object_names(p)[:2] == ["c0", "c1"]
    _put(p, "a\nb\n")
    with pytest.raises(InputError, match="expected 80"):
        load_object_names(p)
    assert load_object_names(p, expected=None) == ["a", "b"]
    _put(p, "a\na\n")
    with pytest.raises(InputError, match="duplicate"):
        load_object_names(p, expected=2)


def test_load_prompt_list(tmp_path):
    txt = _put(tmp_path / "p.txt", "first prompt\n\n  second prompt  \n")
    assert load_prompt_list(txt) == [("0", "first prompt"), ("2", "second prompt")]
    jl = _put(tmp_path / "p.jsonl", '{"id": "partiprompts1", "prompt": "a"}\n{"prompt": "b"}\n')
    got = load_prompt_list(jl)
    assert got == [("partiprompts1", "a"), ("1", "b")] and got[0].id == "partiprompts1" and got[1].prompt == "b"
    _put(jl, '{"id": "x", "prompt": "a"}\n{"id": "x", "prompt": "b"}\n')
    with pytest.raises(InputError, match="duplicate id"):
        load_prompt_list(jl)
    _put(jl, '{"id": "x"}\n')
    with pytest.raises(InputError, match=":1:"):
        load_prompt_list(jl)
    _put(txt, "\n\n")
    with pytest.raises(InputError, match="no prompts"):
        load_prompt_list(txt)


# --------------------------------------------------------------------------------------------------------------
# Folder layout
# --------------------------------------------------------------------------------------------------------------


def test_folder_round_trip(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    root = tmp_path / "images"
    imgs = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(4)]
    folder = write_prompt_folder(root, 3, LINE, imgs)
    assert folder == root / "00003"
    assert (folder / "metadata.jsonl").read_text() == json.dumps(LINE) + "\n"
    assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png", "0002.png", "0003.png"]

    # an upstream-style folder: 5-digit sample names, metadata without a final newline, a grid and other files
    other = root / "00012" / "samples"
    other.mkdir(parents=True)
    (root / "00012" / "metadata.jsonl").write_text(json.dumps({**LINE, "prompt": "x"}))
    for name in ("00000.png", "00002.png", "00010.png", "00001.png", "notes.txt", "a1.png"):
        (other / name).write_bytes(b"")
    (root / "00012" / "grid.png").write_bytes(b"")
    (root / "logs").mkdir()  # not all digits: ignored
    (root / "7").mkdir()  # any all-digit folder counts; no samples/ -> no images
    (root / "7" / "metadata.jsonl").write_text(json.dumps(LINE) + "\n")

    got = list(iter_image_folder(root))
    assert [i for i, _, _ in got] == [3, 7, 12]
    idx, md, paths = got[0]
    assert md == LINE and [p.name for p in paths] == ["0000.png", "0001.png", "0002.png", "0003.png"]
    with Image.open(paths[2]) as im:
        assert im.getpixel((0, 0)) == (80, 0, 0)
    assert got[1][2] == []
    assert got[2][1]["prompt"] == "x"
    assert [p.name for p in got[2][2]] == ["00000.png", "00001.png", "00002.png", "00010.png"]


def test_folder_errors(tmp_path):
    with pytest.raises(InputError):
        list(iter_image_folder(tmp_path / "nope"))
    (tmp_path / "00000" / "samples").mkdir(parents=True)
    with pytest.raises(InputError, match="metadata.jsonl"):
        list(iter_image_folder(tmp_path))
