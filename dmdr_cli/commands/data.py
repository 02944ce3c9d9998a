"""``dmdr data fetch|list``: benchmark prompt files (GenEval, DPG-Bench, DrawBench) on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dmdr_cli.commands.common import guarded

app = typer.Typer(help="Benchmark files: list what resolves here, fetch them from upstream or a mirror.",
                  no_args_is_help=True)


@app.command("fetch")
@guarded
def fetch(
    bench: Annotated[str, typer.Argument(help="geneval | dpg | drawbench.")],
    dest: Annotated[Optional[Path], typer.Option("--dest", help="Destination folder (default $DMDR_HOME/benchmarks/<bench>/, where dmdr looks).")] = None,
    base_url: Annotated[Optional[str], typer.Option("--base-url", help="Mirror folder (http/https/file URL or local path) serving the files under their own names; for dpg with --index, the folder of the per-prompt .txt files.")] = None,
    index: Annotated[Optional[str], typer.Option("--index", help="dpg only: file or URL listing the upstream prompt file names (text, JSON list or GitHub tree listing); rebuilds prompts.jsonl from the .txt files.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file whose sha256 differs from the pinned one.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds per HTTP request.")] = 60.0,
) -> None:
    """Download a benchmark's files, verify the pinned sha256 and write them atomically.

    geneval: raw.githubusercontent.com (djghosh13/geneval) or --base-url. dpg: --base-url serving prompts.jsonl,
    or the per-prompt .txt files (upstream ELLA dpg_bench/prompts/, listed through the GitHub API or --index),
    rebuilt into prompts.jsonl. drawbench: no pinned upstream; --base-url only.
    """
    from dmdr_cli.evaluation.fetch import fetch_bench
    from dmdr_cli.ui import console

    for r in fetch_bench(bench, dest, base_url=base_url, index=index, force=force, timeout=timeout):
        if r.status == "unchanged":
            console.info(f"unchanged {r.path} (sha256 {r.sha256[:12]}… already matches the pin)")
        else:
            console.success(f"{r.status} {r.path} (sha256 {r.sha256[:12]}… ok; from {r.source})")


@app.command("list")
@guarded
def list_files() -> None:
    """Show each benchmark file: whether it resolves here, where from, and whether its sha256 matches the pin."""
    from dmdr_cli.evaluation.fetch import bench_file_status
    from dmdr_cli.ui import console

    rows = []
    for r in bench_file_status():
        rows.append([r["bench"], r["file"], "yes" if r["found"] else "no", r["origin"] or "-", r["hash"],
                     r["path"] or (r["error"] or "")])
    rows.append(["dpg_bench", "dpg_bench.csv", "user-supplied", "-", "-",
                 "question CSV (TencentQQGYLab/ELLA dpg_bench/dpg_bench.csv): pass --questions PATH to dmdr eval"])
    console.table("dmdr benchmark files", ["bench", "file", "found", "from", "sha256", "path"], rows)
