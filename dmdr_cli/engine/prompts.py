"""Prompt sources and the training prompt stream (image-free training: prompts only).

Sources: a ``.txt``/``.jsonl`` file, ``builtin:NAME`` (shipped lists for the tiny presets), or
``hf:REPO/FILE`` resolved from the Hugging Face cache only (the official DMDR prompt file).
The stream shuffles per epoch with a fixed seed, drops the last partial batch, shards across ranks and
exposes its position, so a resumed run sees exactly the prompts an uninterrupted run would.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from dmdr_cli.errors import InputError
from dmdr_cli.io import read_prompts

_COLORS = ["red", "green", "blue", "yellow", "purple", "white"]
_SHAPES = ["circle", "square", "triangle", "star", "ring", "cross"]
_RELATIONS = ["left of", "right of", "above", "below"]


def builtin_shapes() -> list[str]:
    """A small compositional prompt set (colour, count, position) for the tiny presets."""
    out = [f"a {c} {s}" for c in _COLORS for s in _SHAPES]
    out += [f"two {c} {s}s" for c in _COLORS[:3] for s in _SHAPES[:3]]
    out += [f"a {c1} {s1} {r} a {c2} {s2}" for (c1, s1, c2, s2) in
            [("red", "circle", "blue", "square"), ("green", "star", "yellow", "ring"), ("purple", "cross", "white", "triangle")]
            for r in _RELATIONS]
    return out


def builtin_digits(split: str = "train", n: int = 3000) -> list[str]:
    """Digits-world captions of one prompt split, balanced over the six GenEval tasks (the training prompts of
    ``tiny-sd3``: the held-out ``test`` split is what ``dmdr eval --bench digits`` scores)."""
    from dmdr_cli.digits.world import make_metadata

    return [m["prompt"] for m in make_metadata(n, seed=1, split=split)]


BUILTIN = {"shapes": builtin_shapes, "digits": builtin_digits, "digits-test": lambda: builtin_digits("test", 600)}
OFFICIAL_PROMPTS = ("DyJiang/dmdr", "t2i-2m-filtered-prompts.txt")


def load_source(spec: str) -> list[str]:
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN:
            raise InputError(f"unknown built-in prompt set '{name}'", f"choose one of {', '.join(BUILTIN)}")
        return BUILTIN[name]()
    if spec.startswith("hf:"):
        repo, _, filename = spec[3:].rpartition("/")
        from huggingface_hub import hf_hub_download

        for repo_type in ("model", "dataset"):
            try:
                return read_prompts(hf_hub_download(repo, filename, repo_type=repo_type, local_files_only=True))
            except Exception:
                continue
        raise InputError(f"prompt file '{filename}' of '{repo}' is not in the Hugging Face cache",
                         f"download it on a connected machine (`hf download {repo} {filename}`) "
                         "or pass --prompts FILE")
    return read_prompts(spec)


@dataclass
class PromptStream:
    prompts: list[str]
    batch_size: int
    seed: int
    rank: int = 0
    world: int = 1
    epoch: int = 0
    pos: int = 0

    def __post_init__(self) -> None:
        per_rank = len(self.prompts) // self.world
        if per_rank < self.batch_size:
            raise InputError(f"{len(self.prompts)} prompts are too few for batch size {self.batch_size} on {self.world} process(es)",
                             "add prompts or lower the batch size")
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order[self.rank::self.world]

    def next(self) -> list[str]:
        if self.pos + self.batch_size > len(self._order):  # drop_last, new epoch
            self.epoch += 1
            self.pos = 0
            self._order = self._epoch_order()
        batch = [self.prompts[i] for i in self._order[self.pos:self.pos + self.batch_size]]
        self.pos += self.batch_size
        return batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "n": len(self.prompts)}

    def restore(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._epoch_order()
