"""``digit-cls``: a differentiable prompt-following reward of the digits world (EVALUATION.md §7.4 (c)). dmdr-only.

The analogue of DMDR's DINOv2 reward for the tiny preset: the digits classifier
(:mod:`dmdr_cli.digits.classifier`) scores the digits the prompt asks for, plus colour and position terms.
Scores are ``≤ 0`` (log-probabilities and penalties), higher is better; gradients reach the pixels.

Prompt
------
:func:`parse_prompt` reads the world's captions (:func:`dmdr_cli.digits.world.caption`): digits as numerals,
each optionally preceded by a colour word and a count word (``two``/``three``/``four``, plural ``5s``), and a
relation (``left of``, ``right of``, ``above``, ``below``) between the first two digits. A prompt without a numeral
scores exactly 0 and contributes no gradient.

Formulas (per image ``x ∈ [0,1]^{3×H×W}``)
---------------------------------------
``g = max_c x_c`` (grey, differentiable); the segmentation ``S`` (the ``digits`` detector's: threshold 0.25, 3×3
dilation, connected components) is computed on the detached image. A *region* ``k`` has a detached mask ``M_k``
and box ``b_k``; its crop ``z_k = normalize_crops(g ⊙ M_k, b_k)`` (square window on the box, 28×28, bilinear,
differentiable in ``g``) gives ``L_k = log softmax(classifier(z_k))``.

* **one digit, count 1** (``a photo of a 3``, ``a photo of a red 3``): one region, the whole image with the box of
  all foreground: ``D = L(c)``, the log-probability of the prompted digit.
* **N ≥ 2 digits** (sum of counts): regions are the components of ``S`` when there are at least ``N`` of them,
  else fixed regions (``N = 2``: the two halves along the prompt's relation axis, or all four halves without a
  relation; ``N ≥ 3``: the quadrants). The ``N`` prompted digits ``c_j`` are matched one-to-one to regions by
  the Hungarian algorithm on the detached cost ``−L_k(c_j) + λ_c·dist_jk``; ``D = mean_j L_{π(j)}(c_j)``.
* **colour** (digits with a colour word): the brightness-weighted mean colour of region ``k`` is
  ``m = Σ_{p∈F_k} g_p x_p / Σ_{p∈F_k} g_p`` over its foreground pixels ``F_k`` (the region itself when it has
  none), made brightness-free as ``m̂ = m / max_c m`` (tints multiply the glyph); with ``t̂`` the palette colour
  (:data:`dmdr_cli.rewards.offline.COLORS`) divided by its largest channel, ``dist = (1/3)·‖m̂ − t̂‖²`` and
  ``C = −mean_j dist_{π(j)j}`` (the offline ``color`` reward's idea, per matched digit).
* **position** (``A rel B``): centres of mass ``μ = Σ_{p∈F} g_p·p / Σ g_p`` of the two matched regions, in
  units of the canvas side; with ``u = s·(μ_A − μ_B)_axis`` (``s = −1`` for left of/above, ``+1`` for right
  of/below; axis x or y), ``P = −τ·softplus((δ − u)/τ)``, ``δ = 0.15``, ``τ = 0.05``: ≈ 0 once A is clearly on the
  correct side, ≈ ``u − δ`` otherwise.
* **count** (counting prompts whose regions are components): every component left unmatched adds
  ``E = log(1 − p_k(c) + 10⁻⁴)``, penalising extra copies of the counted digit (GenEval's ``exclude``).
* **ink**: the classifier sees brightness-normalised crops, so on its own the reward cannot tell a bright digit
  from one faded below the detector's foreground threshold (0.25), and ReFL learned to fade digits (measured:
  colour and counting accuracy fell while the reward rose). With ``q_k`` the mean of the 5 brightest ``g`` in
  the foreground of matched region ``k``, ``I = −mean_k τ·softplus((β − q_k)/τ)``, ``β = 0.6`` (every palette
  colour's brightest channel is ≥ 0.8), ``τ = 0.05``: ≈ 0 for a digit drawn at the data's brightness.
* **separation** (``N ≥ 2`` digits but fewer than ``N`` components, so fixed regions are used): GenEval needs
  ``N`` separate detections, but the fixed-region fallback alone lets one glyph straddling two halves score for
  both prompted digits (ReFL raised the two-digit reward without any accuracy gain). ``S = −(N − #components) − mean(g on the 2-pixel band between the matched fixed
  regions)`` (both centre bands for quadrants): the constant part ranks such images below separated ones (DPO and
  GRPO use the ranking), the band part gives ReFL a gradient that pulls the glyphs apart.

``reward = D + color_weight·C + position_weight·P + count_weight·E + ink_weight·I + separation_weight·S``
(defaults 2, 4, 1, 4, 1).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from dmdr_cli.digits.classifier import DigitClassifier, load_classifier, normalize_crops
from dmdr_cli.digits.world import CLASSES, COUNT_WORDS, DILATION, mask_box, segment
from dmdr_cli.rewards.base import check_inputs

__all__ = ["DigitClsReward", "ParsedPrompt", "build_digit_cls", "parse_prompt"]

_WORD_COUNTS = {w: n for n, w in COUNT_WORDS.items()} | {"one": 1, "a": 1, "an": 1}
_DIGIT = re.compile(r"^(\d)(?:s|'s)?$")
_RELATIONS = ("left of", "right of", "above", "below")
#: Brightness a matched digit's brightest pixels should reach (``β``) and the softness of that hinge (``τ``).
INK_LEVEL, INK_TAU = 0.6, 0.05


@dataclass(frozen=True)
class ParsedPrompt:
    """Digits asked for: ``objects`` = ``((class name, count, colour or None), ...)`` in prompt order;
    ``relation`` = ``(rel, a, b)``: object ``a`` is ``rel`` of object ``b`` (or ``None``)."""

    objects: tuple[tuple[str, int, str | None], ...]
    relation: tuple[str, int, int] | None = None

    @property
    def n(self) -> int:
        return sum(c for _, c, _ in self.objects)


@lru_cache(maxsize=4096)
def parse_prompt(prompt: str) -> ParsedPrompt:
    """Parse a digits-world caption (module docstring)."""
    from dmdr_cli.rewards.offline import COLORS

    tokens = re.sub(r"[^\w' ]+", " ", prompt.lower()).split()
    objects: list[tuple[str, int, str | None]] = []
    where: list[int] = []
    for i, tok in enumerate(tokens):
        m = _DIGIT.match(tok)
        if not m:
            continue
        j = i - 1
        color = None
        if j >= 0 and tokens[j] in COLORS:
            color = tokens[j]
            j -= 1
        count = _WORD_COUNTS.get(tokens[j], 1) if j >= 0 else 1
        if tok.endswith("s") and count == 1 and (j < 0 or tokens[j] not in ("a", "an", "one")):
            count = 2  # a plural without a count word ("5s"): at least two
        objects.append((CLASSES[int(m.group(1))], count, color))
        where.append(i)
    relation = None
    if len(objects) >= 2:
        between = " ".join(tokens[where[0] + 1:where[1]])
        for rel in _RELATIONS:
            if re.search(rf"\b{rel}\b", between):
                relation = (rel, 0, 1)
                break
    return ParsedPrompt(tuple(objects), relation)


def _target(color: str) -> Tensor:
    from dmdr_cli.rewards.offline import COLORS

    t = torch.tensor(COLORS[color], dtype=torch.float32)
    return t / t.max().clamp(min=1e-6)


class DigitClsReward:
    """The ``digit-cls`` reward (module docstring). ``name`` = ``digit-cls@<weights fingerprint>``."""

    differentiable = True

    def __init__(self, classifier: DigitClassifier, *, color_weight: float = 2.0, position_weight: float = 4.0,
                 count_weight: float = 1.0, ink_weight: float = 4.0, separation_weight: float = 1.0,
                 device: Any = "cpu") -> None:
        self.classifier = classifier
        self.net = copy.deepcopy(classifier.net).to(device)  # own copy: __call__ may move it to the images' device
        self.color_weight = float(color_weight)
        self.position_weight = float(position_weight)
        self.count_weight = float(count_weight)
        self.ink_weight = float(ink_weight)
        self.separation_weight = float(separation_weight)
        self.name = f"digit-cls@{classifier.fingerprint}"

    # -- regions -------------------------------------------------------------------------------------------

    @staticmethod
    def _fixed(h: int, w: int, n: int, relation: tuple[str, int, int] | None) -> list[np.ndarray]:
        def rect(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
            m = np.zeros((h, w), bool)
            m[y0:y1, x0:x1] = True
            return m

        left, right = rect(0, h, 0, w // 2), rect(0, h, w // 2, w)
        top, bottom = rect(0, h // 2, 0, w), rect(h // 2, h, 0, w)
        if n == 2 and relation is not None:
            return [left, right] if relation[0] in ("left of", "right of") else [top, bottom]
        if n == 2:
            return [left, right, top, bottom]
        return [rect(0, h // 2, 0, w // 2), rect(0, h // 2, w // 2, w), rect(h // 2, h, 0, w // 2),
                rect(h // 2, h, w // 2, w)]

    def _regions(self, x_det: np.ndarray, parsed: ParsedPrompt) -> tuple[list[np.ndarray], list[np.ndarray],
                                                                         list[tuple[int, int, int, int]], bool, int]:
        """``(crop masks, foreground masks, crop boxes, from_components, #components)`` of one image (all
        detached)."""
        fg, comps = segment(x_det)
        h, w = fg.shape
        full = np.ones((h, w), bool)
        if parsed.n == 1:
            return [full], [fg if fg.any() else full], [mask_box(fg) if fg.any() else (0, 0, w, h)], False, len(comps)
        if len(comps) >= parsed.n:
            grown = [ndimage.binary_dilation(m, np.ones((3, 3), bool), iterations=DILATION) for m in comps]
            return grown, comps, [mask_box(m) for m in comps], True, len(comps)
        fixed = self._fixed(h, w, parsed.n, parsed.relation)
        inked = [fg & r if (fg & r).any() else r for r in fixed]  # a region without ink: the region itself
        return fixed, inked, [mask_box(m) for m in inked], False, len(comps)

    @staticmethod
    def _band(g: Tensor, n_regions: int, matched: list[int]) -> Tensor:
        """Mean brightness on the 2-pixel centre band(s) separating the matched fixed regions (see ``_fixed``:
        2 regions = one pair of halves, 4 halves = left/right then top/bottom, else quadrants)."""
        h, w = g.shape
        vertical = g[:, w // 2 - 1: w // 2 + 1]  # between left and right
        horizontal = g[h // 2 - 1: h // 2 + 1, :]  # between top and bottom
        if n_regions == 4 and sorted(matched) in ([0, 1], [2, 3]):  # two halves of the same split
            return vertical.mean() if sorted(matched) == [0, 1] else horizontal.mean()
        if n_regions == 2:
            return vertical.mean() if matched and max(matched) < 2 else horizontal.mean()
        return (vertical.mean() + horizontal.mean()) / 2

    # -- scoring -------------------------------------------------------------------------------------------

    def _score(self, x: Tensor, parsed: ParsedPrompt) -> Tensor:
        """Reward of one image ``x [3, H, W]`` (float32, on the classifier's device)."""
        g = x.max(dim=0).values  # [H, W]
        x_det = x.detach().permute(1, 2, 0).clamp(0, 1).cpu().numpy()
        crop_masks, fg_masks, box_list, from_components, n_comp = self._regions(x_det, parsed)
        dev = x.device
        cm = torch.from_numpy(np.stack(crop_masks)).to(dev, torch.float32)  # [K, H, W]
        fm = torch.from_numpy(np.stack(fg_masks)).to(dev, torch.float32)
        grey = (g[None] * cm)[:, None]  # [K, 1, H, W]
        boxes = torch.tensor(box_list, dtype=torch.float32, device=dev)
        logp = F.log_softmax(self.net.logits(normalize_crops(grey, boxes)).float(), dim=-1)  # [K, 10]

        # per-region colour and centre of mass (differentiable)
        wts = g[None] * fm  # [K, H, W]
        mass = wts.sum(dim=(1, 2)).clamp(min=1e-6)
        mean_rgb = torch.einsum("khw,chw->kc", wts, x) / mass[:, None]  # [K, 3]
        mean_hat = mean_rgb / mean_rgb.max(dim=1, keepdim=True).values.clamp(min=1e-6)
        hh, ww = g.shape
        ys = (torch.arange(hh, device=dev, dtype=torch.float32) + 0.5) / hh
        xs = (torch.arange(ww, device=dev, dtype=torch.float32) + 0.5) / ww
        cx = (wts.sum(dim=1) * xs).sum(dim=1) / mass
        cy = (wts.sum(dim=2) * ys).sum(dim=1) / mass

        objs = [(CLASSES.index(name), color, i) for i, (name, count, color) in enumerate(parsed.objects)
                for _ in range(count)]
        dist = torch.zeros(len(objs), logp.shape[0], device=dev)
        for j, (_, color, _) in enumerate(objs):
            if color is not None:
                dist[j] = (mean_hat - _target(color).to(dev)).pow(2).mean(dim=1)
        cls_idx = torch.tensor([c for c, _, _ in objs], device=dev)
        lp = logp[:, cls_idx].T  # [N, K]
        if len(objs) == 1:
            rows, cols = np.array([0]), np.array([0])
        else:
            cost = (-lp + self.color_weight * dist).detach().cpu().numpy()
            rows, cols = linear_sum_assignment(cost)
        rows_t, cols_t = torch.as_tensor(rows, device=dev), torch.as_tensor(cols, device=dev)
        total = lp[rows_t, cols_t].mean()
        if self.ink_weight:
            k_top = min(5, hh * ww)
            peak = (g[None] * fm).flatten(1)[cols_t].topk(k_top, dim=1).values.mean(dim=1)  # [N]
            total = total - self.ink_weight * (INK_TAU * F.softplus((INK_LEVEL - peak) / INK_TAU)).mean()
        colored = [j for j, (_, color, _) in enumerate(objs) if color is not None]
        if colored and self.color_weight:
            total = total - self.color_weight * dist[rows_t, cols_t][torch.as_tensor(colored, device=dev)].mean()
        if parsed.relation is not None and self.position_weight:
            rel, a, b = parsed.relation
            where = {objs[int(j)][2]: int(k) for j, k in zip(rows, cols)}
            if a in where and b in where:
                sign = -1.0 if rel in ("left of", "above") else 1.0
                centre = cx if rel in ("left of", "right of") else cy
                u = sign * (centre[where[a]] - centre[where[b]])
                tau, delta = 0.05, 0.15
                total = total - self.position_weight * tau * F.softplus((delta - u) / tau)
        if not from_components and parsed.n >= 2 and self.separation_weight:
            if parsed.n == 2 and parsed.relation is not None:
                band = self._band(g, 2, [0, 1] if parsed.relation[0] in ("left of", "right of") else [2, 3])
            else:
                band = self._band(g, len(crop_masks), [int(k) for k in cols])
            total = total - self.separation_weight * (max(parsed.n - n_comp, 0) + band)
        if from_components and len(parsed.objects) == 1 and parsed.objects[0][1] > 1 and self.count_weight:
            extra = [k for k in range(logp.shape[0]) if k not in set(cols.tolist())]
            if extra:
                p = logp[torch.as_tensor(extra, device=dev), int(cls_idx[0])].exp()
                total = total + self.count_weight * torch.log1p(-p + 1e-4).sum()
        return total

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        check_inputs(images, prompts)
        x = images.float()
        if next(self.net.parameters()).device != x.device:
            self.net.to(x.device)
        scores = []
        for i, prompt in enumerate(prompts):
            parsed = parse_prompt(prompt)
            if not parsed.objects:
                scores.append(x[i].sum() * 0.0)
                continue
            scores.append(self._score(x[i], parsed))
        return torch.stack(scores)


def build_digit_cls(*, path: str = "", device: Any = "cpu", dtype: torch.dtype = torch.float32,
                    color_weight: float = 2.0, position_weight: float = 4.0, count_weight: float = 1.0,
                    ink_weight: float = 4.0, separation_weight: float = 1.0) -> DigitClsReward:
    """Registry builder of ``digit-cls``: ``path`` = classifier weights (default: the cached one, trained on first
    use). Computes in float32 whatever ``dtype``; options are the term weights."""
    return DigitClsReward(load_classifier(path or None), color_weight=color_weight,
                          position_weight=position_weight, count_weight=count_weight, ink_weight=ink_weight,
                          separation_weight=separation_weight, device=device)

