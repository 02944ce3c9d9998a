"""File helpers: prompt files, atomic writes and atomic directories (torch-free)."""

from __future__ import annotations

import os
import stat

import pytest

from dmdr_cli.errors import InputError
from dmdr_cli.io import AtomicDir, append_jsonl, atomic_write_bytes, atomic_write_text, read_prompts


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- read_prompts ---------------------------------------------------------------------------------------


def test_txt_prompts_skip_blank_lines_and_strip(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("a cat\n\n   \n  a dog on a skateboard  \nthird\n")
    assert read_prompts(p) == ["a cat", "a dog on a skateboard", "third"]


def test_txt_prompts_with_bom_and_crlf(tmp_path):
    p = tmp_path / "win.txt"
    p.write_bytes("\ufeffa cat\r\na dog\r\n".encode("utf-8"))
    assert read_prompts(p) == ["a cat", "a dog"]


def test_jsonl_prompts(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "a red circle", "tag": 1}\n\n{"prompt": "two  spaces "}\n')
    assert read_prompts(p) == ["a red circle", "two  spaces "]  # jsonl text is kept verbatim


def test_jsonl_with_bom(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes('\ufeff{"prompt": "x"}\n'.encode("utf-8"))
    assert read_prompts(p) == ["x"]


@pytest.mark.parametrize("name, text", [("empty.txt", ""), ("blank.txt", "\n  \n\n"), ("empty.jsonl", "\n")])
def test_empty_prompt_file_is_an_input_error(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(InputError, match="has no prompts"):
        read_prompts(p)


def test_jsonl_missing_prompt_names_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "ok"}\n\n{"text": "no prompt field"}\n')
    with pytest.raises(InputError) as err:
        read_prompts(p)
    assert f"{p}:3:" in str(err.value) and "'prompt'" in str(err.value)


def test_jsonl_bad_json_and_non_string_prompt(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(InputError, match=r":2: not valid JSON"):
        read_prompts(p)
    p.write_text('{"prompt": 3}\n')
    with pytest.raises(InputError, match=r":1: no string 'prompt' field"):
        read_prompts(p)
    p.write_text('["a list"]\n')
    with pytest.raises(InputError, match=r":1: no string 'prompt' field"):
        read_prompts(p)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(InputError, match="prompt file not found"):
        read_prompts(tmp_path / "nope.txt")
    with pytest.raises(InputError, match="prompt file not found"):
        read_prompts(tmp_path)  # a folder is not a prompt file


# -- atomic_write_* ---------------------------------------------------------------------------------------


def test_atomic_write_text_replaces_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "config.yaml"
    atomic_write_text(target, "a: 1\n")
    atomic_write_text(target, "a: 2\n")
    assert target.read_text() == "a: 2\n"
    assert sorted(os.listdir(target.parent)) == ["config.yaml"]


def test_atomic_write_has_normal_permissions(tmp_path):
    target = atomic_write_bytes(tmp_path / "x.bin", b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()  # not mkstemp's 0600


def test_atomic_write_failure_keeps_old_content_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "metadata.jsonl"
    target.write_text("old\n")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new\n")
    monkeypatch.undo()
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["metadata.jsonl"]


def test_append_jsonl(tmp_path):
    p = tmp_path / "m.jsonl"
    append_jsonl(p, {"step": 1, "loss": 0.5})
    append_jsonl(p, {"step": 2})
    assert p.read_text().splitlines() == ['{"step": 1, "loss": 0.5}', '{"step": 2}']


# -- AtomicDir -------------------------------------------------------------------------------------------


def test_atomic_dir_success(tmp_path):
    final = tmp_path / "out"
    with AtomicDir(final) as tmp:
        assert tmp != final and tmp.parent == tmp_path and not final.exists()
        (tmp / "a.txt").write_text("A")
    assert (final / "a.txt").read_text() == "A"
    assert os.listdir(tmp_path) == ["out"]
    assert stat.S_IMODE(final.stat().st_mode) == 0o777 & ~_umask()  # not mkdtemp's 0700


def test_atomic_dir_exception_leaves_existing_final_untouched(tmp_path):
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "weights.bin").write_text("good")
    with pytest.raises(RuntimeError, match="crash"):
        with AtomicDir(final, replace=True) as tmp:
            (tmp / "weights.bin").write_text("half")
            raise RuntimeError("crash")
    assert os.listdir(final) == ["weights.bin"] and (final / "weights.bin").read_text() == "good"
    assert os.listdir(tmp_path) == ["ckpt"]  # the temp dir is gone


def test_atomic_dir_exception_without_existing_final(tmp_path):
    final = tmp_path / "new"
    with pytest.raises(KeyboardInterrupt):
        with AtomicDir(final) as tmp:
            (tmp / "x").write_text("x")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_atomic_dir_refuses_to_overwrite_without_replace(tmp_path):
    final = tmp_path / "run"
    final.mkdir()
    (final / "keep.txt").write_text("keep")
    with pytest.raises(InputError, match="already exists"):
        with AtomicDir(final) as tmp:
            (tmp / "new.txt").write_text("new")
    assert os.listdir(final) == ["keep.txt"]
    assert os.listdir(tmp_path) == ["run"]


def test_atomic_dir_replace_swaps_content(tmp_path):
    final = tmp_path / "run"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with AtomicDir(final, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert os.listdir(final) == ["new.txt"]
    assert os.listdir(tmp_path) == ["run"]  # no ".run.old" left behind
