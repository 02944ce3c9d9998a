"""Merging the student's LoRA into its base network, and the check that the merge is right (ALGORITHM.md 12.5).

RTDMD's merge script loaded a PEFT-merged state dict with ``strict=False``: after PEFT injection the
targeted layers are keyed ``...base_layer.weight``, so every merged layer was silently dropped. Here:

- :func:`stock_state_dict` strips the PEFT wrapping (``x.base_layer.weight`` -> ``x.weight``, adapter
  tensors dropped), giving exactly the keys of the stock diffusers model;
- :func:`merged_state_dict` adds PEFT's own ``get_delta_weight`` (the function ``merge()`` uses) of the
  chosen adapters to those weights, in fp32, without touching the live network;
- :func:`check_merged` verifies the result against the explicit formula ``W + scaling * B @ A``
  computed from the raw factors (:class:`LoraFactor`), independently of PEFT: relative error < 1e-3 on
  every LoRA-targeted weight, bit-equality everywhere else, identical key sets.

Several adapters on one layer (stacked LoRAs) are summed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from dmdr_cli.export import VerificationError

MERGE_TOL = 1e-3


@dataclass(frozen=True)
class LoraFactor:
    """One adapter on one layer: ``delta W = scaling * B @ A`` (fp32 CPU copies of the factors)."""

    module: str            # module path in the network, e.g. ``transformer_blocks.0.attn.to_q``
    adapter: str
    A: torch.Tensor        # ``lora_A``: [r, in] (Linear) or [r, in, kh, kw] (Conv2d)
    B: torch.Tensor        # ``lora_B``: [out, r] or [out, r, 1, 1]
    scaling: float         # PEFT ``scaling[adapter]`` read from the module (alpha / r x adapter weight)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def key(self) -> str:
        """The stock state-dict key of the weight this factor modifies."""
        return f"{self.module}.weight"

    def delta(self) -> torch.Tensor:
        """``scaling * B @ A`` in the layout of the layer's weight, computed in fp64, returned in fp32."""
        a, b = self.A.double().flatten(1), self.B.double().flatten(1)
        out = (b @ a) * self.scaling
        return out.reshape(self.B.shape[0], *self.A.shape[1:]).float()


def _lora_layers(net: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in net.named_modules() if isinstance(m, LoraLayer)}


def _owner(key: str, layers: Mapping[str, torch.nn.Module]) -> str | None:
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in layers:
            return prefix
    return None


def lora_factors(net: torch.nn.Module, adapters: Iterable[str]) -> list[LoraFactor]:
    """The factors of ``adapters`` on every LoRA layer of ``net`` (plain LoRA on Linear / Conv2d only)."""
    from peft.tuners.lora import Conv2d, Linear

    adapters = list(adapters)
    out: list[LoraFactor] = []
    for name, m in _lora_layers(net).items():
        for adapter in adapters:
            if adapter not in m.lora_A:
                continue
            if not isinstance(m, (Linear, Conv2d)):
                raise VerificationError(f"LoRA layer {name} is a {type(m).__name__}; export supports Linear and Conv2d")
            if m.use_dora.get(adapter) or getattr(m, "fan_in_fan_out", False):
                raise VerificationError(f"LoRA layer {name}: DoRA / fan_in_fan_out adapters are not supported by export")
            b = m.lora_B[adapter].weight
            if b.ndim == 4 and tuple(b.shape[2:]) != (1, 1):
                raise VerificationError(f"LoRA layer {name}: lora_B kernel {tuple(b.shape[2:])} is not 1x1")
            out.append(LoraFactor(name, adapter, m.lora_A[adapter].weight.detach().float().cpu().clone(),
                                  b.detach().float().cpu().clone(), float(m.scaling[adapter])))
    return out


def stock_state_dict(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The network's base weights under the stock diffusers keys (PEFT wrapping stripped, adapters dropped).

    Tensors are fp32 CPU views/copies of the live ones; callers must not modify them in place.
    """
    layers = _lora_layers(net)
    out: dict[str, torch.Tensor] = {}
    for key, value in net.state_dict().items():
        owner = _owner(key, layers)
        if owner is not None:
            rest = key[len(owner) + 1:]
            if not rest.startswith("base_layer."):
                continue  # an adapter tensor (lora_A/B, magnitude vectors...)
            key = f"{owner}.{rest[len('base_layer.'):]}"
        value = value.detach()
        out[key] = value.float().cpu() if value.is_floating_point() else value.cpu()
    return out


@torch.no_grad()
def merged_state_dict(net: torch.nn.Module, adapters: Iterable[str]) -> dict[str, torch.Tensor]:
    """Stock-keyed fp32 state dict with ``adapters`` merged by PEFT's ``get_delta_weight`` (the live network is
    not modified). Call it in the adapter state whose scales should be merged (``roles.role("gen")``)."""
    adapters = list(adapters)
    out = stock_state_dict(net)
    for name, m in _lora_layers(net).items():
        present = [a for a in adapters if a in m.lora_A]
        if not present:
            continue
        weight = m.get_base_layer().weight.detach().float().cpu()
        for adapter in present:
            weight = weight + m.get_delta_weight(adapter).detach().float().cpu()
        out[f"{name}.weight"] = weight
    return out


def expected_deltas(factors: Iterable[LoraFactor]) -> dict[str, torch.Tensor]:
    """Stock weight key -> the sum of ``scaling * B @ A`` of every factor on that layer."""
    out: dict[str, torch.Tensor] = {}
    for f in factors:
        d = f.delta()
        out[f.key] = out[f.key] + d if f.key in out else d
    return out


@torch.no_grad()
def check_layer_forward(net: torch.nn.Module, weights: Mapping[str, torch.Tensor], factors: Iterable[LoraFactor], *,
                        tol: float = 1e-4, seed: int = 0) -> float:
    """Every LoRA layer's forward in the current adapter state (PEFT: base + active adapters) equals the plain layer
    with the merged weight on a fixed random input (relative error < ``tol``); returns the worst error.

    Run it in the ``gen`` role: this is the "forward of the merged model equals the adapter model" check of
    ALGORITHM.md 12.5, layer by layer (no second copy of the network is needed).
    """
    import torch.nn.functional as F

    layers = _lora_layers(net)
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for module in sorted({f.module for f in factors}):
        m = layers[module]
        base = m.get_base_layer()
        w = weights[f"{module}.weight"].to(base.weight.device, torch.float32)
        bias = None if base.bias is None else base.bias.float()
        if isinstance(base, torch.nn.Conv2d):
            x = torch.randn(1, base.in_channels, 8, 8, generator=gen).to(base.weight.device)
            want = F.conv2d(x, w, bias, base.stride, base.padding, base.dilation, base.groups)
        else:
            x = torch.randn(4, base.in_features, generator=gen).to(base.weight.device)
            want = F.linear(x, w, bias)
        got = m(x).float()
        rel = float((got - want).norm() / want.norm().clamp_min(1e-30))
        worst = max(worst, rel)
        if not rel < tol:
            raise VerificationError(f"LoRA layer {module}: the adapter forward and the merged weight disagree by relative "
                                    f"error {rel:.3g} (limit {tol:g})")
    return worst


@torch.no_grad()
def check_merged(weights: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor],
                 factors: Iterable[LoraFactor], *, tol: float = MERGE_TOL, what: str = "merged weights") -> dict:
    """Assert ``weights == base + scaling * B @ A`` on every LoRA-targeted layer and ``weights == base`` elsewhere.

    Per targeted layer the relative error ``|W - W_base - delta| / |delta|`` (Frobenius, fp32) must be below
    ``tol``; where ``delta`` is exactly zero, ``W`` must equal ``W_base``. Raises :class:`VerificationError`
    naming the first offending key; returns ``{"targeted", "untouched", "max_rel_err"}``.
    """
    expected = expected_deltas(factors)
    if set(weights) != set(base):
        extra, missing = sorted(set(weights) - set(base)), sorted(set(base) - set(weights))
        raise VerificationError(f"{what}: keys differ from the base network (extra {extra[:2]}, missing {missing[:2]})")
    unknown = sorted(set(expected) - set(base))
    if unknown:
        raise VerificationError(f"{what}: LoRA layer {unknown[0]} has no weight in the base network")
    worst = 0.0
    for key, b in base.items():
        w = weights[key]
        if w.shape != b.shape:
            raise VerificationError(f"{what}: {key} has shape {tuple(w.shape)}, base {tuple(b.shape)}")
        if key not in expected:
            if not torch.equal(w.float(), b.float()):
                raise VerificationError(f"{what}: {key} is not LoRA-targeted but differs from the base weight")
            continue
        delta = expected[key]
        norm = float(delta.norm())
        if norm == 0.0:
            if not torch.equal(w.float(), b.float()):
                raise VerificationError(f"{what}: {key} has a zero adapter but differs from the base weight")
            continue
        rel = float((w.float() - b.float() - delta).norm()) / norm
        worst = max(worst, rel)
        if not rel < tol:
            raise VerificationError(f"{what}: {key} differs from base + scaling*B@A by relative error {rel:.3g} "
                                    f"(limit {tol:g}); the merge is wrong")
    return {"targeted": len(expected), "untouched": len(base) - len(expected), "max_rel_err": worst}
