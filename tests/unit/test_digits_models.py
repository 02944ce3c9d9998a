"""The digits world's classifier and its three uses (EVALUATION.md §7.4): the ``digits`` GenEval detector, the
``digit-cls`` reward and the ``dmdr-digits-cnn`` torch-fidelity extractor.

One classifier is trained per test session with the shortened ``short`` schedule (about 7 s) into the session's
``DMDR_HOME``; tests assert accuracy thresholds and orderings, never exact weights.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dmdr_cli.digits import register_all, world  # noqa: E402
from dmdr_cli.digits.classifier import (  # noqa: E402
    DigitCNN,
    cache_path,
    evaluate_accuracy,
    load_classifier,
)
from dmdr_cli.digits.world import CLASSES, make_metadata, render  # noqa: E402
from dmdr_cli.evaluation.geneval import DEFAULT_OPTIONS, evaluate_detections, results_row, summarize  # noqa: E402


@pytest.fixture(scope="module")
def clf():
    return load_classifier(schedule="short")


@pytest.fixture(scope="module")
def detector(clf):
    from dmdr_cli.evaluation.detectors import build_detector

    register_all()
    return build_detector("digits", path=str(clf.path))


def _tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 255.0


# --------------------------------------------------------------------------------------------------------------
# Classifier
# --------------------------------------------------------------------------------------------------------------


def test_classifier_accuracy_cache_and_interface(clf):
    assert 35_000 <= sum(p.numel() for p in DigitCNN().parameters()) <= 45_000
    assert clf.meta["heldout_accuracy"] >= 0.95 and clf.meta["schedule"] == "short"
    assert evaluate_accuracy(clf.net, "test", heights=(12,)) >= 0.94  # small glyphs, held out
    assert clf.path == cache_path(schedule="short") and clf.path.is_file()
    assert re.fullmatch(r"digits-cls-[0-9a-f]{12}\.safetensors", clf.path.name)
    assert not list(clf.path.parent.glob(".*.tmp"))  # atomic write left no temp file
    assert load_classifier(schedule="short") is clf  # memoised: trained once per process
    assert load_classifier(clf.path) is clf
    x = torch.rand(5, 1, 28, 28)
    assert clf.features(x).shape == (5, 64) and clf.logits(x).shape == (5, 10)
    assert not any(p.requires_grad for p in clf.net.parameters())
    assert cache_path(seed=1, schedule="short") != clf.path != cache_path(schedule="full")


def test_the_shipped_classifier_is_the_default_and_needs_no_training(tmp_path, monkeypatch):
    """A fresh DMDR_HOME loads the shipped weights (their recorded key matches this code), accurate on held-out glyphs."""
    from dmdr_cli.digits import classifier as C

    monkeypatch.setenv("DMDR_HOME", str(tmp_path))
    monkeypatch.setattr(C, "save_classifier", lambda *a, **k: pytest.fail("the shipped classifier was not used"))
    shipped = C.load_classifier()
    assert shipped.path == C.shipped_path() and shipped.meta["key"] == C.cache_key()
    assert shipped.meta["heldout_accuracy"] >= 0.97 and evaluate_accuracy(shipped.net, "test", heights=(14,)) >= 0.96
    assert not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------------------------------------------
# Detector
# --------------------------------------------------------------------------------------------------------------


def test_detector_boxes_and_masks_exact_on_a_synthetic_canvas(detector):
    canvas = np.zeros((40, 48, 3), np.uint8)
    canvas[5:15, 4:9] = (255, 0, 0)          # red bar: box (4, 5, 9, 15)
    canvas[20:31, 30:41] = (0, 0, 200)       # blue square ring, 1-px hole in the middle
    canvas[25, 35] = 0
    canvas[2:4, 40:42] = (60, 60, 60)        # below the 0.25 threshold: background
    canvas[36:38, 2:4] = (255, 255, 255)     # 2×2 white speck: area 4 >= min_area 3, box (2, 36, 4, 38)
    canvas[30, 10] = (255, 255, 255)         # single pixel: dropped (area < 3)
    canvas[10, 20:24] = (0, 255, 0)          # two green dashes 1 px apart: merged by the dilation
    canvas[10, 25:28] = (0, 255, 0)
    rows, color_of = detector(None, canvas)
    dets = [(name, row) for name, rs in rows.items() for row in rs]
    boxes = sorted(tuple(int(v) for v in row[:4]) for _, row in dets)
    assert boxes == [(2, 36, 4, 38), (4, 5, 9, 15), (20, 10, 28, 11), (30, 20, 41, 31)]
    value = canvas.max(axis=-1) / 255.0 > 0.25
    for name, row in dets:
        x0, y0, x1, y1 = (int(v) for v in row[:4])
        mask = row[5]
        assert mask.shape == (40, 48) and mask.dtype == bool
        expected = np.zeros_like(mask)
        expected[y0:y1, x0:x1] = value[y0:y1, x0:x1]
        assert np.array_equal(mask, expected)
        assert name in CLASSES and 0.0 < row[4] <= 1.0
    colours = {tuple(int(v) for v in row[:4]): color_of(name, row) for name, row in dets}
    assert colours == {(4, 5, 9, 15): "red", (30, 20, 41, 31): "blue", (20, 10, 28, 11): "green",
                       (2, 36, 4, 38): "white"}
    assert re.fullmatch(r"digits:cls@[0-9a-f]{8}", detector.id) and detector.color_model == "digits-hsv"
    assert detector(None, np.zeros((32, 32, 3), np.uint8))[0] == {}


def test_detector_reads_rendered_digits(detector):
    line = {"tag": "color_attr", "include": [{"class": "three", "count": 1, "color": "purple"},
                                             {"class": "seven", "count": 1, "color": "yellow"}], "prompt": "x"}
    hits = 0
    for seed in range(6):
        img, layout = render(line, seed=seed, size=48, split="test")
        rows, color_of = detector(None, img)
        for obj in layout:
            found = [(n, r) for n, rs in rows.items() for r in rs if [int(v) for v in r[:4]] == obj["box"]]
            assert len(found) == 1  # the layout's box exactly
            name, row = found[0]
            assert color_of(name, row) == obj["color"]
            hits += name == obj["class"]
    assert hits >= 11


def test_geneval_oracle_images_score_high_and_others_low(detector, tmp_path):
    from dmdr_cli.evaluation.geneval import iter_image_folder

    lines = make_metadata(96, 11, split="test")
    world.write_geneval_folder(tmp_path, lines, images_per_prompt=1, size=32, split="test")
    options = {k: DEFAULT_OPTIONS[k] for k in ("threshold", "counting_threshold", "max_objects",
                                                "position_threshold", "max_overlap")}
    own, other = [], []
    for index, meta, paths in iter_image_folder(tmp_path):
        rows, color_of = detector(paths[0], None)  # read from the PNG, as `dmdr eval` does
        ok, why = evaluate_detections(meta, rows, color_of=color_of, **options)
        own.append(results_row(paths[0], meta, ok, why, rows, detector.id, detector.color_model))
        wrong = lines[(index * 7 + 13) % len(lines)]
        if world.composition_key(wrong) != world.composition_key(meta):
            ok2, why2 = evaluate_detections(wrong, rows, color_of=color_of, **options)
            other.append(results_row(paths[0], wrong, ok2, why2, rows, detector.id, detector.color_model))
    good, bad = summarize(own), summarize(other)
    assert good["overall"] >= 0.9, good
    assert bad["overall"] <= 0.3, bad


# --------------------------------------------------------------------------------------------------------------
# Reward
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward(clf):
    from dmdr_cli.rewards.registry import build_reward

    register_all()
    return build_reward("digit-cls", path=str(clf.path))


def _single(d: int, seed: int, size: int = 32) -> torch.Tensor:
    line = {"tag": "single_object", "include": [{"class": CLASSES[d], "count": 1}], "prompt": str(d)}
    return _tensor(render(line, seed=seed, size=size, split="test", as_array=True)[0])


def test_reward_ranks_the_prompted_digit_first_and_is_differentiable(reward):
    assert reward.name.startswith("digit-cls@") and reward.differentiable
    pairs = [(d, (d + 3) % 10) for d in range(10)]
    imgs = torch.stack([_single(d, seed=d) for d, _ in pairs] + [_single(e, seed=e + 20) for _, e in pairs])
    prompts = [f"a photo of a {d}" for d, _ in pairs] * 2
    scores = reward(imgs, prompts)
    assert scores.shape == (20,) and torch.isfinite(scores).all()
    assert (scores[:10] > scores[10:]).all()
    assert (scores[:10] > -0.7).float().mean() >= 0.9  # log p of the right digit near 0

    x = imgs[10:13].clone().requires_grad_(True)  # wrong digits: the gradient is far from saturated
    reward(x, prompts[10:13]).sum().backward()
    g = x.grad
    assert g is not None and torch.isfinite(g).all()
    assert (g.flatten(1).abs().sum(dim=1) > 0).all()
    z = torch.rand(1, 3, 32, 32, requires_grad=True)
    out = reward(z, ["a cat on a mat"])  # no digit in the prompt: exactly 0, no gradient
    out.sum().backward()
    assert out.item() == 0.0 and float(z.grad.abs().sum()) == 0.0


def test_reward_multi_digit_terms(reward):
    def img(line, seed=0):
        return _tensor(render(line, seed=seed, size=32, split="test", as_array=True)[0])

    ca = world._line("color_attr", [{"class": "three", "count": 1, "color": "red"},
                                    {"class": "seven", "count": 1, "color": "blue"}])
    swapped = world._line("color_attr", [{"class": "three", "count": 1, "color": "blue"},
                                         {"class": "seven", "count": 1, "color": "red"}])
    left = world._line("position", [{"class": "eight", "count": 1},
                                    {"class": "two", "count": 1, "position": ["left of", 0]}])
    right = world._line("position", [{"class": "eight", "count": 1},
                                     {"class": "two", "count": 1, "position": ["right of", 0]}])
    two = world._line("counting", [{"class": "five", "count": 2}], [{"class": "five", "count": 3}])
    three = world._line("counting", [{"class": "five", "count": 3}], [{"class": "five", "count": 4}])
    pairs = [(ca, swapped), (left, right), (two, three)]
    for seed in range(2):
        good = torch.stack([img(a, seed) for a, _ in pairs])
        bad = torch.stack([img(b, seed) for _, b in pairs])
        prompts = [a["prompt"] for a, _ in pairs]
        sg, sb = reward(good, prompts), reward(bad, prompts)
        assert (sg > sb + 0.5).all(), (sg, sb)
    x = torch.stack([img(ca), img(left)]).requires_grad_(True)
    reward(x, [swapped["prompt"], right["prompt"]]).sum().backward()
    assert (x.grad.flatten(1).abs().sum(dim=1) > 0).all()


def test_reward_ink_term_penalises_faded_digits(reward):
    """The classifier is brightness-invariant; the ink term is what makes a faded digit score lower."""
    from dmdr_cli.digits.reward import DigitClsReward

    x = torch.stack([_single(d, seed=d) for d in range(4)])
    prompts = [f"a photo of a {d}" for d in range(4)]
    faded = x * 0.3  # peak 0.3: barely above the detector's foreground threshold
    blind = DigitClsReward(reward.classifier, ink_weight=0.0)
    bright, dim = reward(x, prompts), reward(faded, prompts)
    # the ink term alone: 4 * 0.05 * softplus((0.6 - q) / 0.05), q = mean of the 5 brightest pixels (~0.3, so ~1.2)
    q = faded.amax(dim=1).flatten(1).topk(5, dim=1).values.mean(dim=1)
    expected = 4 * 0.05 * torch.nn.functional.softplus((0.6 - q) / 0.05)
    assert (expected > 1.1).all()
    torch.testing.assert_close(blind(faded, prompts) - dim, expected, atol=1e-4, rtol=0)
    assert ((bright - dim) > 1.0).all(), (bright, dim)
    assert (bright - blind(x, prompts)).abs().max() < 0.01  # a digit drawn at full brightness pays ~nothing
    faded.requires_grad_(True)
    reward(faded, prompts).sum().backward()
    assert float((faded.grad * x).sum()) > 0  # the gradient brightens the strokes


def test_reward_separation_term_penalises_merged_glyphs(reward):
    """N digits drawn as fewer than N components score lower (constant deficit) and get a pull-apart gradient."""
    from dmdr_cli.digits.reward import DigitClsReward

    line = world._line("two_object", [{"class": "three", "count": 1}, {"class": "seven", "count": 1}])
    x = torch.stack([_tensor(render(line, seed=s, size=32, split="test", as_array=True)[0]) for s in range(4)])
    bridged = x.clone()
    bridged[:, :, 15:17, :] = 1.0  # a white bar through the middle: joins side-by-side digits into one component
    bridged[:, :, :, 15:17] = 1.0  # and a vertical one for stacked digits
    n_comp = [len(world.segment(b.permute(1, 2, 0).numpy())[1]) for b in bridged]
    merged = torch.tensor([n < 2 for n in n_comp])
    assert merged.any(), n_comp
    prompts = [line["prompt"]] * 4
    plain = DigitClsReward(reward.classifier, separation_weight=0.0)
    drop = plain(bridged, prompts) - reward(bridged, prompts)
    # merged: deficit N - #components = 1 plus the mean brightness of the (all-white) centre band = 2
    assert torch.allclose(drop[merged], torch.full_like(drop[merged], 2.0), atol=1e-5), (drop, n_comp)
    assert (drop[~merged] == 0).all()
    assert torch.allclose(plain(x, prompts), reward(x, prompts))  # separated digits: the term is off
    sub = bridged[merged].clone().requires_grad_(True)
    (reward(sub, prompts[: len(sub)]) - plain(sub, prompts[: len(sub)])).sum().backward()
    band = torch.zeros(32, 32, dtype=torch.bool)
    band[15:17, :] = True
    band[:, 15:17] = True
    assert float(sub.grad[:, :, band].sum()) < 0 and float(sub.grad[:, :, ~band].abs().sum()) == 0


# --------------------------------------------------------------------------------------------------------------
# FID extractor
# --------------------------------------------------------------------------------------------------------------


def test_fid_extractor_separates_renders_from_noise(clf, tmp_path):
    torch_fidelity = pytest.importorskip("torch_fidelity")
    from PIL import Image

    from dmdr_cli.digits.fidelity import EXTRACTOR_NAME, DigitsFeatureExtractor, register
    from dmdr_cli.evaluation.fidelity import compute_fidelity

    register()
    register()  # guarded: a second registration is a no-op
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    assert FEATURE_EXTRACTORS_REGISTRY[EXTRACTOR_NAME].__qualname__ == DigitsFeatureExtractor.__qualname__
    folders = {}
    for name, split, seed in (("train", "train", 0), ("test", "test", 1)):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        for i, (image, _, _) in enumerate(world.dataset(120, seed, split)):
            image.save(folders[name] / f"{i:04d}.png")
    folders["noise"] = tmp_path / "noise"
    folders["noise"].mkdir()
    rng = np.random.default_rng(0)
    for i in range(120):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folders["noise"] / f"{i:04d}.png")

    def fid(a, b, **kw):
        return compute_fidelity(folders[a], folders[b], feature_extractor=EXTRACTOR_NAME, weights_path=clf.path,
                                **kw)

    near = fid("train", "test", metrics="fid,kid,isc", kid_subset_size=50, kid_subsets=20)
    far = fid("train", "noise", metrics="fid,kid", kid_subset_size=50, kid_subsets=20)
    assert near["feature_layers"] == {"fid": "feat", "kid": "feat", "isc": "logits"}
    assert near["fid"] * 3 < far["fid"]
    assert near["kid_mean"] < far["kid_mean"] and near["kid_subset_size"] == 50
    assert 2.0 < near["isc_mean"] <= 10.0  # several classes, confidently
    ext = DigitsFeatureExtractor(EXTRACTOR_NAME, ["feat", "logits"], feature_extractor_weights_path=str(clf.path))
    feat, logits = ext(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    assert feat.shape == (2, 64) and logits.shape == (2, 10)
    assert torch_fidelity is not None
