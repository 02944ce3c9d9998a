"""FID / KID / IS / precision-recall through torch-fidelity (EVALUATION.md §5, §7.1, §7.3, §7.7).

Entry points
------------
:func:`compute_fidelity` (the numbers behind ``dmdr eval --bench fid``), :func:`write_stats` /
:func:`load_stats` (precomputed reference statistics), :func:`register_extractor` (custom torch-fidelity feature
extractors, e.g. ``dmdr-digits-cnn``), :func:`resolve_inception_weights` (offline weights resolution),
:func:`frechet_distance` and :func:`feature_stats` (NumPy/SciPy, no torch).

Metrics (torch-fidelity 0.4.0 computes them; dmdr renames the keys)
------------------------------------------------------------------
* **FID** (Heusel et al. 2017, arXiv 1706.08500): with ``μ, Σ`` the mean and covariance of the features of each
  set, ``FID = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2·(Σ₁Σ₂)^½)``. Key ``fid``.
* **KID** (Bińkowski et al. 2018, arXiv 1801.01401): the unbiased MMD² with the cubic polynomial kernel
  ``k(x, y) = (xᵀy / d + 1)³``, averaged over ``kid_subsets`` (100) random subsets of ``kid_subset_size`` images
  per input. Keys ``kid_mean``, ``kid_std``. The subset size is clamped to the smaller input (torch-fidelity fails
  otherwise); the size used is reported as ``kid_subset_size``.
* **IS** (Salimans et al. 2016, arXiv 1606.03498) of ``input1`` only: ``exp(E_x KL(p(y|x) ‖ p(y)))`` from the
  extractor's logits (Inception: ``logits_unbiased``), over ``isc_splits`` (10) splits, clamped to the number of
  images (torch-fidelity returns NaN for empty splits). Keys ``isc_mean``, ``isc_std``.
* **Precision / recall** (Kynkäänniemi et al. 2019, arXiv 1904.06991): k-NN (``prc_neighborhood`` = 3) manifold
  estimates; ``input1`` is the generated set, ``input2`` the real one. Keys ``precision``, ``recall``,
  ``f_score``. Canonical PRC uses VGG16 features; here it uses the chosen extractor's default PRC layer
  (Inception: ``2048``), so PRC numbers are *compatible*, not canonical.

Inputs
------
``input1`` is a folder of images (``png``, ``jpg``, ``jpeg``; PNG recommended, lossy formats bias the metrics),
all of one size (or pass ``samples_resize_and_crop``). ``input2`` is a folder too, or a **statistics file** ``*.npz``
with arrays ``mu`` (D,) and ``sigma`` (D, D) -- the format written by :func:`write_stats`, and also by
pytorch-fid's ``--save-stats`` and the TTUR ``fid_stats_*.npz`` files (these hold the TF Inception pool3 features
that ``inception-v3-compat``'s ``2048`` layer reproduces). torch-fidelity cannot read statistics files, so with
one dmdr extracts ``input1``'s features through torch-fidelity (the very same code path as a folder) and applies
:func:`frechet_distance`. A statistics file supports FID (and IS, which only needs ``input1``); KID and PRC need
both feature sets. Optional metadata written by :func:`write_stats` (``feature_extractor``, ``feature_layer``,
``weights_sha256``, ``n``) is checked when present.

Offline rules (EVALUATION.md §5.2, ENVIRONMENT.md "torch-fidelity")
-------------------------------------------------------------------
torch-fidelity downloads whatever it lacks (Inception/VGG/CLIP weights, torchvision datasets for names such as
``cifar10-train``, DINOv2 through ``torch.hub``). dmdr never lets it: the Inception weights file is resolved up
front (:func:`resolve_inception_weights`) and always passed as ``feature_extractor_weights_path``; other built-in
extractors need an explicit ``weights_path``; DINOv2 is refused; folders are passed as absolute paths (a relative
path spelled like a registered dataset name would be taken for that dataset); ``datasets_download=False``,
``cache=False`` (nothing is written to ``$TORCH_HOME/fidelity_cache``), ``verbose=False``, and on the CPU
``save_cpu_ram=True`` (otherwise up to 4 DataLoader worker processes start).

Which numbers are canonical (§7.7): FID/KID/IS with ``inception-v3-compat`` and the official weights file
(``weights_official`` in the result: the file's sha256 starts with the ``6726825d`` in its name, the torch.hub
hash-prefix convention), the same reference set and sample count. Everything else is compatible or dmdr-only.

torch-fidelity is imported lazily (it is the ``[fid]`` extra and imports torchvision).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dmdr_cli.errors import ConfigError, InputError, ModelNotFoundError, did_you_mean

from dmdr_cli.evaluation.inception import (  # public names re-exported for callers of this module
    INCEPTION_EXTRACTOR,
    INCEPTION_SHA256_PREFIX,
    INCEPTION_WEIGHTS_FILE,
    INCEPTION_WEIGHTS_URL,
    check_inception_state_dict,
    resolve_inception_weights,
)

__all__ = [
    "INCEPTION_EXTRACTOR",
    "INCEPTION_WEIGHTS_FILE",
    "INCEPTION_WEIGHTS_URL",
    "compute_fidelity",
    "feature_stats",
    "frechet_distance",
    "list_images",
    "load_stats",
    "register_extractor",
    "resolve_inception_weights",
    "write_stats",
]

#: File extensions taken from image folders (torch-fidelity's default ``samples_find_ext``).
SAMPLE_EXTENSIONS = "png,jpg,jpeg"

#: Accepted metric names -> torch-fidelity flag.
_METRICS = {"fid": "fid", "kid": "kid", "isc": "isc", "is": "isc", "prc": "prc", "pr": "prc"}
#: torch-fidelity result key -> dmdr result key.
_KEYS = {
    "frechet_inception_distance": "fid",
    "kernel_inception_distance_mean": "kid_mean",
    "kernel_inception_distance_std": "kid_std",
    "inception_score_mean": "isc_mean",
    "inception_score_std": "isc_std",
    "precision": "precision",
    "recall": "recall",
    "f_score": "f_score",
}
#: Built-in torch-fidelity extractors that would download weights when given no path.
_NEEDS_PATH_PREFIXES = ("vgg16", "clip-")
_HUB_ONLY_PREFIXES = ("dinov2-",)


# --------------------------------------------------------------------------------------------------------------
# Fréchet distance (NumPy/SciPy only)
# --------------------------------------------------------------------------------------------------------------


def feature_stats(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(μ, Σ)`` of an ``(N, D)`` feature matrix, in float64: ``μ = mean over rows`` and the unbiased sample
    covariance ``Σ = (X − μ)ᵀ(X − μ) / (N − 1)`` (``np.cov(rowvar=False)``, as torch-fidelity's
    ``fid_features_to_statistics`` and TTUR). Accepts NumPy arrays and CPU torch tensors; needs ``N ≥ 2``."""
    if hasattr(features, "detach"):  # a torch tensor
        features = features.detach().cpu().numpy()
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D (N, D) array, got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {x.shape[0]}")
    mu = x.mean(axis=0)
    sigma = np.atleast_2d(np.cov(x, rowvar=False))
    return mu, sigma


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """Fréchet distance between the Gaussians ``N(μ₁, Σ₁)`` and ``N(μ₂, Σ₂)``:

    ``d² = ‖μ₁ − μ₂‖² + Tr(Σ₁) + Tr(Σ₂) − 2·Tr((Σ₁Σ₂)^½)``

    (Dowson & Landau 1982; FID in Heusel et al. 2017). Implementation as in TTUR ``fid.py`` and pytorch-fid
    ``calculate_frechet_distance``: ``scipy.linalg.sqrtm`` of ``Σ₁Σ₂``; if that is not finite (singular product,
    e.g. fewer samples than dimensions) it is recomputed with ``ε·I`` added to both covariances; a complex result
    (round-off on a near-singular product) keeps its real part, with a warning when the imaginary part of the
    diagonal is not negligible. torch-fidelity uses the equivalent ``Σ √eig(Σ₁Σ₂)``; both agree to round-off.
    """
    from scipy import linalg

    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be {d}x{d}, got {sigma1.shape} and {sigma2.shape}")

    def _sqrtm(a: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LinAlgWarning "singular" / scipy deprecation notes
            out = linalg.sqrtm(a)
        return out[0] if isinstance(out, tuple) else out  # scipy < 1.16 with disp=False returned a tuple

    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = float(np.max(np.abs(np.diagonal(covmean).imag))) if d else 0.0
        if imag > 1e-3 * max(1.0, float(np.max(np.abs(np.diagonal(covmean).real)))):
            warnings.warn(f"frechet_distance: dropped an imaginary component of {imag:.3g} from sqrtm(Σ1Σ2)",
                          RuntimeWarning, stacklevel=2)
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


# --------------------------------------------------------------------------------------------------------------
# Statistics files
# --------------------------------------------------------------------------------------------------------------


def load_stats(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read a statistics ``.npz``: ``(mu, sigma, meta)``. ``mu``/``sigma`` are required (float64 on return);
    ``meta`` holds whichever of ``feature_extractor``, ``feature_layer``, ``weights_sha256``, ``n`` and
    ``torch_fidelity`` the file has (pytorch-fid/TTUR files have none). Raises ``InputError`` on anything else."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"statistics file {p} not found")
    try:
        with np.load(p, allow_pickle=False) as data:
            keys = set(data.files)
            if not {"mu", "sigma"} <= keys:
                raise InputError(f"statistics file {p} has no 'mu' and 'sigma' arrays (found: {sorted(keys)})",
                                 "write one with dmdr's write_stats or pytorch-fid --save-stats")
            mu = np.asarray(data["mu"], dtype=np.float64)
            sigma = np.asarray(data["sigma"], dtype=np.float64)
            meta: dict[str, Any] = {}
            for key in ("feature_extractor", "feature_layer", "weights_sha256", "torch_fidelity"):
                if key in keys:
                    meta[key] = str(data[key])
            if "n" in keys:
                meta["n"] = int(data["n"])
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip/format errors, pickled object arrays
        raise InputError(f"statistics file {p} is not a readable .npz ({type(exc).__name__}: {exc})") from exc
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise InputError(f"statistics file {p}: mu {mu.shape} and sigma {sigma.shape} do not match")
    return mu, sigma, meta


def write_stats(
    folder: str | os.PathLike[str],
    out_npz: str | os.PathLike[str],
    *,
    feature_extractor: str = INCEPTION_EXTRACTOR,
    weights_path: str | os.PathLike[str] | None = None,
    device: Any = "cpu",
    batch_size: int = 64,
    samples_find_deep: bool = False,
    samples_resize_and_crop: int = 0,
) -> dict[str, Any]:
    """Precompute reference statistics of an image folder for :func:`compute_fidelity` (``input2=out_npz``).

    Features come from the extractor's FID layer through torch-fidelity; the file holds ``mu`` (D,) and ``sigma``
    (D, D) in float64 (see :func:`feature_stats`) plus metadata ``feature_extractor``, ``feature_layer``, ``n``,
    ``weights_sha256`` ('' without a weights file) and ``torch_fidelity`` (version). Written atomically.
    Returns ``{"path", "n", "dim", "feature_extractor", "feature_layer", "weights_sha256"}``.
    """
    out = Path(out_npz)
    if out.suffix.lower() != ".npz":
        raise InputError(f"statistics file name must end in .npz, got {out.name}")
    files = list_images(folder, samples_find_deep=samples_find_deep)
    _need(len(files), 2, "statistics", folder)
    ctx = _Context.make(feature_extractor, weights_path, device)
    layer = ctx.default_layer("fid")
    feats = _extract(ctx, folder, [layer], batch_size=batch_size, samples_find_deep=samples_find_deep,
                     samples_resize_and_crop=samples_resize_and_crop)[layer]
    mu, sigma = feature_stats(feats)
    import torch_fidelity

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, mu=mu, sigma=sigma, n=np.int64(len(files)), feature_extractor=np.str_(ctx.name),
                 feature_layer=np.str_(layer), weights_sha256=np.str_(ctx.weights_sha256 or ""),
                 torch_fidelity=np.str_(torch_fidelity.__version__))
    os.replace(tmp, out)
    return {"path": str(out), "n": len(files), "dim": int(mu.shape[0]), "feature_extractor": ctx.name,
            "feature_layer": layer, "weights_sha256": ctx.weights_sha256}


# --------------------------------------------------------------------------------------------------------------
# Feature extractors and weights
# --------------------------------------------------------------------------------------------------------------


def register_extractor(name: str, cls: type) -> None:
    """Register a torch-fidelity feature extractor ``cls`` (a ``FeatureExtractorBase`` subclass) as ``name``, once.

    torch-fidelity raises on a duplicate name, so: a second call with the same class is a no-op; a different class
    under a taken name (including torch-fidelity's built-ins) raises ``ValueError``. ``cls`` is constructed as
    ``cls(name, features_list, **all_calculate_metrics_kwargs)`` and its ``forward`` gets uint8 ``B×3×H×W``
    tensors and returns a tuple of ``(B, D)`` tensors in ``features_list`` order (EVALUATION.md §5.3).
    """
    from torch_fidelity import FeatureExtractorBase, register_feature_extractor
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if not (isinstance(cls, type) and issubclass(cls, FeatureExtractorBase)):
        raise ValueError(f"feature extractor {name!r}: {cls!r} is not a torch_fidelity.FeatureExtractorBase subclass")
    existing = FEATURE_EXTRACTORS_REGISTRY.get(name)
    if existing is cls:
        return
    if existing is not None:
        raise ValueError(f"feature extractor {name!r} is already registered as "
                         f"{existing.__module__}.{existing.__qualname__}")
    register_feature_extractor(name, cls)


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


class _Context:
    """A resolved extractor: registry name, class, weights file, device."""

    def __init__(self, name: str, cls: type, weights: Path | None, cuda: bool, device_index: int | None) -> None:
        self.name = name
        self.cls = cls
        self.weights = weights
        self.weights_sha256 = _sha256(weights) if weights is not None else None
        self.cuda = cuda
        self.device_index = device_index

    @classmethod
    def make(cls, name: str, weights_path: str | os.PathLike[str] | None, device: Any) -> _Context:
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

        cuda, index = _parse_device(device)
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            raise ConfigError(f"unknown feature extractor {name!r}." + did_you_mean(name, FEATURE_EXTRACTORS_REGISTRY),
                              "choose one of: " + ", ".join(sorted(FEATURE_EXTRACTORS_REGISTRY)))
        weights: Path | None = None
        if name == INCEPTION_EXTRACTOR:
            weights = resolve_inception_weights(weights_path)
            check_inception_state_dict(weights)
        elif name.startswith(_HUB_ONLY_PREFIXES):
            raise ConfigError(f"feature extractor {name!r} loads its code and weights through torch.hub, "
                              "which dmdr does not do offline", f"use {INCEPTION_EXTRACTOR} or a registered one")
        elif weights_path:
            weights = Path(weights_path).expanduser()
            if not weights.is_file():
                raise ModelNotFoundError(f"feature extractor {name!r}: weights file {weights} does not exist")
        elif name.startswith(_NEEDS_PATH_PREFIXES):
            raise ModelNotFoundError(f"feature extractor {name!r} needs a local weights file (dmdr never downloads)",
                                     "pass weights_path: a torchvision VGG16 state dict or an OpenAI CLIP "
                                     "TorchScript .pt")
        return cls(name, FEATURE_EXTRACTORS_REGISTRY[name], weights, cuda, index)

    def default_layer(self, metric: str) -> str:
        return str(self.cls.get_default_feature_layer_for_metric(metric))

    def kwargs(self, *, batch_size: int, samples_find_deep: bool, samples_resize_and_crop: int) -> dict[str, Any]:
        """The torch-fidelity options dmdr always sets (module docstring, "Offline rules")."""
        kw: dict[str, Any] = {
            "feature_extractor": self.name,
            "cuda": self.cuda,
            "batch_size": int(batch_size),
            "save_cpu_ram": not self.cuda,
            "verbose": False,
            "cache": False,
            "datasets_download": False,
            "samples_find_deep": bool(samples_find_deep),
            "samples_find_ext": SAMPLE_EXTENSIONS,
            "samples_resize_and_crop": int(samples_resize_and_crop),
        }
        if self.weights is not None:
            kw["feature_extractor_weights_path"] = str(self.weights)
        return kw

    def device_scope(self) -> contextlib.AbstractContextManager[Any]:
        """torch-fidelity calls ``.cuda()`` (the current device): select ``cuda:N`` around the call."""
        if self.cuda and self.device_index is not None:
            import torch

            return torch.cuda.device(self.device_index)
        return contextlib.nullcontext()


def _parse_device(device: Any) -> tuple[bool, int | None]:
    text = str(device).strip().lower()
    if text == "cpu":
        return False, None
    if text == "cuda" or text.startswith("cuda:"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available", "use device cpu")
        index = text.partition(":")[2]
        if index and not index.isdigit():
            raise ConfigError(f"bad device {device!r}", "use cpu, cuda or cuda:N")
        return True, int(index) if index else None
    raise ConfigError(f"device {device!r} is not supported by torch-fidelity", "use cpu, cuda or cuda:N")


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------


def list_images(folder: str | os.PathLike[str], *, samples_find_deep: bool = False) -> list[str]:
    """The image files torch-fidelity will read from ``folder`` (its own ``glob_samples_paths``: extensions
    ``png,jpg,jpeg``, sorted real paths). ``InputError`` when the folder is missing, not a folder, or empty."""
    p = Path(folder).expanduser()
    if not p.exists():
        raise InputError(f"image folder {p} not found")
    if not p.is_dir():
        raise InputError(f"{p} is not a folder of images")
    from torch_fidelity.utils import glob_samples_paths

    files = glob_samples_paths(str(p.resolve()), samples_find_deep, SAMPLE_EXTENSIONS, None, verbose=False)
    if not files:
        where = " (or its subfolders)" if samples_find_deep else ""
        raise InputError(f"no images ({SAMPLE_EXTENSIONS.replace(',', '/')}) in {p}{where}")
    return files


def _need(n: int, minimum: int, what: str, where: Any) -> None:
    if n < minimum:
        raise InputError(f"{what} needs at least {minimum} images per input, {where} has {n}")


def _normalize_metrics(metrics: str | Iterable[str]) -> list[str]:
    items = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    out: list[str] = []
    for raw in items:
        key = str(raw).strip().lower()
        if not key:
            continue
        if key not in _METRICS:
            raise ConfigError(f"unknown metric {raw!r}." + did_you_mean(key, _METRICS),
                              "choose from fid, kid, isc, prc")
        if _METRICS[key] not in out:
            out.append(_METRICS[key])
    if not out:
        raise ConfigError("no metric requested", "choose from fid, kid, isc, prc")
    return out


def _explain_bad_images(files: Sequence[str]) -> str:
    """Why a folder could not be batched: the first unreadable file, or the first size that differs."""
    from PIL import Image

    first: tuple[int, int] | None = None
    for f in files:
        try:
            with Image.open(f) as im:
                size = im.size
        except Exception as exc:  # noqa: BLE001
            return f"{f} is not a readable image ({type(exc).__name__})"
        if first is None:
            first = size
        elif size != first:
            return (f"images differ in size ({first[0]}x{first[1]} vs {size[0]}x{size[1]} in {f}); "
                    "pass samples_resize_and_crop or resize them")
    return ""


@contextlib.contextmanager
def _friendly_input_errors(*file_lists: Sequence[str]):
    """Turn DataLoader collate / PIL failures into one-line ``InputError`` naming the culprit."""
    try:
        yield
    except InputError:
        raise
    except (RuntimeError, OSError) as exc:
        if isinstance(exc, RuntimeError) and not any(t in str(exc) for t in ("stack expects", "DataLoader worker")):
            raise
        for files in file_lists:
            why = _explain_bad_images(files)
            if why:
                raise InputError(why) from exc
        raise


def _extract(ctx: _Context, folder: str | os.PathLike[str], layers: Sequence[str], *, batch_size: int,
             samples_find_deep: bool, samples_resize_and_crop: int) -> dict[str, Any]:
    """Features of one folder through torch-fidelity's own pipeline (the path ``calculate_metrics`` takes):
    ``ImagesPathDataset`` (PIL → RGB → uint8 ``3×H×W``) → DataLoader → extractor. Returns ``{layer: (N, D)}``."""
    from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id

    kw = ctx.kwargs(batch_size=batch_size, samples_find_deep=samples_find_deep,
                    samples_resize_and_crop=samples_resize_and_crop)
    kw["input1"] = str(Path(folder).expanduser().resolve())
    files = list_images(folder, samples_find_deep=samples_find_deep)
    with ctx.device_scope(), _friendly_input_errors(files if not samples_resize_and_crop else []):
        fe = create_feature_extractor(ctx.name, list(dict.fromkeys(layers)), **kw)
        return extract_featuresdict_from_input_id(1, fe, **kw)


# --------------------------------------------------------------------------------------------------------------
# The metrics
# --------------------------------------------------------------------------------------------------------------


def compute_fidelity(
    input1: str | os.PathLike[str],
    input2: str | os.PathLike[str] | None,
    *,
    metrics: str | Iterable[str] = ("fid",),
    feature_extractor: str = INCEPTION_EXTRACTOR,
    weights_path: str | os.PathLike[str] | None = None,
    device: Any = "cpu",
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    isc_splits: int = 10,
    prc_neighborhood: int = 3,
    batch_size: int = 64,
    samples_find_deep: bool = False,
    samples_resize_and_crop: int = 0,
) -> dict[str, Any]:
    """FID / KID / IS / PRC of the image folder ``input1`` (generated) against ``input2`` (reference folder or
    statistics ``.npz``; ``None`` is allowed when only ``isc`` is asked). Formulas and input formats: module doc.

    ``metrics``: any of ``fid``, ``kid``, ``isc`` (alias ``is``), ``prc`` (alias ``pr``), as a sequence or a
    comma-separated string. ``feature_extractor``: a torch-fidelity registry name (default the canonical
    ``inception-v3-compat``, whose weights come from :func:`resolve_inception_weights`; custom ones via
    :func:`register_extractor`). ``weights_path``: the Inception file (``--inception-weights``), or the weights
    file handed to another extractor as ``feature_extractor_weights_path``.

    Returns the metric keys present among ``fid``, ``kid_mean``, ``kid_std``, ``isc_mean``, ``isc_std``,
    ``precision``, ``recall``, ``f_score`` plus ``feature_extractor``, ``feature_layers`` (metric -> layer),
    ``n1``, ``n2`` (``None`` for a statistics file without ``n``), ``input2_kind`` (``folder``/``stats``/``none``),
    ``kid_subset_size`` / ``isc_splits`` as used, ``torch_fidelity`` (version), and with a weights file
    ``weights_sha256`` (and for Inception ``weights_official``).

    Errors: ``InputError`` (missing/empty folder, too few images for a metric, unreadable or mixed-size images,
    bad statistics file), ``ConfigError`` (unknown metric/extractor/device), ``ModelNotFoundError`` (no weights).
    """
    wanted = _normalize_metrics(metrics)
    binary = [m for m in wanted if m != "isc"]

    files1 = list_images(input1, samples_find_deep=samples_find_deep)
    n1 = len(files1)
    files2: list[str] = []
    stats: tuple[np.ndarray, np.ndarray, dict[str, Any]] | None = None
    if input2 is None:
        if binary:
            raise InputError(f"{', '.join(binary)} need a reference: pass a folder of images or a statistics .npz")
        kind, n2 = "none", None
    else:
        p2 = Path(input2).expanduser()
        if p2.is_file() or p2.suffix.lower() == ".npz":
            if p2.suffix.lower() != ".npz":
                raise InputError(f"reference {p2} must be a folder of images or a statistics .npz")
            stats = load_stats(p2)
            unsupported = [m for m in binary if m != "fid"]
            if unsupported:
                raise InputError(f"{', '.join(unsupported)} need the reference images, not a statistics file {p2}")
            kind, n2 = "stats", stats[2].get("n")
        else:
            files2 = list_images(p2, samples_find_deep=samples_find_deep)
            kind, n2 = "folder", len(files2)

    # minimum sizes: a covariance needs 2 rows; the unbiased MMD needs m >= 2; PRC needs k+1 neighbours
    minimum = {"fid": 2, "kid": 2, "isc": 1, "prc": int(prc_neighborhood) + 1}
    for m in wanted:
        _need(n1, minimum[m], m.upper(), input1)
        if m != "isc" and kind == "folder":
            _need(len(files2), minimum[m], m.upper(), input2)

    ctx = _Context.make(feature_extractor, weights_path, device)
    layers = {m: ctx.default_layer(m) for m in wanted}
    base = ctx.kwargs(batch_size=batch_size, samples_find_deep=samples_find_deep,
                      samples_resize_and_crop=samples_resize_and_crop)
    splits = max(1, min(int(isc_splits), n1))
    result: dict[str, Any] = {}

    if stats is None:
        import torch_fidelity

        kw = dict(base)
        kw["input1"] = str(Path(input1).expanduser().resolve())
        if binary:  # torch-fidelity extracts input2 whenever it is given, even for IS alone
            kw["input2"] = str(Path(input2).expanduser().resolve())
        for m in ("fid", "kid", "isc", "prc"):
            kw[m] = m in wanted
        if "kid" in wanted:
            subset = min(int(kid_subset_size), n1, len(files2))
            if subset < 2:
                raise InputError(f"KID subset size must be at least 2, got {subset}")
            kw.update(kid_subset_size=subset, kid_subsets=int(kid_subsets))
            result["kid_subset_size"] = subset
        if "isc" in wanted:
            kw["isc_splits"] = splits
        if "prc" in wanted:
            kw["prc_neighborhood"] = int(prc_neighborhood)
        no_check = bool(samples_resize_and_crop)
        with ctx.device_scope(), _friendly_input_errors(*(() if no_check else (files1, files2))):
            raw = torch_fidelity.calculate_metrics(**kw)
        result.update({_KEYS[k]: float(v) for k, v in raw.items() if k in _KEYS})
    else:
        mu2, sigma2, meta = stats
        if "fid" in wanted:
            _check_stats_meta(meta, ctx, layers["fid"], input2)
        feats = _extract(ctx, input1, list(layers.values()), batch_size=batch_size,
                         samples_find_deep=samples_find_deep, samples_resize_and_crop=samples_resize_and_crop)
        if "fid" in wanted:
            mu1, sigma1 = feature_stats(feats[layers["fid"]])
            if mu1.shape != mu2.shape:
                raise InputError(f"statistics file {input2} has {mu2.shape[0]}-d features, "
                                 f"{ctx.name} layer {layers['fid']} gives {mu1.shape[0]}-d")
            result["fid"] = frechet_distance(mu1, sigma1, mu2, sigma2)
        if "isc" in wanted:
            from torch_fidelity.metric_isc import isc_featuresdict_to_metric

            raw = isc_featuresdict_to_metric(feats, layers["isc"], **{**base, "isc_splits": splits})
            result.update({_KEYS[k]: float(v) for k, v in raw.items() if k in _KEYS})
    if "isc" in wanted:
        result["isc_splits"] = splits

    import torch_fidelity

    result.update(feature_extractor=ctx.name, feature_layers=layers, n1=n1, n2=n2, input2_kind=kind,
                  torch_fidelity=torch_fidelity.__version__)
    if ctx.weights_sha256:
        result["weights_sha256"] = ctx.weights_sha256
        if ctx.name == INCEPTION_EXTRACTOR:
            result["weights_official"] = ctx.weights_sha256.startswith(INCEPTION_SHA256_PREFIX)
    return result


def _check_stats_meta(meta: dict[str, Any], ctx: _Context, layer: str, where: Any) -> None:
    """A statistics file made with another extractor, layer or weights file gives a meaningless FID."""
    if meta.get("feature_extractor") and meta["feature_extractor"] != ctx.name:
        raise InputError(f"statistics file {where} was made with {meta['feature_extractor']}, not {ctx.name}",
                         "recompute it with write_stats")
    if meta.get("feature_layer") and meta["feature_layer"] != layer:
        raise InputError(f"statistics file {where} holds layer {meta['feature_layer']}, not {layer}")
    if meta.get("weights_sha256") and ctx.weights_sha256 and meta["weights_sha256"] != ctx.weights_sha256:
        raise InputError(f"statistics file {where} was made with other weights "
                         f"(sha256 {meta['weights_sha256'][:12]}…, now {ctx.weights_sha256[:12]}…)",
                         "recompute it with write_stats")
