"""The ``hf-m2f`` GenEval backend (EVALUATION.md §1.3, §1.4, §1.7, §1.8) on a tiny random Mask2Former and a tiny
CLIP saved with ``save_pretrained``: label mapping and its refusal, detections from masks, the −1 map, colour
classification (templates, #999 composite, CLIP eval transform). Offline."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dmdr_cli.errors import CheckpointError, InputError, ModelNotFoundError
from dmdr_cli.evaluation import hf_m2f
from dmdr_cli.evaluation.benchfiles import load_object_names, resolve_bench_file, sha256_file
from dmdr_cli.evaluation.detectors import DETECTORS, build_detector
from dmdr_cli.evaluation.geneval import COLORS
from dmdr_cli.evaluation.hf_m2f import (
    COLOR_TEMPLATES,
    HF_M2F_REPO,
    HFMask2FormerDetector,
    clip_eval_transform,
    color_crop,
    detections_from_segmentation,
    map_labels,
    mask_box,
    weights_sha256,
)
from dmdr_cli.rewards.base import CLIP_MEAN, CLIP_STD, text_features

#: HF-style spellings put into the tiny model's id2label at the index of the GenEval name.
HF_SPELLINGS = {"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard",
                "couch": "sofa", "potted plant": "pottedplant", "airplane": "aeroplane"}
GREY = 0x99 / 255


@pytest.fixture(scope="module")
def names() -> list[str]:
    try:
        return load_object_names(resolve_bench_file("geneval", "object_names.txt"))
    except InputError as err:
        pytest.skip(f"GenEval object_names.txt not available (../shared/benchmarks/geneval): {err}")


@pytest.fixture(scope="module")
def hf_id2label(names) -> dict[int, str]:
    return {i: HF_SPELLINGS.get(n, n) for i, n in enumerate(names)}


def _save_m2f(folder: Path, id2label: dict[int, str]) -> Path:
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor, SwinConfig

    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=2, image_size=64,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=backbone, hidden_dim=32, mask_feature_size=32, feature_size=32,
                            encoder_feedforward_dim=16, dim_feedforward=32, num_queries=10, num_labels=len(id2label),
                            decoder_layers=2, encoder_layers=1, num_attention_heads=2, id2label=id2label,
                            label2id={v: k for k, v in id2label.items()})
    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(cfg).eval().save_pretrained(folder)
    Mask2FormerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def m2f_dir(tmp_path_factory, hf_id2label) -> Path:
    """A tiny random COCO-instance Mask2Former (Swin backbone, 10 queries, 80 labels with HF spellings)."""
    return _save_m2f(tmp_path_factory.mktemp("tiny-m2f"), hf_id2label)


@pytest.fixture(scope="module")
def clip_dir(tiny_clip_dir) -> Path:
    return tiny_clip_dir


@pytest.fixture(scope="module")
def detector(m2f_dir, clip_dir, names):
    return build_detector("hf-m2f", path=str(m2f_dir), clip_path=str(clip_dir))


def _image(w: int = 64, h: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------- loading


def test_registers_itself_and_records_ids(detector, m2f_dir, clip_dir) -> None:
    assert DETECTORS["hf-m2f"].__module__ == hf_m2f.__name__
    assert isinstance(detector, HFMask2FormerDetector)
    assert detector.id == f"hf-m2f:{m2f_dir.name}@{sha256_file(m2f_dir / 'model.safetensors')[:12]}"
    assert detector.color_model == f"clip:{clip_dir.name}@{sha256_file(clip_dir / 'model.safetensors')[:12]}"
    assert re.fullmatch(r"hf-m2f:[^@]+@[0-9a-f]{12}", detector.id)


def test_loading_maps_hf_aliases_to_geneval_names(detector, names) -> None:
    assert detector.labels == names
    for gen, hf in HF_SPELLINGS.items():
        assert detector.model.config.id2label[names.index(gen)] == hf  # the checkpoint really says "mouse" ...
        assert detector.labels[names.index(gen)] == gen                # ... and detections say "computer mouse"


def test_map_labels_accepts_every_documented_alias_and_normalised_spelling(names) -> None:
    id2label = {i: n for i, n in enumerate(names)}
    for alias, gen in hf_m2f.LABEL_ALIASES.items():
        id2label[names.index(gen)] = alias
    id2label[names.index("traffic light")] = "Traffic_Light"
    id2label[names.index("hair drier")] = "hair-dryer"
    assert map_labels({str(k): v for k, v in id2label.items()}, names) == names  # str keys as in config.json


@pytest.mark.parametrize("change, needle", [
    ({"bus": "double-decker"}, "'double-decker' (GenEval: 'bus')"),
    ({"computer keyboard": "mouse"}, "'mouse' (GenEval: 'computer keyboard')"),  # an alias at the wrong index
    ({"tv": "television"}, "'television' (GenEval: 'tv')"),
])
def test_map_labels_refuses_unknown_names(names, change, needle) -> None:
    id2label = {i: change.get(n, n) for i, n in enumerate(names)}
    with pytest.raises(CheckpointError) as err:
        map_labels(id2label, names, source="x")
    assert needle in str(err.value) and HF_M2F_REPO in str(err.value)


def test_map_labels_refuses_other_label_sets(names) -> None:
    with pytest.raises(CheckpointError, match="81 labels"):
        map_labels({i: f"c{i}" for i in range(81)}, names)
    with pytest.raises(CheckpointError, match="LABEL_0"):
        map_labels({i: f"LABEL_{i}" for i in range(80)}, names)


def test_checkpoint_with_unknown_label_is_refused_at_load(m2f_dir, clip_dir, names, tmp_path) -> None:
    bad = Path(shutil.copytree(m2f_dir, tmp_path / "bad-m2f"))
    cfg = json.loads((bad / "config.json").read_text())
    i = names.index("giraffe")
    cfg["id2label"][str(i)] = "camelopard"
    cfg["label2id"] = {v: int(k) for k, v in cfg["id2label"].items()}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"camelopard.*giraffe"):
        HFMask2FormerDetector(bad, clip_dir, object_names=names)


def test_missing_detector_weights_name_the_checkpoint_and_flag(clip_dir, names, tmp_path, monkeypatch) -> None:
    with pytest.raises(ModelNotFoundError) as err:
        HFMask2FormerDetector(tmp_path / "nope", clip_dir, object_names=names)
    assert HF_M2F_REPO in str(err.value) and "--detector-path" in str(err.value)

    monkeypatch.delenv(hf_m2f.M2F_ASSET.env_var, raising=False)
    monkeypatch.setenv("DMDR_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("dmdr_cli.rewards.assets._from_hf_cache", lambda asset: None)
    with pytest.raises(ModelNotFoundError) as err:
        HFMask2FormerDetector("", clip_dir, object_names=names)
    assert HF_M2F_REPO in str(err.value) and "--detector-path" in str(err.value)


def test_missing_clip_names_the_checkpoint_and_flag(m2f_dir, names, tmp_path) -> None:
    with pytest.raises(ModelNotFoundError) as err:
        HFMask2FormerDetector(m2f_dir, tmp_path / "no-clip", object_names=names)
    assert "openai/clip-vit-large-patch14" in str(err.value) and "--clip-path" in str(err.value)


def test_legacy_shortest_edge_only_preprocessor_config_still_runs(m2f_dir, clip_dir, names, tmp_path) -> None:
    legacy = Path(shutil.copytree(m2f_dir, tmp_path / "legacy"))
    pp = json.loads((legacy / "preprocessor_config.json").read_text())
    pp.update({"size": 96, "size_divisor": 32, "ignore_index": 255, "reduce_labels": False, "num_labels": 80})
    (legacy / "preprocessor_config.json").write_text(json.dumps(pp))
    det = HFMask2FormerDetector(legacy, clip_dir, object_names=names)
    assert det.processor(images=_image(64, 48), return_tensors="pt")["pixel_values"].shape[-2:] == (96, 128)
    assert all(d.mask.shape == (48, 64) for d in det.detect(_image(64, 48)))


# ---------------------------------------------------------------------------------------------- detection


def _check_rows(rows, names, w, h) -> None:
    for cls, dets in rows.items():
        assert cls in names
        for x0, y0, x1, y1, score, mask in dets:
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert 0.0 <= score <= 1.0
            assert mask.dtype == bool and mask.shape == (h, w) and mask.any()
            assert (x0, y0, x1, y1) == mask_box(mask)


def test_detector_returns_geneval_rows_with_masks(detector, names) -> None:
    rows, color_of = detector(Path("x.png"), _image())
    assert rows, "the tiny random model yields some non-empty masks at threshold 0"
    _check_rows(rows, names, 64, 64)
    cls, dets = next(iter(rows.items()))
    assert color_of(cls, dets[0]) in COLORS

    rows, _ = detector(Path("y.png"), _image(48, 40, seed=1))  # non-square: masks at the image size
    _check_rows(rows, names, 48, 40)


def test_mask_box_is_exclusive() -> None:
    mask = np.zeros((20, 30), dtype=bool)
    mask[3:7, 5:12] = True
    mask[9, 2] = True
    assert mask_box(mask) == (2.0, 3.0, 12.0, 10.0)
    assert mask_box(np.zeros((4, 4), dtype=bool)) is None


def test_known_post_processing_output_gives_exact_boxes(detector, names, monkeypatch) -> None:
    a = torch.zeros(64, 64)
    a[10:20, 5:25] = 1
    b = torch.zeros(64, 64)                       # empty: dropped
    c = torch.zeros(64, 64)
    c[0, 63] = 1                                  # a single pixel in the corner
    infos = [{"id": 0, "label_id": names.index("computer mouse"), "score": 0.75, "was_fused": False},
             {"id": 1, "label_id": names.index("dog"), "score": 0.5, "was_fused": False},
             {"id": 2, "label_id": names.index("dog"), "score": 0.25, "was_fused": False}]
    seen = {}

    def fake(outputs, **kwargs):
        seen.update(kwargs)
        return [{"segmentation": torch.stack([a, b, c]), "segments_info": infos}]

    monkeypatch.setattr(detector.processor, "post_process_instance_segmentation", fake)
    rows, _ = detector(Path("x.png"), _image())
    assert seen == {"threshold": 0.0, "target_sizes": [(64, 64)], "return_binary_maps": True}
    assert set(rows) == {"computer mouse", "dog"}
    (mouse,) = rows["computer mouse"]
    assert mouse[:5] == (5.0, 10.0, 25.0, 20.0, 0.75)
    assert np.array_equal(mouse[5], a.numpy() > 0)
    (dog,) = rows["dog"]
    assert dog[:5] == (63.0, 0.0, 64.0, 1.0, 0.25)

    monkeypatch.setattr(detector.processor, "post_process_instance_segmentation",
                        lambda outputs, **kw: [{"segmentation": torch.full((64, 64), -1.0), "segments_info": []}])
    assert detector(Path("x.png"), _image())[0] == {}


class _FakeM2F:
    """Stands in for the model: fixed class and mask logits, whatever the input."""

    dtype = torch.float32

    def __init__(self, class_logits: torch.Tensor, mask_logits: torch.Tensor) -> None:
        self.out = SimpleNamespace(class_queries_logits=class_logits[None], masks_queries_logits=mask_logits[None])

    def __call__(self, pixel_values, pixel_mask=None):
        return self.out


def test_real_post_processing_score_box_and_minus_one_map(detector, names, monkeypatch) -> None:
    k = names.index("computer mouse")
    cls = torch.zeros(2, 81)
    cls[0, k] = 20.0                               # query 0: surely "mouse"; query 1: uniform
    masks = torch.full((2, 384, 384), -10.0)       # at the post-processing's 384² working size: no resampling
    masks[0, 60:120, 30:150] = 10.0                # nearest 384 → 64 keeps rows 10..19, cols 5..24
    monkeypatch.setattr(detector, "model", _FakeM2F(cls, masks))
    rows, _ = detector(Path("x.png"), _image())
    assert list(rows) == ["computer mouse"]        # query 1's mask is empty: dropped
    (x0, y0, x1, y1, score, mask), = rows["computer mouse"]
    assert (x0, y0, x1, y1) == (5.0, 10.0, 25.0, 20.0) and mask.sum() == 10 * 20
    p = torch.softmax(cls[0], dim=-1)[k]
    assert score == pytest.approx(float(p * torch.sigmoid(torch.tensor(10.0))), abs=1e-6)  # §1.3 score formula

    monkeypatch.setattr(detector, "model", _FakeM2F(cls, torch.full((2, 384, 384), -10.0)))
    rows, _ = detector(Path("x.png"), _image())    # nothing survives: HF returns the (H, W) −1 map
    assert rows == {}


def test_detections_from_segmentation_handles_the_minus_one_map(names) -> None:
    assert detections_from_segmentation({"segmentation": torch.full((8, 9), -1.0), "segments_info": []},
                                        names, (8, 9)) == []
    assert detections_from_segmentation({"segmentation": None, "segments_info": []}, names, (8, 9)) == []


# ---------------------------------------------------------------------------------------------- colour


def test_color_classifier_is_the_normalised_template_mean(detector) -> None:
    W = detector.color_classifier("dog")
    assert W.shape == (16, len(COLORS))
    torch.testing.assert_close(W.norm(dim=0), torch.ones(len(COLORS)))
    assert detector.color_classifier("dog") is W   # cached per class
    texts = [t.format(c="purple", cls="dog") for t in COLOR_TEMPLATES]
    assert texts == ["a photo of a purple dog", "a photo of a purple-colored dog", "a photo of a purple object"]
    tok = detector.tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        f = torch.nn.functional.normalize(text_features(detector.clip, tok["input_ids"], tok["attention_mask"]), dim=-1)
    expected = f.mean(0) / f.mean(0).norm()
    torch.testing.assert_close(W[:, COLORS.index("purple")], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("colour", ["red", "blue"])
def test_color_of_takes_the_argmax_column(detector, monkeypatch, colour) -> None:
    W = detector.color_classifier("car")
    seen = []

    def fake_image_features(pixel_values):
        seen.append(pixel_values.shape)
        return 3.0 * W[:, COLORS.index(colour)][None]

    monkeypatch.setattr(detector.clip, "get_image_features", fake_image_features)
    image = _image()
    mask = np.zeros((64, 64), dtype=bool)
    mask[8:40, 16:48] = True
    assert detector.color_of(image, "car", (16.0, 8.0, 48.0, 40.0, 0.9, mask)) == colour
    assert seen == [(1, 3, 32, 32)]                # the CLIP config's image size


def test_color_input_composites_over_999_with_the_mask(detector) -> None:
    red = Image.new("RGB", (64, 64), (255, 0, 0))
    mask = np.zeros((64, 64), dtype=bool)
    mask[24:40, 24:40] = True
    det = (0.0, 0.0, 64.0, 64.0, 0.9, mask)        # box larger than the mask: the outside is background
    x = detector.color_input(red, det, normalize=False)
    assert x.shape == (3, 32, 32)
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[8:24, 8:24] = False                    # the mask at 32²: rows/cols 12..19, plus a bicubic margin
    assert torch.allclose(x[:, outside], torch.full_like(x[:, outside], GREY), atol=1e-6)
    torch.testing.assert_close(x[:, 14:18, 14:18], torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 4, 4))
    normed = detector.color_input(red, det)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    torch.testing.assert_close(normed, (x - mean) / std)

    x = detector.color_input(red, det[:5], normalize=False)  # no mask: the plain box crop
    torch.testing.assert_close(x, torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 32, 32))


def test_color_crop_rounds_the_box_to_whole_pixels() -> None:
    img = _image()
    crop = color_crop(img, (10.4, 10.6, 30.5, 31.5, 0.5))
    assert crop.size == (20, 21)                   # round(): 10, 11, 30, 32 (as PIL's crop)
    assert np.array_equal(np.asarray(crop), np.asarray(img)[11:32, 10:30])


def test_clip_eval_transform_is_short_side_resize_plus_centre_crop() -> None:
    strip = np.zeros((16, 64, 3), dtype=np.uint8)
    strip[:, :8] = (0, 255, 0)                     # green at the far left, red elsewhere
    strip[:, 8:] = (255, 0, 0)
    x = clip_eval_transform(Image.fromarray(strip), 32, normalize=False)
    assert x.shape == (3, 32, 32)
    assert x[1].max() < 0.01                       # centre crop: the green edge is cut off, not squashed in

    T = pytest.importorskip("torchvision.transforms")
    reference = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32),
                           T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    for w, h in [(50, 23), (23, 50), (32, 32), (97, 64)]:
        img = _image(w, h, seed=w)
        torch.testing.assert_close(clip_eval_transform(img, 32), reference(img), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- ids


def test_weights_sha256_reads_hf_blob_names_and_display_names(tmp_path) -> None:
    digest = "ab" * 32
    snap = tmp_path / "models--facebook--mask2former-swin-small-coco-instance" / "snapshots" / "rev"
    blobs = tmp_path / "models--facebook--mask2former-swin-small-coco-instance" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    (blobs / digest).write_bytes(b"weights")
    (snap / "model.safetensors").symlink_to(blobs / digest)
    assert weights_sha256(snap) == digest          # named by its sha256: not re-hashed
    assert hf_m2f._display_name(snap) == HF_M2F_REPO
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "pytorch_model.bin").write_bytes(b"weights")
    assert weights_sha256(plain) == sha256_file(plain / "pytorch_model.bin")
    assert hf_m2f._display_name(plain) == "plain"
