"""The adapter layout on one frozen base (ALGORITHM.md 2.1, 2.2, 12.8; ENVIRONMENT.md "PEFT: two adapters").

Every test builds a fresh tiny-sd3-random base with ``recipes.distill.build_roles`` (a few hundred ms), so tests can
perturb adapters freely.
"""

from __future__ import annotations

import pytest
import torch

from dmdr_cli.config.loader import resolve
from dmdr_cli.engine.networks import GEN, GUIDE, REF, unique_storage_bytes
from dmdr_cli.families.loading import load_base
from dmdr_cli.recipes.distill import build_roles

PROMPTS = ["a red circle", "two blue squares"]
ROLE_STATES = [("gen", None), ("fake", None), ("real", 0.5), ("real", 0.0), ("teacher", None)]



def _setup(*sets: str):
    cfg = resolve("tiny-sd3-random", sets=list(sets))
    bundle = load_base(cfg)
    roles = build_roles(bundle, cfg)
    fam = bundle.family
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(2, *fam.latent_shape(bundle, cfg.model.resolution), generator=g)
    t = torch.tensor([0.9, 0.4])
    cond = fam.encode_prompts(bundle, PROMPTS)
    return cfg, bundle, roles, (x, t, cond)


@pytest.fixture
def sd3():
    return _setup()


def _out(bundle, roles, inputs, name, scale=None, grad=False):
    x, t, cond = inputs
    with torch.set_grad_enabled(grad), roles.role(name, scale) as net:
        return bundle.family.predict(net, x, t, cond)


@torch.no_grad()
def _perturb(params: dict, which: str = "lora_B", std: float = 0.2, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    for n, p in params.items():
        if which in n:
            p.copy_(torch.randn(p.shape, generator=g) * std)


# -- roles at init and scale behaviour ------------------------------------------------------------------

def test_every_role_equals_the_teacher_at_init(sd3):
    _, bundle, roles, inputs = sd3
    assert all(float(p.abs().sum()) == 0 for n, p in roles.gen_parameters().items() if "lora_B" in n)
    assert all(float(p.abs().sum()) > 0 for n, p in roles.gen_parameters().items() if "lora_A" in n)
    teacher = _out(bundle, roles, inputs, "teacher")
    assert torch.isfinite(teacher).all() and teacher.abs().mean() > 0
    for name, scale in ROLE_STATES:
        assert torch.equal(_out(bundle, roles, inputs, name, scale), teacher), (name, scale)
    assert roles.state == ("teacher",)  # every context manager restored the previous state


def test_guide_scale_real_zero_and_linearity(sd3):
    _, bundle, roles, inputs = sd3
    _perturb(roles.guide_parameters())
    teacher = _out(bundle, roles, inputs, "teacher")
    assert torch.equal(_out(bundle, roles, inputs, "real", 0.0), teacher)  # lambda_r = 0 -> adapters disabled
    assert roles.state == ("teacher",)
    fake = _out(bundle, roles, inputs, "fake")
    real = _out(bundle, roles, inputs, "real", 0.5)
    assert (fake - teacher).abs().max() > 1e-3
    assert (real - fake).abs().max() > 1e-3  # the scale matters
    assert (real - teacher).abs().max() > 1e-4
    # the gen adapter is untouched (B = 0): the generator is still the teacher
    assert torch.equal(_out(bundle, roles, inputs, "gen"), teacher)

    # The LoRA delta of one layer is linear in its scale: (real(lam) - teacher) = lam/2 (fake - teacher).
    # Block 0's query projection sees the same input in every role (nothing adapted runs before it).
    module = bundle.network.transformer_blocks[0].attn.to_q
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    current = {"name": ""}
    hook = module.register_forward_hook(lambda m, inp, out: seen.__setitem__(current["name"], (inp[0].clone(), out.clone())))
    try:
        for key, name, scale in [("teacher", "teacher", None), ("fake", "fake", None), ("real", "real", 0.5),
                                 ("real1", "real", 1.0)]:
            current["name"] = key
            _out(bundle, roles, inputs, name, scale)
    finally:
        hook.remove()
    for key in ("fake", "real", "real1"):
        assert torch.equal(seen[key][0], seen["teacher"][0])
    d_fake = seen["fake"][1] - seen["teacher"][1]
    assert d_fake.abs().max() > 1e-3
    for key, lam in (("real", 0.5), ("real1", 1.0)):
        d_real = seen[key][1] - seen["teacher"][1]
        torch.testing.assert_close(d_real, lam / roles.fake_scale * d_fake, rtol=1e-4, atol=1e-6)
    # and by hand: guide delta = scale * (alpha/r) * B A x, fake scale 2.0
    inp = seen["teacher"][0]
    a, b = module.lora_A[GUIDE].weight, module.lora_B[GUIDE].weight
    cfg_guide = bundle.network.peft_config[GUIDE]
    by_hand = 2.0 * (cfg_guide.lora_alpha / cfg_guide.r) * (inp @ a.T @ b.T)
    torch.testing.assert_close(d_fake, by_hand, rtol=1e-4, atol=1e-6)


def test_unknown_role_and_ref_without_reference_raise(sd3):
    _, _, roles, _ = sd3
    with pytest.raises(ValueError, match="unknown role"):
        with roles.role("critic"):
            pass
    with pytest.raises(RuntimeError, match="add_reference"):
        with roles.role("ref"):
            pass
    assert roles.state == ("teacher",)


# -- ALGORITHM.md 12.8: role switches between the generator forward and backward ---------------------

def _gen_grads(bundle, roles, inputs, switches: bool, reactivate: bool = True) -> dict[str, torch.Tensor | None]:
    x, t, cond = inputs
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    for p in roles.trainable():
        p.grad = None
    with roles.role("gen") as net:
        out = bundle.family.predict(net, x, t, cond)
    loss = (out.float() * w).mean()
    if switches:
        with torch.no_grad():
            for name, scale in [("fake", None), ("real", 0.5), ("teacher", None), ("real", 0.0), ("fake", None)]:
                with roles.role(name, scale) as net:
                    bundle.family.predict(net, x, t, cond)
            roles.activate("teacher")
            roles.activate("fake")
        if reactivate:
            roles.activate("gen")
    loss.backward()
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in bundle.network.named_parameters()}


@pytest.mark.parametrize("reactivate", [True, False])
def test_generator_gradient_survives_role_switches(sd3, reactivate):
    _, bundle, roles, inputs = sd3
    _perturb(roles.gen_parameters(), seed=1)       # B != 0 so every lora_A gets a gradient too
    _perturb(roles.guide_parameters(), seed=2)     # the switched roles really differ
    clean = _gen_grads(bundle, roles, inputs, switches=False)
    switched = _gen_grads(bundle, roles, inputs, switches=True, reactivate=reactivate)
    assert clean.keys() == switched.keys()
    for n in clean:
        if clean[n] is None:
            assert switched[n] is None, n
        else:
            assert switched[n] is not None and torch.equal(clean[n], switched[n]), n

    last = bundle.network.config.num_layers - 1
    # SD3's last block is context_pre_only: its context query only feeds context outputs that are dropped
    dead = f"transformer_blocks.{last}.attn.add_q_proj."
    assert bundle.network.transformer_blocks[last].context_pre_only
    gen = roles.gen_parameters()
    assert len(gen) == 30 and sum(dead in n for n in gen) == 2
    for n in gen:
        g = switched[n]
        if dead in n:
            assert g is None or float(g.abs().max()) == 0.0, n
        else:
            assert g is not None and float(g.abs().max()) > 0.0, n
    for n in roles.guide_parameters():
        assert switched[n] is None, n
    base = [n for n, _ in bundle.network.named_parameters() if "lora_" not in n]
    assert base and all(switched[n] is None for n in base)
    assert not any(p.requires_grad for n, p in bundle.network.named_parameters() if "lora_" not in n)


def test_gradient_checkpointing_recomputes_under_gen(sd3):
    """With activation checkpointing the backward re-runs forward segments: generator_loss switches back to
    ``gen`` before ``backward()``, which must give the same gradients as without checkpointing."""
    _, bundle, roles, inputs = sd3
    _perturb(roles.gen_parameters(), seed=1)
    _perturb(roles.guide_parameters(), seed=2)
    plain = _gen_grads(bundle, roles, inputs, switches=False)
    bundle.network.enable_gradient_checkpointing()
    bundle.network.train()
    try:
        ckpt = _gen_grads(bundle, roles, inputs, switches=True, reactivate=True)
    finally:
        bundle.network.disable_gradient_checkpointing()
        bundle.network.eval()
    for n in roles.gen_parameters():
        if plain[n] is None:
            assert ckpt[n] is None
        else:
            torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-9)


def test_switches_keep_trainable_flags(sd3):
    _, _, roles, _ = sd3
    for name, scale in ROLE_STATES:
        roles.activate(name, scale)
        assert all(p.requires_grad for p in roles.trainable()), name
    roles.activate("teacher")


def _layer_states(net) -> list:
    from peft.tuners.lora import LoraLayer

    return [(m.disable_adapters, list(m.active_adapters), dict(m.scaling)) for m in net.modules()
            if isinstance(m, LoraLayer)]


def _library_switch(net, state: tuple) -> None:
    """What diffusers' own adapter API does for a role state (the path the fast switch replaces)."""
    if state[0] == "teacher":
        net.disable_adapters()
    else:
        net.enable_adapters()
        net.set_adapters([GEN if state[0] == "gen" else GUIDE], weights=[1.0 if state[0] == "gen" else state[1]])


def test_fast_switch_sets_the_library_state_and_outputs(sd3):
    _, bundle, roles, inputs = sd3
    _perturb(roles.gen_parameters(), seed=1)
    _perturb(roles.guide_parameters(), seed=2)
    for name, scale in ROLE_STATES + [("fake", None), ("real", 0.25), ("gen", None)]:
        fast = _out(bundle, roles, inputs, name, scale)
        with roles.role(name, scale):
            state, ours = roles.state, _layer_states(bundle.network)
        _library_switch(bundle.network, state)
        assert _layer_states(bundle.network) == ours, (name, scale)
        with torch.no_grad():
            assert torch.equal(bundle.family.predict(bundle.network, *inputs), fast), (name, scale)
        roles._apply(roles.state, force=True)  # back to the roles' own state after the library calls


# -- memory: one base, no copies --------------------------------------------------------------------------

def test_shared_layout_holds_one_base():
    cfg = resolve("tiny-sd3-random")
    bundle = load_base(cfg)
    net = bundle.network
    alone = unique_storage_bytes([net])
    ptrs = {n: p.data_ptr() for n, p in net.named_parameters()}
    roles = build_roles(bundle, cfg)
    both = unique_storage_bytes([net])
    lora = sum(p.numel() * p.element_size() for p in roles.trainable())
    assert both == alone + lora  # adapters are the only new storage
    assert both < 1.6 * alone and both < 0.8 * 2 * alone
    # every role runs the same module object with the same base storages
    for name, scale in ROLE_STATES:
        with roles.role(name, scale) as m:
            assert m is net, name
    for n, p in net.named_parameters():
        if "lora_" not in n:
            assert p.data_ptr() == ptrs[n.replace(".base_layer", "")], n  # injection kept the base tensors
    assert roles.generator is None and unique_storage_bytes([net, net]) == both


def test_full_generator_is_detected_as_a_copy():
    cfg = resolve("tiny-sd3-random", sets=["lora.full_generator=true"])
    bundle = load_base(cfg)
    net = bundle.network
    alone = unique_storage_bytes([net])
    roles = build_roles(bundle, cfg)
    assert roles.generator is not None and roles.generator is not net
    total = unique_storage_bytes([net, roles.generator])
    assert 1.9 * alone < total < 2.3 * alone
    with roles.role("gen") as m:
        assert m is roles.generator
    with roles.role("fake") as m:
        assert m is net
    assert set(roles.gen_parameters()) == {n for n, _ in roles.generator.named_parameters()}


# -- adapter state dicts and the DPO reference ---------------------------------------------------------

def test_adapter_state_round_trip(sd3):
    _, bundle, roles, inputs = sd3
    _perturb(roles.gen_parameters(), seed=11)
    _perturb(roles.guide_parameters(), seed=12)
    state = roles.adapter_state()
    assert set(state) == {GEN, GUIDE}
    assert set(state[GEN]) == set(roles.gen_parameters()) and set(state[GUIDE]) == set(roles.guide_parameters())
    gen_out, fake_out = _out(bundle, roles, inputs, "gen"), _out(bundle, roles, inputs, "fake")

    # the state is a copy: later training does not change it
    _perturb(roles.gen_parameters(), seed=13)
    assert not torch.equal(_out(bundle, roles, inputs, "gen"), gen_out)
    assert not all(torch.equal(state[GEN][n], p) for n, p in roles.gen_parameters().items())

    _, bundle2, roles2, inputs2 = _setup()
    roles2.load_adapter_state(state)
    for group, params in ((GEN, roles2.gen_parameters()), (GUIDE, roles2.guide_parameters())):
        for n, p in params.items():
            assert torch.equal(p.detach(), state[group][n]), n
    assert torch.equal(_out(bundle2, roles2, inputs2, "gen"), gen_out)
    assert torch.equal(_out(bundle2, roles2, inputs2, "fake"), fake_out)
    assert all(p.requires_grad for p in roles2.trainable())


def test_mismatched_adapter_state_raises(sd3):
    _, _, roles, _ = sd3
    before = {n: p.detach().clone() for n, p in roles.gen_parameters().items()}
    missing = roles.adapter_state()
    missing[GEN].pop(sorted(missing[GEN])[0])
    with pytest.raises(KeyError, match="gen: 1 mismatched"):
        roles.load_adapter_state(missing)
    extra = roles.adapter_state()
    extra[GUIDE]["transformer_blocks.9.attn.to_q.lora_A.guide.weight"] = torch.zeros(4, 32)
    with pytest.raises(KeyError, match="guide"):
        roles.load_adapter_state(extra)
    shaped = roles.adapter_state()
    name = sorted(shaped[GEN])[0]
    shaped[GEN][name] = torch.zeros(3, 3)
    with pytest.raises(KeyError, match="shape"):
        roles.load_adapter_state(shaped)
    # a rank-4 generator adapter does not fit a rank-8 one
    _, _, other, _ = _setup("lora.gen_rank=4")
    with pytest.raises(KeyError, match="shape"):
        roles.load_adapter_state(other.adapter_state())
    assert all(torch.equal(before[n], p) for n, p in roles.gen_parameters().items())


def test_reference_is_a_frozen_copy_of_the_generator(sd3):
    _, bundle, roles, inputs = sd3
    _perturb(roles.gen_parameters(), seed=21)
    gen_at_copy = _out(bundle, roles, inputs, "gen")
    n_before = len(list(bundle.network.parameters()))
    roles.add_reference()
    roles.add_reference()  # idempotent
    assert len(list(bundle.network.parameters())) == n_before + len(roles.gen_parameters())
    ref = {n: p for n, p in bundle.network.named_parameters() if f".{REF}." in n}
    assert len(ref) == len(roles.gen_parameters())
    assert not any(p in set(roles.trainable()) for p in ref.values())
    assert torch.equal(_out(bundle, roles, inputs, "ref"), gen_at_copy)

    # the generator trains on; the reference does not follow
    _perturb(roles.gen_parameters(), seed=22)
    gen_later = _out(bundle, roles, inputs, "gen")
    assert (gen_later - gen_at_copy).abs().max() > 1e-3
    assert torch.equal(_out(bundle, roles, inputs, "ref"), gen_at_copy)

    # reference tensors never require grad, whatever roles were switched through
    for name, scale in ROLE_STATES + [("ref", None), ("gen", None), ("ref", None)]:
        roles.activate(name, scale)
        assert not any(p.requires_grad for p in ref.values()), name
        assert all(p.requires_grad for p in roles.trainable()), name
    # a generator gradient taken while the ref role was visited never reaches the reference
    x, t, cond = inputs
    with roles.role("gen") as net:
        loss = bundle.family.predict(net, x, t, cond).pow(2).mean()
    with torch.no_grad(), roles.role("ref") as net:
        bundle.family.predict(net, x, t, cond)
    loss.backward()
    assert all(p.grad is None for p in ref.values())
    assert sum(p.grad is not None for p in roles.gen_parameters().values()) >= 28

    # the reference travels with adapter_state and is restored by load_adapter_state
    state = roles.adapter_state()
    assert set(state) == {GEN, GUIDE, REF}
    _, bundle2, roles2, inputs2 = _setup()
    roles2.load_adapter_state(state)
    assert torch.equal(_out(bundle2, roles2, inputs2, "ref"), gen_at_copy)
    assert torch.equal(_out(bundle2, roles2, inputs2, "gen"), gen_later)

    # sync_reference moves the reference to the current generator (start of stage 2)
    roles.sync_reference()
    assert torch.equal(_out(bundle, roles, inputs, "ref"), gen_later)
    assert not any(p.requires_grad for p in ref.values())


@pytest.mark.parametrize("preset", ["tiny-sd3-random", "tiny-sdxl"])
def test_baked_generator_equals_the_gen_role_without_adapters(preset):
    """Inference bakes the gen LoRA into the weights: same outputs, no adapter layers, guide gone."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    cfg = resolve(preset)
    bundle = load_base(cfg)
    roles = build_roles(bundle, cfg)
    fam = bundle.family
    _perturb(roles.gen_parameters())
    _perturb(roles.guide_parameters(), seed=8)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, *fam.latent_shape(bundle, cfg.model.resolution), generator=g)
    t = torch.tensor([0.9, 0.4]) if fam.name == "sd3" else torch.tensor([900, 400])
    cond = fam.encode_prompts(bundle, PROMPTS)
    expected = _out(bundle, roles, (x, t, cond), "gen")
    teacher = _out(bundle, roles, (x, t, cond), "teacher")
    assert (expected - teacher).abs().max() > 1e-3  # the perturbed adapter matters
    net = roles.bake_generator()
    assert not any(isinstance(m, BaseTunerLayer) for m in net.modules())
    with torch.no_grad():
        got = fam.predict(net, x, t, cond)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
