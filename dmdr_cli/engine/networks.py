"""One frozen base network serving teacher, generator, fake score and real score (ALGORITHM.md 2).

The base carries two named PEFT LoRA adapters: ``gen`` (the few-step generator, scale 1) and ``guide``
(the critic; used at scale ``lambda_f`` as fake score and at the DynaDG scale ``lambda_r(k)`` as real
score; ``lambda_r = 0`` means adapters disabled = pure teacher). Only :meth:`Roles.role` touches adapter
state, and it restores the previous state on exit.

PEFT traps handled here (ENVIRONMENT.md, ALGORITHM.md 2.2/12.8):
- ``set_adapter``/``disable_adapters`` toggle ``requires_grad`` of inactive adapters; switching between a
  forward and its ``backward()`` silently drops gradients. Role switches here never touch ``requires_grad``
  (set once: trainable LoRA tensors on, the reference off), and optimisers get their parameters by *name*.
- ``set_adapter`` after ``disable_adapters`` does not re-enable adapters: ``enable_adapters()`` first.
- The diffusers ``joint_attention_kwargs={"scale": s}`` path is never used (its s = 0 reset wipes scales).

Switching is done on the cached list of LoRA layers, setting exactly the per-layer state that diffusers'
``enable_adapters``/``disable_adapters``/``set_adapters([name], weights=[w])`` set (``_disable_adapters``,
``_active_adapter``, ``scaling[name] = w * alpha / r``), without their walks over every module and their
``requires_grad`` flips: a DMDR step switches roles ~30 times, and the library path cost 20% of a tiny-sd3
training step (tested equal to the library path).

Optional: a full-weight generator copy (SDXL 1-step), where the ``gen`` role calls that copy instead.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch

GEN, GUIDE, REF = "gen", "guide", "gen_ref"


def lora_config(rank: int, alpha: int, targets: list[str] | tuple[str, ...]):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))


def adapter_params(net: torch.nn.Module, adapter: str) -> dict[str, torch.nn.Parameter]:
    """LoRA parameters of ``adapter``, selected by name (``...lora_A.<adapter>.weight``)."""
    return {n: p for n, p in net.named_parameters() if (f".{adapter}." in n) and ("lora_" in n)}


class Roles:
    """The adapter layout on one base network and the only switch of adapter state."""

    def __init__(self, base: torch.nn.Module, *, targets, gen_rank: int, gen_alpha: int, guide_rank: int,
                 guide_alpha: int, fake_scale: float = 2.0, full_generator: bool = False,
                 generator_init: dict | None = None) -> None:
        self.base = base
        self.fake_scale = fake_scale
        base.requires_grad_(False)
        self.generator: torch.nn.Module | None = None
        if full_generator:
            self.generator = copy.deepcopy(base)
            if generator_init is not None:
                self.generator.load_state_dict(generator_init, strict=True)
            self.generator.requires_grad_(True)
        else:
            base.add_adapter(lora_config(gen_rank, gen_alpha, targets), adapter_name=GEN)
        base.add_adapter(lora_config(guide_rank, guide_alpha, targets), adapter_name=GUIDE)
        self._gen = dict(self.generator.named_parameters()) if self.generator is not None else adapter_params(base, GEN)
        self._guide = adapter_params(base, GUIDE)
        if not self._guide or not self._gen:
            raise RuntimeError("LoRA injection matched no modules; check lora.targets")
        self._ref: dict[str, torch.nn.Parameter] = {}
        self.reference: torch.nn.Module | None = None
        from peft.tuners.lora import LoraLayer

        self._layers = [m for m in base.modules() if isinstance(m, LoraLayer)]
        if any(m.use_rslora.get(a, False) for m in self._layers for a in m.scaling):
            raise RuntimeError("rsLoRA adapters are not supported by the role switch")
        for p in self.trainable():
            p.requires_grad_(True)
        self._state: tuple = ("teacher",)
        self._apply(("teacher",), force=True)

    def add_reference(self) -> None:
        """A frozen copy of the current generator (the DPO reference): a third LoRA ``gen_ref``, or a module copy
        for a full-weight generator. Costs only adapter memory in the LoRA layout."""
        if self._ref or self.reference is not None:
            return
        if self.generator is not None:
            self.reference = copy.deepcopy(self.generator).requires_grad_(False)
            return
        self.base.add_adapter(copy.deepcopy(self.base.peft_config[GEN]), adapter_name=REF)
        self._ref = adapter_params(self.base, REF)
        for p in self.trainable():  # add_adapter makes the new adapter the active, trainable one
            p.requires_grad_(True)
        self.sync_reference()
        self._apply(self._state, force=True)

    @torch.no_grad()
    def sync_reference(self) -> None:
        """Set the reference to the generator's current weights (start of stage 2)."""
        if self.reference is not None:
            self.reference.load_state_dict(self.generator.state_dict())
        for n, p in self._ref.items():
            p.copy_(self._gen[n.replace(f".{REF}.", f".{GEN}.")])
            p.requires_grad_(False)

    @torch.no_grad()
    def bake_generator(self) -> torch.nn.Module:
        """Inference only: the generator as a plain network. The ``gen`` LoRA is merged into the base weights
        (PEFT's ``merge``) and every adapter layer is removed, so a forward pays no LoRA branches or adapter
        switching (measured 1.4x faster for the tiny-sd3 4-step student; what ``export`` ships is the same
        merge). The base no longer serves teacher or critic afterwards; this ``Roles`` must not be used again.
        A full-weight generator is returned as it is."""
        if self.generator is not None:
            return self.generator
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in self.base.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge(adapter_names=[GEN])
        self.base.unload_lora()  # drops the wrappers, keeps the (merged) base weights
        self._gen, self._guide, self._ref = {}, {}, {}
        self._state = ("baked",)
        return self.base

    # -- parameters ---------------------------------------------------------------------------------
    def gen_parameters(self) -> dict[str, torch.nn.Parameter]:
        return self._gen

    def guide_parameters(self) -> dict[str, torch.nn.Parameter]:
        return self._guide

    def trainable(self) -> list[torch.nn.Parameter]:
        return list(self._gen.values()) + list(self._guide.values())

    # -- roles --------------------------------------------------------------------------------------
    @property
    def state(self) -> tuple:
        return self._state

    def _switch(self, adapter: str | None, weight: float = 1.0) -> None:
        """Adapters off (``adapter=None``) or exactly ``adapter`` on at ``weight`` (module docstring)."""
        for m in self._layers:
            if adapter is None:
                m._disable_adapters = True
                continue
            m._disable_adapters = False
            m._active_adapter = [adapter]
            if adapter in m.scaling:
                m.scaling[adapter] = weight * m.lora_alpha[adapter] / m.r[adapter]

    def _apply(self, state: tuple, force: bool = False) -> None:
        if state == self._state and not force:
            return
        kind = state[0]
        if kind == "teacher" or (kind == "gen" and self.generator is not None):
            self._switch(None)
        elif kind == "gen":
            self._switch(GEN)
        elif kind == "ref":
            self._switch(None if self.reference is not None else REF)
        else:  # ("guide", scale)
            self._switch(GUIDE, float(state[1]))
        self._state = state

    @staticmethod
    def _state_for(name: str, scale: float | None, fake_scale: float) -> tuple:
        if name == "teacher":
            return ("teacher",)
        if name == "gen":
            return ("gen",)
        if name == "ref":
            return ("ref",)
        if name == "fake":
            return ("guide", fake_scale)
        if name == "real":
            lam = float(scale or 0.0)
            return ("teacher",) if lam == 0.0 else ("guide", lam)
        raise ValueError(f"unknown role {name!r}")

    def activate(self, name: str, scale: float | None = None) -> torch.nn.Module:
        """Switch to a role without restoring (e.g. back to ``gen`` before ``backward()``)."""
        if name == "ref" and not (self._ref or self.reference is not None):
            raise RuntimeError("role 'ref' needs add_reference() first")
        self._apply(self._state_for(name, scale, self.fake_scale))
        if name == "gen" and self.generator is not None:
            return self.generator
        if name == "ref" and self.reference is not None:
            return self.reference
        return self.base

    @contextmanager
    def role(self, name: str, scale: float | None = None) -> Iterator[torch.nn.Module]:
        """``with roles.role("fake") as net:`` -> the module to call in that role; restores the previous state."""
        previous = self._state
        net = self.activate(name, scale)
        try:
            yield net
        finally:
            self._apply(previous)

    # -- state dicts ---------------------------------------------------------------------------------
    def adapter_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Trainable tensors by group (``gen``, ``guide``), CPU copies keyed by parameter name."""
        out = {GEN: {n: p.detach().cpu().clone() for n, p in self._gen.items()},
               GUIDE: {n: p.detach().cpu().clone() for n, p in self._guide.items()}}
        ref = self._ref or (dict(self.reference.named_parameters()) if self.reference is not None else {})
        if ref:
            out[REF] = {n: p.detach().cpu().clone() for n, p in ref.items()}
        return out

    def load_adapter_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        groups = [(GEN, self._gen), (GUIDE, self._guide)]
        if REF in state:
            self.add_reference()
            groups.append((REF, self._ref or dict(self.reference.named_parameters())))
        for group, params in groups:
            saved = state[group]
            missing = set(params) ^ set(saved)
            if missing:
                raise KeyError(f"{group}: {len(missing)} mismatched tensors, e.g. {sorted(missing)[:2]}")
            with torch.no_grad():
                for n, p in params.items():
                    if saved[n].shape != p.shape:
                        raise KeyError(f"{group}: shape of {n} is {tuple(saved[n].shape)}, expected {tuple(p.shape)}")
                    p.copy_(saved[n].to(p.device, p.dtype))


def unique_storage_bytes(modules: list[torch.nn.Module]) -> int:
    """Bytes of distinct parameter storages across modules (shared tensors counted once)."""
    seen, total = set(), 0
    for m in modules:
        for p in m.parameters():
            key = p.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += p.untyped_storage().nbytes()
    return total
