"""Unit tests for dmdr_cli.rewards (EVALUATION.md §4, §7.1, §7.2, §7.5).

Real loaders run on tiny random checkpoints of the same classes, written here: a transformers ``CLIPModel`` with an
in-memory byte-level ``CLIPTokenizer`` (``save_pretrained``), an open_clip model from a tiny registered config saved
in the HPS format ``{"state_dict": …}``, and an aesthetic MLP with the official key layout. Numbers are
meaningless; shapes, gradients to the pixels, determinism, strict loading and offline resolution are checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dmdr_cli.errors import CheckpointError, ConfigError, ModelNotFoundError
from dmdr_cli.rewards.assets import ASSETS, find_asset, resolve_asset, weights_fingerprint
from dmdr_cli.rewards.base import (
    CLIP_MEAN,
    CLIP_STD,
    Reward,
    as_feature_tensor,
    clip_preprocess,
    image_text_features,
)
from dmdr_cli.rewards.offline import COLORS, parse_color
from dmdr_cli.rewards.registry import REWARDS, build_reward, reward_names

TINY_ARCH = "dmdr-test-tiny-vit"
PROMPTS = ["a red circle", "a photo of a cat"]


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(autouse=True)
def _isolated_assets(tmp_path, monkeypatch):
    """No asset is found by accident: empty DMDR_HOME and HF cache, no DMDR_ASSET_* variables."""
    import huggingface_hub.constants as hf_constants

    home = tmp_path / "dmdr-home"
    home.mkdir()
    monkeypatch.setenv("DMDR_HOME", str(home))
    for asset in ASSETS.values():
        monkeypatch.delenv(asset.env_var, raising=False)
    (tmp_path / "hf-cache").mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))




@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory) -> tuple[nn.Module, Path]:
    """A tiny open_clip model (registered config) and its weights saved as HPS does: ``{"state_dict": …}``."""
    open_clip = pytest.importorskip("open_clip")
    folder = tmp_path_factory.mktemp("tiny-open-clip")
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (folder / f"{TINY_ARCH}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{TINY_ARCH}.json")
    torch.manual_seed(1)
    model = open_clip.create_model(TINY_ARCH, pretrained=None).eval()
    torch.save({"state_dict": model.state_dict()}, folder / "HPS_v2.1_compressed.pt")
    return model, folder / "HPS_v2.1_compressed.pt"


@pytest.fixture(scope="module")
def aesthetic_pth(tmp_path_factory) -> Path:
    """A random aesthetic head with the official layout (Linear at 0, 2, 4, 6, 7) over a 16-d projection."""
    torch.manual_seed(2)
    seq = nn.Sequential(nn.Linear(16, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    state = {f"layers.{k}": v for k, v in seq.state_dict().items()}
    assert sorted(state) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    path = tmp_path_factory.mktemp("aesthetic") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(state, path)
    return path


def _images(seed: int = 0, b: int = 2, size: int = 48) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _check_reward(reward: Reward, prompts: list[str] = PROMPTS) -> torch.Tensor:
    """Shape [B], finite, deterministic, and gradients reach the pixels (non-zero)."""
    assert isinstance(reward, Reward) and reward.differentiable
    images = _images().requires_grad_()
    scores = reward(images, prompts)
    assert scores.shape == (len(prompts),) and torch.isfinite(scores).all()
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    again = reward(images, prompts)
    torch.testing.assert_close(again.detach(), scores.detach(), rtol=0, atol=0)  # deterministic
    with torch.no_grad():  # evaluation mode (fused attention kernels may differ in the last bits)
        torch.testing.assert_close(reward(images.detach(), prompts), scores.detach(), rtol=1e-5, atol=1e-6)
    return scores.detach()


# ------------------------------------------------------------------------------------------------ base


def test_clip_preprocess_resizes_normalises_and_is_differentiable() -> None:
    x = _images(size=224)
    out = clip_preprocess(x)  # already 224: no resize, only normalisation
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (x - mean) / std)

    y = torch.rand(2, 3, 64, 96).requires_grad_()
    out = clip_preprocess(y, size=32)  # squash, no crop
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    out.sum().backward()
    assert y.grad.abs().sum() > 0
    flat = clip_preprocess(torch.full((1, 3, 64, 64), 0.5), size=32)  # a flat image stays flat
    torch.testing.assert_close(flat, ((0.5 - mean) / std).expand(1, 3, 32, 32))


def test_feature_helpers_return_tensors_for_tensor_and_output_objects() -> None:
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    feats = torch.randn(2, 4)

    class Transformers4:
        def get_image_features(self, pixel_values):
            return feats

        def get_text_features(self, input_ids, attention_mask=None):
            return feats + 1

    class Transformers5:
        def get_image_features(self, pixel_values):
            return BaseModelOutputWithPooling(last_hidden_state=torch.zeros(2, 3, 8), pooler_output=feats)

        def get_text_features(self, input_ids, attention_mask=None):
            return BaseModelOutputWithPooling(last_hidden_state=torch.zeros(2, 3, 8), pooler_output=feats + 1)

    for model in (Transformers4(), Transformers5()):
        f_img, f_txt = image_text_features(model, torch.zeros(2, 3, 8, 8), torch.zeros(2, 5, dtype=torch.long))
        assert torch.equal(f_img, feats) and torch.equal(f_txt, feats + 1)
    with pytest.raises(TypeError):
        as_feature_tensor(object())


# --------------------------------------------------------------------------------------- real scorer loaders


def test_clip_reward_from_local_folder(tiny_clip_dir) -> None:
    reward = build_reward("clip", path=str(tiny_clip_dir))
    assert reward.name == f"clip@{weights_fingerprint(tiny_clip_dir)}"
    scores = _check_reward(reward)
    assert (scores.abs() <= 1 + 1e-6).all()  # a cosine, not ×100


def test_pickscore_is_logit_scale_times_cosine(tiny_clip_dir) -> None:
    clip = build_reward("clip", path=str(tiny_clip_dir))
    pick = build_reward("pickscore", path=str(tiny_clip_dir))
    assert pick.name.startswith("pickscore@")
    scores = _check_reward(pick)
    with torch.no_grad():
        expected = clip.model.logit_scale.exp() * clip(_images(), PROMPTS)
    torch.testing.assert_close(scores, expected)


def test_hps_loads_the_state_dict_strictly_and_scores_cosine(tiny_open_clip) -> None:
    model, weights = tiny_open_clip
    reward = build_reward("hps-v2.1", path=str(weights), arch=TINY_ARCH)
    assert reward.name == f"hps-v2.1@{weights_fingerprint(weights)}"
    scores = _check_reward(reward)

    import open_clip

    with torch.no_grad():  # the same numbers from the in-memory model: the file's weights were loaded
        f_img = model.encode_image(clip_preprocess(_images(), 32), normalize=True)
        f_txt = model.encode_text(open_clip.get_tokenizer(TINY_ARCH)(PROMPTS), normalize=True)
    torch.testing.assert_close(scores, (f_img * f_txt).sum(-1), rtol=1e-5, atol=1e-6)


def test_hps_rejects_a_checkpoint_that_does_not_fit(tiny_open_clip, tmp_path) -> None:
    model, _ = tiny_open_clip
    state = dict(model.state_dict())
    state.pop("logit_scale")
    bad = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": state}, bad)
    with pytest.raises(CheckpointError, match="logit_scale"):
        build_reward("hps-v2", path=str(bad), arch=TINY_ARCH)


def test_dfn5b_is_gelu_by_default_and_quickgelu_on_request(tiny_open_clip) -> None:
    from open_clip.transformer import QuickGELU

    _, weights = tiny_open_clip
    gelu = build_reward("dfn5b-clip", path=str(weights), arch=TINY_ARCH)
    quick = build_reward("dfn5b-clip", path=str(weights), arch=TINY_ARCH, quickgelu=True)
    alias = build_reward("dfn5b-clip-quickgelu", path=str(weights), arch=TINY_ARCH)
    assert gelu.name.startswith("dfn5b-clip@") and quick.name.startswith("dfn5b-clip-quickgelu@")
    assert alias.name == quick.name
    acts = {type(m) for m in quick.model.modules()}
    assert QuickGELU in acts and QuickGELU not in {type(m) for m in gelu.model.modules()}
    s_gelu, s_quick = _check_reward(gelu), _check_reward(quick)
    assert not torch.allclose(s_gelu, s_quick)


def test_aesthetic_head_over_a_full_clip_snapshot(tiny_clip_dir, aesthetic_pth, monkeypatch) -> None:
    reward = build_reward("aesthetic-v2", path=str(aesthetic_pth), clip_path=str(tiny_clip_dir))
    assert reward.name.startswith("aesthetic-v2@")
    scores = _check_reward(reward)
    state = torch.load(aesthetic_pth, weights_only=True)
    clip = build_reward("clip", path=str(tiny_clip_dir))
    with torch.no_grad():  # the hand computation: MLP(normalised projected image embedding), no activations
        emb = clip.model.get_image_features(pixel_values=clip_preprocess(_images(), 32)).pooler_output
        h = emb / emb.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):
            h = h @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    torch.testing.assert_close(scores, h.squeeze(-1), rtol=1e-5, atol=1e-6)

    monkeypatch.setenv("DMDR_ASSET_CLIP_VIT_L_14", str(tiny_clip_dir))  # the ViT-L/14 from the environment
    torch.testing.assert_close(build_reward("aesthetic-v2", path=str(aesthetic_pth))(_images(), PROMPTS), scores)


def test_aesthetic_without_its_clip_tower_names_it(aesthetic_pth) -> None:
    with pytest.raises(ModelNotFoundError, match=r"aesthetic-v2.*openai/clip-vit-large-patch14.*DMDR_ASSET_CLIP_VIT_L_14"):
        build_reward("aesthetic-v2", path=str(aesthetic_pth))


def test_aesthetic_rejects_a_head_of_the_wrong_size(tiny_clip_dir, tmp_path) -> None:
    bad = tmp_path / "head.pth"
    torch.save({"layers.0.weight": torch.zeros(1024, 768)}, bad)
    with pytest.raises(CheckpointError, match="aesthetic"):
        build_reward("aesthetic-v2", path=str(bad), clip_path=str(tiny_clip_dir))


def test_clip_tokenizer_rebuilt_from_open_clip_bpe() -> None:
    open_clip = pytest.importorskip("open_clip")
    from dmdr_cli.rewards.clip_models import clip_bpe_tokenizer

    tok = clip_bpe_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    reference = open_clip.get_tokenizer("ViT-H-14")
    for prompt in ["A red cube, and a BLUE sphere!", "naïve café — 3 dogs' toys", "two zebras;  eating grass."]:
        ids = reference([prompt])[0].tolist()
        assert tok(prompt)["input_ids"] == ids[: ids.index(49407) + 1], prompt


# ------------------------------------------------------------------------------------------------ resolution


@pytest.mark.parametrize(
    ("name", "upstream", "env"),
    [
        ("clip", "openai/clip-vit-large-patch14", "DMDR_ASSET_CLIP_VIT_L_14"),
        ("pickscore", "yuvalkirstain/PickScore_v1", "DMDR_ASSET_PICKSCORE"),
        ("hps-v2", "HPS_v2_compressed.pt", "DMDR_ASSET_HPS_V2"),
        ("hps-v2.1", "xswu/HPSv2", "DMDR_ASSET_HPS_V2_1"),
        ("dfn5b-clip", "apple/DFN5B-CLIP-ViT-H-14", "DMDR_ASSET_DFN5B_H14"),
        ("aesthetic-v2", "sac+logos+ava1-l14-linearMSE.pth", "DMDR_ASSET_AESTHETIC_V2"),
    ],
)
def test_missing_weights_name_upstream_and_the_option(name, upstream, env) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        build_reward(name)
    text = str(info.value)
    assert upstream in text and env in text and f"name: {name}, path:" in text and "never downloads" in text


def test_explicit_path_that_does_not_exist(tmp_path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"does not exist.*xswu/HPSv2"):
        build_reward("hps-v2.1", path=str(tmp_path / "nope.pt"))
    with pytest.raises(ModelNotFoundError, match=r"holds no .*openai/clip-vit-large-patch14"):
        build_reward("clip", path=str(tmp_path))  # a folder without a snapshot


def test_resolution_order_path_env_home_hf_cache(tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants as hf_constants

    asset = ASSETS["hps-v2.1"]
    assert find_asset(asset) is None
    repo = Path(hf_constants.HF_HUB_CACHE) / "models--xswu--HPSv2"  # a pre-populated HF cache entry
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "HPS_v2.1_compressed.pt").write_bytes(b"cached")
    assert find_asset(asset).read_bytes() == b"cached"

    asset.home_dir.mkdir(parents=True)
    (asset.home_dir / "HPS_v2.1_compressed.pt").write_bytes(b"home")
    assert find_asset(asset).read_bytes() == b"home"

    (tmp_path / "env.pt").write_bytes(b"env")
    monkeypatch.setenv("DMDR_ASSET_HPS_V2_1", str(tmp_path / "env.pt"))
    assert find_asset(asset).read_bytes() == b"env"

    (tmp_path / "explicit").mkdir()
    (tmp_path / "explicit" / "HPS_v2.1_compressed.pt").write_bytes(b"explicit")
    assert resolve_asset(asset, tmp_path / "explicit").read_bytes() == b"explicit"  # a folder holding the file


def test_weights_fingerprint_follows_content(tmp_path) -> None:
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"x" * 3_000_000)
    b.write_bytes(b"x" * 2_999_999 + b"y")
    assert weights_fingerprint(a) == weights_fingerprint(a) != weights_fingerprint(b)
    assert len(weights_fingerprint(a)) == 8


# -------------------------------------------------------------------------------------------------- registry


def test_unknown_reward_and_option_suggest_the_closest() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'hps-v2.1'"):
        build_reward("hps-v21")
    with pytest.raises(ConfigError, match="Did you mean 'quickgelu'"):
        build_reward("dfn5b-clip", quickgelu_=True)
    with pytest.raises(ConfigError, match="no weights"):
        build_reward("color", path="/x")
    expected = {"clip", "pickscore", "hps-v2", "hps-v2.1", "dfn5b-clip", "aesthetic-v2", "imagereward", "color",
                "brightness"}
    assert expected <= set(reward_names()) == set(REWARDS)


def test_imagereward_without_its_package_says_what_to_install() -> None:
    if __import__("importlib").util.find_spec("ImageReward") is not None:
        pytest.skip("ImageReward is installed")
    with pytest.raises(ConfigError, match=r"imagereward.*extra"):
        build_reward("imagereward")


def test_registry_import_does_not_load_open_clip_or_transformers() -> None:
    """Only lazy (function-level) imports of the heavy libraries in the modules ``registry`` pulls in."""
    import ast
    import importlib

    modules = ["dmdr_cli.rewards", "dmdr_cli.rewards.registry", "dmdr_cli.rewards.base", "dmdr_cli.rewards.assets",
               "dmdr_cli.rewards.offline", "dmdr_cli.rewards.clip_models", "dmdr_cli.families.tiny",
               "dmdr_cli.losses.refl", "dmdr_cli.errors"]
    for module in modules:
        tree = ast.parse(Path(importlib.import_module(module).__file__).read_text())
        for node in tree.body:  # module level only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[0] in ("open_clip", "transformers", "ImageReward")], module


# --------------------------------------------------------------------------------------------- offline rewards


def _disc(colour: tuple[float, float, float], size: int = 64) -> torch.Tensor:
    """A coloured disc (radius 12) on a black canvas, softly anti-aliased."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    r = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2).sqrt()
    mask = (12.5 - r).clamp(0, 1)
    return mask * torch.tensor(colour).view(3, 1, 1)


def test_parse_color() -> None:
    assert parse_color("A Red circle and a blue square") == "red"
    assert parse_color("a reddish circle") is None and parse_color("a photo of a cat") is None


def test_color_reward_ranks_the_named_colour_first() -> None:
    reward = build_reward("color")
    images = torch.stack([_disc(COLORS["red"]), _disc(COLORS["blue"])]).requires_grad_()
    scores = reward(images, ["a red circle", "a red circle"])
    assert scores[0] > scores[1] and scores[0] > -1e-3 and scores.shape == (2,)
    scores.sum().backward()
    assert images.grad.abs().sum() > 0

    images.grad = None
    plain = reward(images, ["a circle", "a circle"])
    assert torch.equal(plain, torch.zeros(2))
    plain.sum().backward()
    assert images.grad.abs().sum() == 0  # no colour word: no gradient effect

    blue_first = reward(images.detach(), ["a blue circle", "a blue circle"])
    assert blue_first[1] > blue_first[0]
    flat = reward(torch.full((1, 3, 16, 16), 0.3, requires_grad=True), ["a white cube"])
    assert torch.isfinite(flat).all()


def test_brightness_is_the_mean_pixel() -> None:
    images = _images().requires_grad_()
    scores = build_reward("brightness")(images, PROMPTS)
    torch.testing.assert_close(scores, images.detach().mean(dim=(1, 2, 3)))
    scores.sum().backward()
    torch.testing.assert_close(images.grad, torch.full_like(images, 1 / images[0].numel()))
