"""FID / KID / IS / PRC through torch-fidelity (dmdr_cli.evaluation.fidelity; EVALUATION.md §5, §7.5).

A tiny registered feature extractor (fixed random projection of 8×8-pooled pixels) on folders of 32×32 PNGs
checks the numbers against a direct computation; the Inception path is plumbing only, with a stand-in weights
file of random weights written by the test (numbers meaningless).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch_fidelity = pytest.importorskip("torch_fidelity")

import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torch_fidelity import FeatureExtractorBase  # noqa: E402

from dmdr_cli.errors import ConfigError, InputError, ModelNotFoundError  # noqa: E402
from dmdr_cli.evaluation import fidelity  # noqa: E402
from dmdr_cli.evaluation.fidelity import (  # noqa: E402
    INCEPTION_WEIGHTS_FILE,
    compute_fidelity,
    feature_stats,
    frechet_distance,
    load_stats,
    register_extractor,
    resolve_inception_weights,
    write_stats,
)

EXTRACTOR = "dmdr-test-proj16"
N_IMAGES = 60


class ProjExtractor(FeatureExtractorBase):
    """``feat``: 16-d fixed random projection of the 8×8 average-pooled RGB image in [0, 1]; ``logits``: a
    10-way fixed random head on ``feat`` (for IS)."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        g = torch.Generator().manual_seed(1234)
        self.register_buffer("proj", torch.randn(3 * 8 * 8, 16, generator=g) / 8.0)
        self.register_buffer("head", torch.randn(16, 10, generator=g) * 2.0)

    @staticmethod
    def get_provided_features_list():
        return ("feat", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits"}.get(metric, "feat")

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3
        pooled = F.adaptive_avg_pool2d(x.float() / 255.0, 8).flatten(1)
        feat = pooled @ self.proj
        out = {"feat": feat, "logits": feat @ self.head}
        return tuple(out[n] for n in self.features_list)


class OtherExtractor(ProjExtractor):
    pass


# ---------------------------------------------------------------------------------------------------------------
# fixtures: image folders
# ---------------------------------------------------------------------------------------------------------------


def _blobs(folder: Path, n: int, seed: int, size: int = 32) -> Path:
    """Blurred colour blobs on black: one distribution, different samples per seed."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    for i in range(n):
        img = np.zeros((size, size, 3))
        for _ in range(rng.integers(1, 3)):
            cy, cx = rng.uniform(6, size - 6, 2)
            s = rng.uniform(2.5, 5.0)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
            img += blob[..., None] * rng.uniform(0.3, 1.0, 3)
        Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)).save(folder / f"{i:04d}.png")
    return folder


def _noise(folder: Path, n: int, seed: int, size: int = 32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid-images")
    return {
        "A": _blobs(root / "A", N_IMAGES, seed=1),
        "A2": _blobs(root / "A2", N_IMAGES, seed=2),
        "B": _noise(root / "B", N_IMAGES, seed=3),
    }


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_extractor(EXTRACTOR, ProjExtractor)
    register_extractor(EXTRACTOR, ProjExtractor)  # second registration: a no-op


def _direct_features(folder: Path, layer: str = "feat") -> torch.Tensor:
    """The extractor run by hand on the same uint8 tensors torch-fidelity builds (sorted files, RGB, 3×H×W)."""
    files = sorted(os.path.realpath(p) for p in folder.glob("*.png"))
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])
    assert x.dtype == torch.uint8
    with torch.no_grad():
        return ProjExtractor(EXTRACTOR, [layer])(x)[0]


def _fid(a, b, **kw):
    return compute_fidelity(a, b, feature_extractor=EXTRACTOR, **kw)


# ---------------------------------------------------------------------------------------------------------------
# Fréchet distance (NumPy/SciPy)
# ---------------------------------------------------------------------------------------------------------------


def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + (sqrt(s1) - sqrt(s2))^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    # diagonal covariances: sum over dimensions of the 1-D formula
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([4.0, 4.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected)
    # identical Gaussians
    rng = np.random.default_rng(0)
    mu, sigma = feature_stats(rng.normal(size=(200, 8)))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_distance_singular_and_against_torch_fidelity():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(0)
    # fewer samples than dimensions: singular covariances -> finite result (eps path / real part)
    mu1, s1 = feature_stats(rng.normal(size=(5, 12)))
    mu2, s2 = feature_stats(rng.normal(size=(5, 12)) + 0.5)
    assert np.isfinite(frechet_distance(mu1, s1, mu2, s2))
    zeros = np.zeros((3, 3))
    assert frechet_distance(np.zeros(3), zeros, np.ones(3), zeros) == pytest.approx(3.0, abs=1e-4)
    # full rank: same number as torch-fidelity's eigenvalue formula
    a, b = rng.normal(size=(300, 10)), rng.normal(size=(300, 10)) * 1.5 + 0.3
    (m1, c1), (m2, c2) = feature_stats(a), feature_stats(b)
    ref = fid_statistics_to_metric({"mu": m1, "sigma": c1}, {"mu": m2, "sigma": c2}, False)
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(ref["frechet_inception_distance"], rel=1e-6)


def test_feature_stats_accepts_tensors_and_checks_shape():
    mu, sigma = feature_stats(torch.arange(12, dtype=torch.float32).reshape(4, 3))
    assert mu.dtype == np.float64 and sigma.shape == (3, 3)
    np.testing.assert_allclose(mu, [4.5, 5.5, 6.5])
    with pytest.raises(ValueError):
        feature_stats(np.zeros((1, 3)))
    with pytest.raises(ValueError):
        feature_stats(np.zeros(3))


# ---------------------------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------------------------


def test_register_extractor_guard():
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    register_extractor(EXTRACTOR, ProjExtractor)  # again: no-op
    assert FEATURE_EXTRACTORS_REGISTRY[EXTRACTOR] is ProjExtractor
    with pytest.raises(ValueError, match="already registered"):
        register_extractor(EXTRACTOR, OtherExtractor)
    with pytest.raises(ValueError, match="already registered"):
        register_extractor("inception-v3-compat", ProjExtractor)
    with pytest.raises(ValueError, match="FeatureExtractorBase"):
        register_extractor("dmdr-test-not-an-extractor", dict)
    assert "dmdr-test-not-an-extractor" not in FEATURE_EXTRACTORS_REGISTRY


# ---------------------------------------------------------------------------------------------------------------
# metrics with the custom extractor
# ---------------------------------------------------------------------------------------------------------------


def test_fid_orders_distributions(folders):
    same = _fid(folders["A"], folders["A"])
    near = _fid(folders["A"], folders["A2"])
    far = _fid(folders["A"], folders["B"])
    assert abs(same["fid"]) < 1e-3
    assert far["fid"] > 10 * near["fid"] > 0
    assert same["n1"] == same["n2"] == N_IMAGES
    assert same["feature_extractor"] == EXTRACTOR and same["feature_layers"] == {"fid": "feat"}
    assert same["input2_kind"] == "folder" and "weights_sha256" not in same


def test_fid_matches_direct_computation(folders):
    got = _fid(folders["A"], folders["B"])["fid"]
    fa, fb = _direct_features(folders["A"]), _direct_features(folders["B"])
    expected = frechet_distance(*feature_stats(fa), *feature_stats(fb))
    assert got == pytest.approx(expected, rel=1e-3)


def test_kid_isc_prc(folders):
    res = _fid(folders["A"], folders["B"], metrics=("fid", "kid", "isc", "prc"))  # kid_subset_size 1000 clamped
    assert res["kid_subset_size"] == N_IMAGES
    for key in ("fid", "kid_mean", "kid_std", "isc_mean", "isc_std", "precision", "recall", "f_score"):
        assert np.isfinite(res[key]), key
    assert res["feature_layers"] == {"fid": "feat", "kid": "feat", "isc": "logits", "prc": "feat"}
    assert res["isc_mean"] >= 1.0 and res["isc_splits"] == 10
    near = _fid(folders["A"], folders["A2"], metrics="kid,prc", kid_subset_size=20, kid_subsets=10)
    assert near["kid_subset_size"] == 20
    assert near["kid_mean"] < res["kid_mean"]
    assert near["precision"] > res["precision"] and near["recall"] > res["recall"]


def test_isc_alone_needs_no_reference(folders, tmp_path):
    res = _fid(folders["A"], None, metrics=["is"])
    assert set(res) >= {"isc_mean", "isc_std"} and res["n2"] is None and res["input2_kind"] == "none"
    # a reference given anyway is not read for IS (torch-fidelity would extract it): mixed sizes do not matter
    mixed = _blobs(tmp_path / "mixed", 2, seed=4)
    Image.new("RGB", (8, 8)).save(mixed / "9999.png")
    assert _fid(folders["A"], mixed, metrics="isc")["isc_mean"] == pytest.approx(res["isc_mean"])


def test_weights_file_of_a_custom_extractor(folders, tmp_path):
    """A custom extractor gets ``weights_path`` as ``feature_extractor_weights_path``; its sha256 is reported and
    recorded in statistics files, and a statistics file made with other weights is refused."""
    w1, w2 = tmp_path / "w1.bin", tmp_path / "w2.bin"
    w1.write_bytes(b"one")
    w2.write_bytes(b"two")
    out = tmp_path / "b.npz"
    info = write_stats(folders["B"], out, feature_extractor=EXTRACTOR, weights_path=w1)
    assert info["weights_sha256"] == fidelity._sha256(w1)
    assert load_stats(out)[2]["weights_sha256"] == info["weights_sha256"]
    res = _fid(folders["A"], out, weights_path=w1)
    assert res["weights_sha256"] == info["weights_sha256"] and "weights_official" not in res
    with pytest.raises(InputError, match="other weights"):
        _fid(folders["A"], out, weights_path=w2)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        _fid(folders["A"], out, weights_path=tmp_path / "w3.bin")


def test_stats_file_gives_same_fid(folders, tmp_path):
    out = tmp_path / "ref" / "b.npz"
    info = write_stats(folders["B"], out, feature_extractor=EXTRACTOR)
    assert info["n"] == N_IMAGES and info["dim"] == 16 and info["feature_layer"] == "feat"
    mu, sigma, meta = load_stats(out)
    assert mu.shape == (16,) and sigma.shape == (16, 16)
    assert meta == {"feature_extractor": EXTRACTOR, "feature_layer": "feat", "weights_sha256": "",
                    "torch_fidelity": torch_fidelity.__version__, "n": N_IMAGES}
    from_folder = _fid(folders["A"], folders["B"])
    from_stats = _fid(folders["A"], out, metrics=("fid", "isc"))
    assert from_stats["input2_kind"] == "stats" and from_stats["n2"] == N_IMAGES
    assert from_stats["fid"] == pytest.approx(from_folder["fid"], rel=1e-3)
    assert np.isfinite(from_stats["isc_mean"])
    # a pytorch-fid style file (mu/sigma only) works too
    plain = tmp_path / "plain.npz"
    np.savez(plain, mu=mu, sigma=sigma)
    again = _fid(folders["A"], plain)
    assert again["fid"] == pytest.approx(from_folder["fid"], rel=1e-3) and again["n2"] is None


def test_stats_file_errors(folders, tmp_path):
    out = tmp_path / "b.npz"
    write_stats(folders["B"], out, feature_extractor=EXTRACTOR)
    with pytest.raises(InputError, match="kid need the reference images"):
        _fid(folders["A"], out, metrics=("fid", "kid"))
    mu, sigma, _ = load_stats(out)
    other = tmp_path / "other.npz"
    np.savez(other, mu=mu, sigma=sigma, feature_extractor=np.str_("inception-v3-compat"))
    with pytest.raises(InputError, match="made with inception-v3-compat"):
        _fid(folders["A"], other)
    wrong_dim = tmp_path / "dim.npz"
    np.savez(wrong_dim, mu=np.zeros(4), sigma=np.eye(4))
    with pytest.raises(InputError, match="4-d features"):
        _fid(folders["A"], wrong_dim)
    bad = tmp_path / "bad.npz"
    np.savez(bad, mean=np.zeros(4))
    with pytest.raises(InputError, match="no 'mu' and 'sigma'"):
        _fid(folders["A"], bad)
    with pytest.raises(InputError, match="not found"):
        _fid(folders["A"], tmp_path / "missing.npz")
    with pytest.raises(InputError, match="must end in .npz"):
        write_stats(folders["B"], tmp_path / "b.stats", feature_extractor=EXTRACTOR)


# ---------------------------------------------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------------------------------------------


def test_input_validation(folders, tmp_path):
    with pytest.raises(InputError, match="not found") as err:
        _fid(tmp_path / "nope", folders["B"])
    assert "\n" not in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="no images"):
        _fid(folders["A"], empty)
    with pytest.raises(InputError, match="is not a folder"):
        _fid(folders["A"] / "0000.png", folders["B"])
    with pytest.raises(InputError, match="folder of images or a statistics .npz"):
        _fid(folders["A"], folders["A"] / "0000.png")
    with pytest.raises(InputError, match="need a reference"):
        _fid(folders["A"], None, metrics=("fid",))
    one = tmp_path / "one"
    _blobs(one, 1, seed=9)
    with pytest.raises(InputError, match="KID needs at least 2 images"):
        _fid(folders["A"], one, metrics=("kid",))
    with pytest.raises(InputError, match="FID needs at least 2 images"):
        _fid(one, folders["A"])
    three = tmp_path / "three"
    _blobs(three, 3, seed=9)
    with pytest.raises(InputError, match="PRC needs at least 4 images"):
        _fid(folders["A"], three, metrics=("prc",))
    with pytest.raises(ConfigError, match="unknown metric 'fdi'"):
        _fid(folders["A"], folders["B"], metrics=("fdi",))
    with pytest.raises(ConfigError, match="unknown feature extractor"):
        compute_fidelity(folders["A"], folders["B"], feature_extractor="dmdr-test-nope")
    with pytest.raises(ConfigError, match="device"):
        _fid(folders["A"], folders["B"], device="mps")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            _fid(folders["A"], folders["B"], device="cuda:0")


def test_mixed_sizes_and_unreadable_images(folders, tmp_path):
    mixed = _blobs(tmp_path / "mixed", 4, seed=5)
    Image.new("RGB", (16, 16)).save(mixed / "9999.png")
    with pytest.raises(InputError, match="differ in size"):
        _fid(folders["A"], mixed, batch_size=64)
    res = _fid(folders["A"], mixed, samples_resize_and_crop=32)
    assert np.isfinite(res["fid"]) and res["n2"] == 5
    broken = _blobs(tmp_path / "broken", 3, seed=5)
    (broken / "0001.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="not a readable image"):
        _fid(folders["A"], broken)


# ---------------------------------------------------------------------------------------------------------------
# Inception plumbing (stand-in weights, offline)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_inception(tmp_path, monkeypatch):
    """Empty DMDR_HOME and TORCH_HOME, no env override, and a downloader that fails the test if reached."""
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    monkeypatch.setenv("DMDR_HOME", str(tmp_path / "dmdr-home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("DMDR_ASSET_INCEPTION_FID", raising=False)

    def _no_download(*args, **kwargs):
        raise AssertionError(f"torch-fidelity tried to download {args}")

    monkeypatch.setattr(inc, "load_state_dict_from_url", _no_download)
    return tmp_path


@pytest.fixture(scope="module")
def standin_weights(tmp_path_factory):
    """torch-fidelity's Inception-v3 with random weights, saved under the official file name (plumbing only)."""
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inc, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(inc.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        model = inc.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / INCEPTION_WEIGHTS_FILE
    # like the official file (converted from the TF graph): a plain dict of tensors, no BN num_batches_tracked
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path)
    return path


def test_inception_without_weights_names_the_file(folders, no_inception):
    with pytest.raises(ModelNotFoundError) as err:
        compute_fidelity(folders["A"], folders["B"])
    text = str(err.value)
    assert INCEPTION_WEIGHTS_FILE in text
    assert "github.com/toshas/torch-fidelity/releases/download/v0.2.0" in text
    assert "--inception-weights" in text and "DMDR_ASSET_INCEPTION_FID" in text
    assert "\n" not in text
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        compute_fidelity(folders["A"], folders["B"], weights_path=no_inception / "missing.pth")
    # vgg16 / clip would download too: refused without a path; dinov2 always goes through torch.hub
    with pytest.raises(ModelNotFoundError, match="needs a local weights file"):
        compute_fidelity(folders["A"], folders["B"], metrics="prc", feature_extractor="vgg16")
    with pytest.raises(ConfigError, match="torch.hub"):
        compute_fidelity(folders["A"], folders["B"], feature_extractor="dinov2-vit-s-14")


def test_inception_weights_resolution_order(no_inception, standin_weights, monkeypatch):
    tmp = no_inception
    # torch-fidelity's own download location, if the file is already there
    hub = tmp / "torch-home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "pt_inception-2015-12-05-6726825d.pth").symlink_to(standin_weights)  # pytorch-fid's copy
    assert resolve_inception_weights() == hub / "pt_inception-2015-12-05-6726825d.pth"
    (hub / INCEPTION_WEIGHTS_FILE).symlink_to(standin_weights)
    assert resolve_inception_weights() == hub / INCEPTION_WEIGHTS_FILE
    # $DMDR_HOME/assets/inception-fid/ comes before it
    home = tmp / "dmdr-home" / "assets" / "inception-fid"
    home.mkdir(parents=True)
    (home / INCEPTION_WEIGHTS_FILE).symlink_to(standin_weights)
    assert resolve_inception_weights() == home / INCEPTION_WEIGHTS_FILE
    # the environment variable (file or folder) before that; one pointing at nothing is an error
    monkeypatch.setenv("DMDR_ASSET_INCEPTION_FID", str(standin_weights.parent))
    assert resolve_inception_weights() == standin_weights
    monkeypatch.setenv("DMDR_ASSET_INCEPTION_FID", str(tmp / "nothing"))
    with pytest.raises(ModelNotFoundError, match="DMDR_ASSET_INCEPTION_FID"):
        resolve_inception_weights()
    # the explicit path first of all
    assert resolve_inception_weights(standin_weights) == standin_weights


def test_inception_rejects_a_wrong_weights_file(folders, no_inception):
    from dmdr_cli.errors import CheckpointError

    wrong = no_inception / INCEPTION_WEIGHTS_FILE
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(CheckpointError, match="not torch-fidelity's Inception-v3 state dict"):
        compute_fidelity(folders["A"], folders["B"], weights_path=wrong)


@pytest.mark.slow
def test_inception_fid_with_standin_weights(tmp_path, no_inception, standin_weights):
    """10 tiny images in all (5 + 5): Inception runs at 299×299, about 0.5 s an image on 2 CPU cores."""
    gen = _blobs(tmp_path / "gen", 5, seed=11, size=24)
    ref = _noise(tmp_path / "ref", 5, seed=12, size=24)
    res = compute_fidelity(gen, ref, weights_path=standin_weights, metrics=("fid", "isc"), batch_size=5)
    assert np.isfinite(res["fid"]) and res["fid"] > 0
    assert np.isfinite(res["isc_mean"])
    assert res["feature_extractor"] == "inception-v3-compat"
    assert res["feature_layers"] == {"fid": "2048", "isc": "logits_unbiased"}
    assert res["n1"] == res["n2"] == 5 and res["isc_splits"] == 5
    assert len(res["weights_sha256"]) == 64 and res["weights_official"] is False
    assert res["weights_sha256"] == fidelity._sha256(standin_weights)
