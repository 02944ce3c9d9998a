"""Train (or resume) the digits-world tiny SD3 teacher and score it: a thin wrapper over dmdr_cli.digits.teacher.

    python scripts/train_digits_teacher.py --out /tmp/digits-teacher --max-minutes 12 --score 60

Resumable: rerun the same command and it continues from ``<out>-work/ckpt/last.pt`` (the VAE is reused from
``<out>-work/vae``). ``--snapshots`` keeps the EMA weights of every checkpoint (for accuracy-vs-time curves:
``--score-snapshots`` scores them afterwards).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from dmdr_cli.digits.teacher import TeacherRecipe

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="diffusers folder to write (load with --set model.path=OUT)")
    ap.add_argument("--work", default=None, help="VAE + checkpoints (default <out>-work)")
    for f in fields(TeacherRecipe):
        if f.type in ("int", "float") or isinstance(f.default, (int, float)):
            ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    ap.add_argument("--snapshots", action="store_true", help="keep EMA weights of every checkpoint")
    ap.add_argument("--score", type=int, default=0, help="score the result on this many held-out prompts")
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--score-snapshots", action="store_true", help="only score saved snapshots (no training)")
    args = ap.parse_args()

    import torch

    from dmdr_cli.digits import teacher as T
    from dmdr_cli.engine.runtime import quiet_libraries

    quiet_libraries()
    recipe = TeacherRecipe(**{f.name: getattr(args, f.name) for f in fields(TeacherRecipe)
                              if hasattr(args, f.name)})
    out = Path(args.out)
    work = Path(args.work) if args.work else out.parent / f"{out.name}-work"
    snaps = work / "snapshots"

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    if args.score_snapshots:
        results = []
        for snap in sorted(snaps.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1])):
            state = torch.load(snap, weights_only=False)
            folder = snaps / f"{snap.stem}-pipe"
            if not (folder / "model_index.json").is_file():
                pipe = T.load_pipeline(out)
                pipe.transformer.load_state_dict(state["ema"])
                T.save_pipeline(pipe, folder, half=False)
            log(f"{snap.stem}: {state['seconds'] / 60:.1f} min of training")
            s = T.score_teacher(folder, args.score or 60, guidance=args.guidance,
                                grid=snaps / f"{snap.stem}.png", log=log)
            results.append({"step": state["step"], "minutes": state["seconds"] / 60,
                            "tasks": {k: v["accuracy"] for k, v in s["tasks"].items()}, "overall": s["overall"]})
        (snaps / "scores.json").write_text(json.dumps(results, indent=2))
        return

    def on_checkpoint(step: int, seconds: float, ema) -> None:
        if args.snapshots:
            snaps.mkdir(parents=True, exist_ok=True)
            torch.save({"ema": ema.state_dict(), "step": step, "seconds": seconds}, snaps / f"step-{step}.pt")

    T.train_all(out, recipe, work=work, log=log, on_checkpoint=on_checkpoint)
    if args.score:
        T.score_teacher(out, args.score, guidance=args.guidance, grid=out.parent / f"{out.name}-grid.png", log=log)


if __name__ == "__main__":
    main()
