"""Seconds per image of the models of one evaluation, measured interleaved on one batch.

Each model's images are generated one model after the other, so the medians over their generation batches
compare a teacher timed in one minute with a student timed in the next; on a shared machine whose speed drifts
by 10-15 % within minutes, one demo's models measured 9.1x that way in one eval and 10.3x in the next. Here
every model generates the evaluation's first batch (the same prompts and seeds for all), the models taking turns,
``rounds`` times, and each model's median over its rounds is its seconds per image.
"""

from __future__ import annotations

import statistics


def interleaved_seconds(generators: dict, rounds: int) -> dict | None:
    """``{"rounds", "images", "seconds_per_image": {name: median}, "samples": {name: [...]}}``, or ``None`` when
    there is nothing to compare (fewer than two models, ``rounds`` 0, or a model that generated nothing)."""
    inputs = [getattr(g, "first_inputs", None) for g in generators.values()]
    if rounds <= 0 or len(generators) < 2 or any(i is None for i in inputs):
        return None
    prompts, seeds = inputs[0]
    samples: dict[str, list[float]] = {name: [] for name in generators}
    for _ in range(rounds):
        for name, g in generators.items():
            samples[name].append(g.time_call(prompts, seeds))
    return {"rounds": rounds, "images": len(prompts),
            "seconds_per_image": {name: statistics.median(v) for name, v in samples.items()}, "samples": samples}
