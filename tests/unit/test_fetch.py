"""``dmdr data fetch|list`` against a loopback HTTP server serving ../shared/benchmarks (EVALUATION.md §7.1)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shutil
import socket
import threading

import pytest
import typer
from typer.testing import CliRunner

from dmdr_cli.commands import data as data_cmd
from dmdr_cli.errors import InputError
from dmdr_cli.evaluation import benchfiles, fetch
from dmdr_cli.evaluation.benchfiles import BENCH_FILES, resolve_bench_file, sha256_file
from dmdr_cli.evaluation.fetch import fetch_bench, parse_prompt_index, rebuild_dpg_prompts

SHARED = benchfiles.SHARED_BENCHMARKS
needs_shared = pytest.mark.skipif(not (SHARED / "dpg_bench" / "prompts.jsonl").is_file(),
                                  reason=f"shared benchmark files not found at {SHARED}")

cli = typer.Typer()
cli.add_typer(data_cmd.app, name="data")
runner = CliRunner(env={"COLUMNS": "400"})


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def serve():
    """``serve(folder) -> "http://127.0.0.1:PORT"``: a threaded read-only file server, stopped after the test."""
    servers = []

    def start(folder):
        handler = functools.partial(_Quiet, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_pinned_copies(dest, bench):
    for name, spec in BENCH_FILES[bench].items():
        got = dest / name
        assert sha256_file(got) == spec.sha256
        assert got.read_bytes() == (SHARED / bench / name).read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == sorted(BENCH_FILES[bench])  # no temp files left


@needs_shared
@pytest.mark.parametrize("bench,folder", [("geneval", "geneval"), ("dpg", "dpg_bench"), ("drawbench", "drawbench")])
def test_fetch_from_mirror_cli(serve, tmp_path, bench, folder):
    url = serve(SHARED)
    dest = tmp_path / "out" / folder
    result = runner.invoke(cli, ["data", "fetch", bench, "--dest", str(dest), "--base-url", f"{url}/{folder}/"])
    assert result.exit_code == 0, result.output
    _assert_pinned_copies(dest, folder)
    for name in BENCH_FILES[folder]:
        assert str(dest / name) in result.output and "written" in result.output
    # a second run finds the pinned files and downloads nothing (the server is not even needed)
    again = runner.invoke(cli, ["data", "fetch", bench, "--dest", str(dest),
                                "--base-url", f"http://127.0.0.1:{_closed_port()}/x"])
    assert again.exit_code == 0, again.output
    assert "unchanged" in again.output


@needs_shared
def test_default_dest_is_dmdr_home_and_resolves(serve, tmp_path, monkeypatch):
    monkeypatch.setenv("DMDR_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(benchfiles, "SHARED_BENCHMARKS", tmp_path / "no-shared")
    for spec in BENCH_FILES["geneval"].values():
        monkeypatch.delenv(spec.env_var, raising=False)
    results = fetch_bench("geneval", base_url=f"{serve(SHARED)}/geneval")
    assert [r.status for r in results] == ["written", "written"]
    assert {r.path.parent for r in results} == {tmp_path / "home" / "benchmarks" / "geneval"}
    assert resolve_bench_file("geneval", "evaluation_metadata.jsonl") == results[0].path


def _per_file_mirror(tmp_path):
    """ELLA's layout rebuilt from the shared file: one <id>.txt per prompt (with a trailing newline)."""
    root = tmp_path / "ella"
    prompts = root / "dpg_bench" / "prompts"
    prompts.mkdir(parents=True)
    rows = [json.loads(line) for line in (SHARED / "dpg_bench" / "prompts.jsonl").read_text("utf-8").splitlines()]
    for row in rows:
        (prompts / f"{row['id']}.txt").write_text(row["prompt"] + "\n", encoding="utf-8")
    return root, rows


@needs_shared
def test_dpg_per_file_mode_rebuilds_the_pinned_file(serve, tmp_path):
    root, rows = _per_file_mirror(tmp_path)
    assert len(rows) == 1065
    index = tmp_path / "index.txt"  # plain text: one name a line, stems and comments accepted
    index.write_text("# ELLA dpg_bench/prompts\n" + "\n".join(
        r["id"] if i % 2 else f"{r['id']}.txt" for i, r in enumerate(rows)) + "\n")
    url = serve(root)
    dest = tmp_path / "out"
    result = runner.invoke(cli, ["data", "fetch", "dpg", "--dest", str(dest), "--index", str(index),
                                 "--base-url", f"{url}/dpg_bench/prompts"])
    assert result.exit_code == 0, result.output
    _assert_pinned_copies(dest, "dpg_bench")
    assert "1065 files" in result.output
    # the same through a GitHub git-trees listing served over HTTP
    tree = {"sha": "x", "truncated": False, "tree": [{"path": "README.md", "type": "blob"},
                                                      {"path": "dpg_bench", "type": "tree"},
                                                      {"path": "dpg_bench/compute_dpg_bench.py", "type": "blob"},
                                                      {"path": "dpg_bench/requirements.txt", "type": "blob"}]
            + [{"path": f"dpg_bench/prompts/{r['id']}.txt", "type": "blob"} for r in rows]}
    (root / "tree.json").write_text(json.dumps(tree))
    dest2 = tmp_path / "out2"
    results = fetch_bench("dpg", dest2, index=f"{url}/tree.json", base_url=f"{url}/dpg_bench/prompts")
    assert results[0].status == "written"
    _assert_pinned_copies(dest2, "dpg_bench")


def test_dpg_upstream_urls(monkeypatch, tmp_path):
    """Without options, the listing comes from the GitHub trees API and each file from the raw folder (no
    network here: `download` is replaced by a table of the URLs dmdr must ask for)."""
    prompts = {"b": " second prompt \n", "a": "first prompt – ünïcode\n", "10": "ten\n"}
    tree = {"truncated": False, "tree": [{"path": f"dpg_bench/prompts/{k}.txt", "type": "blob"} for k in prompts]}
    served = {fetch.DPG_TREE_API: json.dumps(tree).encode()}
    served.update({f"{fetch.DPG_PROMPTS_RAW}/{k}.txt": v.encode() for k, v in prompts.items()})
    asked = []

    def fake_download(url, **kw):
        asked.append(url)
        return served[url]

    expected = rebuild_dpg_prompts(prompts.items())
    assert expected.decode() == ('{"id": "10", "prompt": "ten"}\n{"id": "a", "prompt": "first prompt – ünïcode"}\n'
                                 '{"id": "b", "prompt": "second prompt"}\n')
    spec = BENCH_FILES["dpg_bench"]["prompts.jsonl"]
    monkeypatch.setitem(BENCH_FILES["dpg_bench"], "prompts.jsonl", benchfiles.BenchFile(
        **{**spec.__dict__, "sha256": hashlib.sha256(expected).hexdigest()}))
    monkeypatch.setattr(fetch, "download", fake_download)
    (result,) = fetch_bench("dpg", tmp_path / "d")
    assert result.path.read_bytes() == expected
    assert asked[0] == fetch.DPG_TREE_API and sorted(asked[1:]) == sorted(set(served) - {fetch.DPG_TREE_API})
    assert fetch.DPG_PROMPTS_RAW.startswith("https://raw.githubusercontent.com/TencentQQGYLab/ELLA/")


def test_geneval_default_urls_are_the_pinned_upstream(monkeypatch, tmp_path):
    asked = []

    def fake_download(url, **kw):
        asked.append(url)
        raise InputError(f"cannot download {url}: offline test")

    monkeypatch.setattr(fetch, "download", fake_download)
    with pytest.raises(InputError):
        fetch_bench("geneval", tmp_path / "d")
    assert asked == [BENCH_FILES["geneval"]["evaluation_metadata.jsonl"].upstream]
    assert not (tmp_path / "d").exists()


@needs_shared
def test_altered_bytes_fail_and_write_nothing(serve, tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    shutil.copy(SHARED / "geneval" / "object_names.txt", mirror)
    original = (SHARED / "geneval" / "evaluation_metadata.jsonl").read_bytes()
    (mirror / "evaluation_metadata.jsonl").write_bytes(original.replace(b"clock", b"clocK", 1))
    dest = tmp_path / "out"
    with pytest.raises(InputError) as err:
        fetch_bench("geneval", dest, base_url=serve(mirror))
    msg = str(err.value)
    assert "sha256 mismatch" in msg and "nothing was written" in msg and "\n" not in msg
    assert BENCH_FILES["geneval"]["evaluation_metadata.jsonl"].sha256 in msg
    assert not dest.exists()  # not even the good object_names.txt, no temp files
    # the same through the CLI: one line, exit 2
    result = runner.invoke(cli, ["data", "fetch", "geneval", "--dest", str(dest), "--base-url", str(mirror)])
    assert result.exit_code == 2 and "sha256 mismatch" in result.output
    assert not dest.exists()


def test_unreachable_url_is_one_line_input_error(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/bench"
    with pytest.raises(InputError) as err:
        fetch_bench("geneval", tmp_path / "out", base_url=url, timeout=5)
    msg = str(err.value)
    assert "\n" not in msg and f"{url}/evaluation_metadata.jsonl" in msg and "cannot download" in msg
    assert "--metadata" in msg and "$DMDR_HOME/benchmarks/geneval/evaluation_metadata.jsonl" in msg
    assert not (tmp_path / "out").exists()
    result = runner.invoke(cli, ["data", "fetch", "dpg", "--dest", str(tmp_path / "o"), "--base-url", url])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "--prompts" in result.output


@needs_shared
def test_http_404_names_the_url(serve, tmp_path):
    url = serve(tmp_path)  # empty folder
    with pytest.raises(InputError, match="HTTP 404") as err:
        fetch_bench("drawbench", tmp_path / "out", base_url=url)
    assert f"{url}/prompts.txt" in str(err.value)


@needs_shared
def test_existing_different_file_needs_force(serve, tmp_path):
    url = f"{serve(SHARED)}/drawbench"
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "prompts.txt").write_text("my own prompts\n")
    with pytest.raises(InputError, match="--force"):
        fetch_bench("drawbench", dest, base_url=url)
    assert (dest / "prompts.txt").read_text() == "my own prompts\n"
    result = runner.invoke(cli, ["data", "fetch", "drawbench", "--dest", str(dest), "--base-url", url])
    assert result.exit_code == 2 and "different sha256" in result.output
    (r,) = fetch_bench("drawbench", dest, base_url=url, force=True)
    assert r.status == "replaced"
    _assert_pinned_copies(dest, "drawbench")


def test_drawbench_has_no_upstream_and_bad_options(tmp_path):
    with pytest.raises(InputError, match="no pinned upstream URL") as err:
        fetch_bench("drawbench", tmp_path / "out")
    assert "--base-url" in str(err.value) and "--prompts" in str(err.value)
    with pytest.raises(InputError, match="Did you mean 'geneval'"):
        fetch_bench("genval", tmp_path)
    with pytest.raises(InputError, match="--index only applies to dpg"):
        fetch_bench("geneval", tmp_path, index="x.txt")
    with pytest.raises(InputError, match="unsupported scheme"):
        fetch_bench("geneval", tmp_path, base_url="ftp://example.org/x")
    with pytest.raises(InputError, match="neither a URL nor an existing folder"):
        fetch_bench("geneval", tmp_path, base_url=str(tmp_path / "nope"))
    assert not (tmp_path / "out").exists()


def test_parse_prompt_index_formats():
    assert parse_prompt_index("b.txt\n# comment\n\na\n") == ["a.txt", "b.txt"]
    assert parse_prompt_index(b'["x.txt", "y", "y.txt"]') == ["x.txt", "y.txt"]
    assert parse_prompt_index('["dpg_bench/prompts/y.txt", "other/x.txt"]') == ["y.txt"]  # only the prompt folder
    contents_api = [{"name": "p1.txt", "type": "file"}, {"name": "sub", "type": "dir"}]
    assert parse_prompt_index(json.dumps(contents_api)) == ["p1.txt"]
    tree = {"truncated": False, "tree": [{"path": "dpg_bench/prompts/q.txt", "type": "blob"},
                                         {"path": "requirements.txt", "type": "blob"}]}
    assert parse_prompt_index(json.dumps(tree)) == ["q.txt"]
    with pytest.raises(InputError, match="truncated"):
        parse_prompt_index(json.dumps({**tree, "truncated": True}))
    with pytest.raises(InputError, match="no prompt files"):
        parse_prompt_index("# nothing\n")


def test_data_list(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("DMDR_HOME", str(home))
    for files in BENCH_FILES.values():
        for spec in files.values():
            monkeypatch.delenv(spec.env_var, raising=False)
    monkeypatch.setattr(benchfiles, "SHARED_BENCHMARKS", tmp_path / "no-shared")
    tampered = tmp_path / "draw.txt"
    tampered.write_text("a prompt\n")
    monkeypatch.setenv(BENCH_FILES["drawbench"]["prompts.txt"].env_var, str(tampered))
    rows = {(r["bench"], r["file"]): r for r in fetch.bench_file_status()}
    assert rows[("drawbench", "prompts.txt")]["hash"] == "mismatch"
    assert rows[("drawbench", "prompts.txt")]["origin"] == "DMDR_ASSET_DRAWBENCH"
    names_row = rows[("geneval", "object_names.txt")]
    assert not names_row["found"] and "not found" in names_row["error"]
    if SHARED.is_dir():
        (home / "benchmarks" / "geneval").mkdir(parents=True)
        shutil.copy(SHARED / "geneval" / "object_names.txt", home / "benchmarks" / "geneval")
        row = {(r["bench"], r["file"]): r for r in fetch.bench_file_status()}[("geneval", "object_names.txt")]
        assert row["found"] and row["hash"] == "ok" and row["origin"] == "$DMDR_HOME/benchmarks"
    result = runner.invoke(cli, ["data", "list"])
    assert result.exit_code == 0, result.output
    assert "mismatch" in result.output and "dpg_bench.csv" in result.output and "user-supplied" in result.output
