"""The DMDR inner step (ALGORITHM.md 3.1-3.3) on tiny-sd3-random / tiny-sdxl with seeded generators.

Every random draw of the step comes from one explicit ``torch.Generator``; the tests clone its state
(``g2.set_state(g.get_state())``) to recompute the same draws by hand.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dmdr_cli.config.loader import resolve
from dmdr_cli.engine import dmdr
from dmdr_cli.engine import trainer as trainer_mod
from dmdr_cli.engine.dmdr import critic_loss, generator_loss, select_generator_input, simulate, simulate_and_select
from dmdr_cli.engine.metrics import NullSink
from dmdr_cli.errors import ConfigError
from dmdr_cli.engine.prompts import PromptStream, builtin_shapes
from dmdr_cli.engine.sampler import student_spec
from dmdr_cli.engine.trainer import Trainer, TrainPlan
from dmdr_cli.families import make_family
from dmdr_cli.families.loading import load_base
from dmdr_cli.recipes.distill import build_roles, dmd_settings, make_accelerator
from dmdr_cli.schedules.dynamic import dynadg_scale, sample_timesteps

PROMPTS = ["a red circle", "two blue squares"]
# SD3's last block is context_pre_only: this LoRA cannot affect the output (see test_networks.py)
DEAD = "transformer_blocks.1.attn.add_q_proj."



def clone(g: torch.Generator) -> torch.Generator:
    g2 = torch.Generator()
    g2.set_state(g.get_state())
    return g2


@dataclasses.dataclass
class Setup:
    cfg: object
    bundle: object
    roles: object
    spec: object
    cond: object
    uncond: object

    @property
    def fam(self):
        return self.bundle.family

    @property
    def shape(self):
        return self.fam.latent_shape(self.bundle, self.cfg.model.resolution)


def make(preset: str = "tiny-sd3-random", *sets: str) -> Setup:
    cfg = resolve(preset, sets=list(sets))
    bundle = load_base(cfg)
    roles = build_roles(bundle, cfg)
    fam = bundle.family
    return Setup(cfg, bundle, roles, student_spec(fam, cfg.student), fam.encode_prompts(bundle, PROMPTS),
                 fam.encode_prompts(bundle, [""]))


@pytest.fixture
def sd3() -> Setup:
    return make()


@torch.no_grad()
def perturb(params: dict, seed: int, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    for n, p in params.items():
        if "lora_B" in n:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def x0_of(st: Setup, role: str, x, t, scale=None):
    with torch.no_grad(), st.roles.role(role, scale) as net:
        return st.fam.to_x0(x, st.fam.predict(net, x, t, st.cond), t)


# -- backward simulation and generator input -----------------------------------------------------------

def test_ode_simulation_and_generator_input(sd3):
    st = sd3
    perturb(st.roles.gen_parameters(), seed=1)  # a student that is not the teacher
    assert st.spec.mode == "ode" and st.spec.steps == 4 and st.spec.t_end == pytest.approx(0.001)
    g = torch.Generator().manual_seed(5)
    g_hand = clone(g)
    x0s = simulate(st.roles, st.fam, st.spec, st.cond, st.shape, g, st.bundle.device, st.bundle.dtype)
    assert st.roles.state == ("teacher",)
    assert len(x0s) == 4 and all(torch.equal(x, x0s[-1]) for x in x0s)  # ODE: the final sample, N times

    # the same integration by hand: z from the generator, Euler steps on the grid to t_end
    x = torch.randn((2, *st.shape), generator=g_hand)
    grid = list(st.spec.grid) + [st.spec.t_end]
    with torch.no_grad(), st.roles.role("gen") as net:
        for t_i, t_next in zip(grid[:-1], grid[1:]):
            v = st.fam.predict(net, x, torch.full((2,), t_i), st.cond)
            x = x + (t_next - t_i) * v
    torch.testing.assert_close(x0s[-1], x, rtol=1e-5, atol=1e-6)
    assert torch.equal(g.get_state(), g_hand.get_state())  # ODE mode draws only z

    g2 = clone(g)
    x_c, x_in, t_g, idx = select_generator_input(st.fam, st.spec, x0s, g)
    idx2 = torch.randint(0, st.spec.steps, (2,), generator=g2)
    eps = torch.randn(x_c.shape, generator=g2)
    assert torch.equal(idx, idx2)
    assert torch.equal(x_c, x0s[-1])
    assert t_g.tolist() == [st.spec.grid[i] for i in idx.tolist()]
    assert torch.equal(x_in, st.fam.add_noise(x_c, eps, t_g))
    tt = t_g.view(-1, 1, 1, 1)
    torch.testing.assert_close(x_in, (1 - tt) * x_c + tt * eps)
    assert torch.equal(g.get_state(), g2.get_state())


@pytest.mark.parametrize("sde_input", ["official", "dmd2"])
def test_truncated_sde_simulation_equals_the_full_one(sd3, sde_input):
    """simulate_and_select stops each sample at the X0[i] its index uses: the same draws in the same order and the
    same generator inputs as simulate + select_generator_input, with fewer network rows."""
    st = sd3
    perturb(st.roles.gen_parameters(), seed=1)
    spec = dataclasses.replace(st.spec, mode="sde")
    cond = st.fam.encode_prompts(st.bundle, PROMPTS * 4)  # 8 rows: several grid indices
    rows = []
    real_predict = st.fam.predict

    def counting(net, x, t, c):
        rows.append(x.shape[0])
        return real_predict(net, x, t, c)

    for seed in (3, 4):
        g_full, g_trunc = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        x0s = simulate(st.roles, st.fam, spec, cond, st.shape, g_full, st.bundle.device, st.bundle.dtype)
        full = select_generator_input(st.fam, spec, x0s, g_full, sde_input)
        rows.clear()
        st.fam.predict = counting
        try:
            trunc = simulate_and_select(st.roles, st.fam, spec, cond, st.shape, g_trunc, st.bundle.device,
                                        st.bundle.dtype, sde_input)
        finally:
            st.fam.predict = real_predict
        assert torch.equal(trunc[3], full[3])                   # the same grid indices
        assert torch.equal(g_full.get_state(), g_trunc.get_state())  # ... and the same stream position
        for a, b in zip(trunc[:3], full[:3]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        idx = full[3]
        assert rows == [int((idx >= i).sum()) for i in range(4) if int((idx >= i).sum())]
        assert sum(rows) < 4 * len(cond)
    assert st.roles.state == ("teacher",)


def test_generator_input_rows_follow_their_index():
    fam = make_family(resolve("tiny-sd3-random"))
    spec = student_spec(fam, resolve("tiny-sd3-random").student)
    b = 16
    stack = [torch.full((b, 2, 3, 3), float(10 * (i + 1))) + torch.arange(b).view(-1, 1, 1, 1) for i in range(4)]
    g = torch.Generator().manual_seed(0)
    g2 = clone(g)
    x_c, x_in, t_g, idx = select_generator_input(fam, spec, stack, g)
    assert len(set(idx.tolist())) == 4  # every grid index drawn at least once
    for r in range(b):
        assert torch.equal(x_c[r], stack[int(idx[r])][r])
    torch.randint(0, 4, (b,), generator=g2)
    eps = torch.randn(x_c.shape, generator=g2)
    assert torch.equal(x_in, fam.add_noise(x_c, eps, t_g))

    # pure_noise_first: rows with idx == 0 get pure noise, the others the renoised X0[idx]
    g = torch.Generator().manual_seed(0)
    x_c, x_in, t_g, idx = select_generator_input(fam, dataclasses.replace(spec, pure_noise_first=True), stack, g)
    first = idx == 0
    assert first.any() and (~first).any()
    assert torch.equal(x_in[first], eps[first])
    assert torch.equal(x_in[~first], fam.add_noise(x_c, eps, t_g)[~first])

    # DMD2 SDE input: X0[i-1] renoised to T[i], pure noise for i = 0
    g = torch.Generator().manual_seed(0)
    x_c, x_in, t_g, idx = select_generator_input(fam, dataclasses.replace(spec, mode="sde"), stack, g, "dmd2")
    for r in range(b):
        i = int(idx[r])
        want = eps[r] if i == 0 else fam.add_noise(stack[i - 1][r:r + 1], eps[r:r + 1], t_g[r:r + 1])[0]
        assert torch.equal(x_in[r], want)
        assert torch.equal(x_c[r], stack[i][r])


def test_sdxl_one_step_input_is_pure_noise_at_399():
    cfg = resolve("tiny-sdxl")
    fam = make_family(cfg)
    spec = student_spec(fam, cfg.student)
    assert spec.grid == (0.399,) and spec.mode == "sde" and spec.pure_noise_first
    x0 = [torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))]
    g = torch.Generator().manual_seed(2)
    g2 = clone(g)
    x_c, x_in, t_g, idx = select_generator_input(fam, spec, x0, g)
    torch.randint(0, 1, (4,), generator=g2)
    eps = torch.randn(x0[0].shape, generator=g2)
    assert idx.tolist() == [0, 0, 0, 0]
    assert torch.equal(x_c, x0[0])
    assert torch.equal(x_in, eps)  # pure noise, not sqrt(abar_399) x0 + ...
    assert t_g.tolist() == pytest.approx([0.399] * 4)


# -- critic --------------------------------------------------------------------------------------------

def test_critic_loss_matches_hand_computation(sd3):
    st = sd3
    perturb(st.roles.guide_parameters(), seed=3)
    s = dmd_settings(st.cfg)
    assert s.t_sampler == "beta_anneal" and s.dynamic_steps == 20
    x_c = torch.randn((2, *st.shape), generator=torch.Generator().manual_seed(9))
    k = 3
    g = torch.Generator().manual_seed(4)
    g2 = clone(g)
    loss, stats = critic_loss(st.roles, st.fam, s, x_c, st.cond, k, g)

    t_c = sample_timesteps(2, k, s.dynamic_steps, sampler=s.t_sampler, a0=s.beta_a0, b0=s.beta_b0, generator=g2).float()
    eps = torch.randn(x_c.shape, generator=g2)
    assert torch.equal(g.get_state(), g2.get_state())
    tt = t_c.view(-1, 1, 1, 1)
    x_tc = (1 - tt) * x_c + tt * eps
    with torch.no_grad(), st.roles.role("real", 2.0) as net:  # guide adapter at lambda_f = 2.0, no CFG
        pred = st.fam.predict(net, x_tc, t_c, st.cond)
    by_hand = ((pred - (eps - x_c)) ** 2).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert stats["loss/fake"] == pytest.approx(float(loss))
    # the teacher would give a different loss: the critic really ran the guide adapter
    with torch.no_grad(), st.roles.role("teacher") as net:
        teacher_loss = ((st.fam.predict(net, x_tc, t_c, st.cond) - (eps - x_c)) ** 2).mean()
    assert abs(float(teacher_loss) - float(loss)) > 1e-4

    loss.backward()
    for n, p in st.roles.guide_parameters().items():
        assert p.grad is not None and (float(p.grad.abs().max()) > 0) != (DEAD in n), n
    assert all(p.grad is None for p in st.roles.gen_parameters().values())


# -- generator loss: non-finite handling -------------------------------------------------------------

def _nan_in_fake(monkeypatch, st: Setup, value=float("nan")):
    """Inject one non-finite value into the fake score's no-grad passes (the DMD target, not the critic)."""
    original = st.fam.predict
    hits = {"n": 0}

    def predict(net, x, t, cond):
        out = original(net, x, t, cond)
        if not torch.is_grad_enabled() and st.roles.state == ("guide", st.roles.fake_scale):
            out = out.clone()
            out[0, 0, 0, 0] = value
            hits["n"] += 1
        return out

    monkeypatch.setattr(st.fam, "predict", predict)
    return hits


def _gen_input(st: Setup, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0s = simulate(st.roles, st.fam, st.spec, st.cond, st.shape, g, st.bundle.device, st.bundle.dtype)
    _, x_in, t_g, _ = select_generator_input(st.fam, st.spec, x0s, g)
    return x_in, t_g, g


def test_generator_loss_nan_modes(sd3, monkeypatch):
    st = sd3
    x_in, t_g, g = _gen_input(st)
    s = dmd_settings(st.cfg)
    base_loss, base_stats = generator_loss(st.roles, st.fam, s, x_in, t_g, st.cond, st.uncond, 0, clone(g))
    assert st.roles.state == ("gen",)  # left active for backward()
    assert base_stats["dmd/nonfinite"] == 0 and math.isfinite(float(base_loss))
    assert base_stats["sched/lambda_r"] == 0.5 and 3.5 <= base_stats["sched/cfg_w"] <= 4.5

    hits = _nan_in_fake(monkeypatch, st)
    for mode in ("faithful", "clean"):
        loss, stats = generator_loss(st.roles, st.fam, dataclasses.replace(s, nan_mode=mode), x_in, t_g, st.cond,
                                     st.uncond, 0, clone(g))
        assert math.isfinite(float(loss)), mode
        assert stats["dmd/nonfinite"] == 1.0, mode
        # the NaN entry contributes 0 instead of its g^2: the loss only drops
        assert float(loss) <= float(base_loss)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in st.roles.gen_parameters().values() if p.grad is not None)
        for p in st.roles.trainable():
            p.grad = None
    assert hits["n"] == 2

    # +inf: faithful maps it to float-max, the loss overflows (the official quirk); clean zeroes it
    _nan_in_fake(monkeypatch, st, float("inf"))
    loss, stats = generator_loss(st.roles, st.fam, s, x_in, t_g, st.cond, st.uncond, 0, clone(g))
    assert not math.isfinite(float(loss)) and stats["dmd/nonfinite"] == 1.0
    loss, stats = generator_loss(st.roles, st.fam, dataclasses.replace(s, nan_mode="clean"), x_in, t_g, st.cond,
                                 st.uncond, 0, clone(g))
    assert math.isfinite(float(loss)) and stats["dmd/nonfinite"] == 1.0


def _trainer(st: Setup, tmp_path, **plan_kw) -> Trainer:
    cfg = st.cfg
    d = cfg.distill
    settings = plan_kw.pop("dmd", dmd_settings(cfg))
    plan = TrainPlan(run_dir=tmp_path, stage="distill", max_steps=plan_kw.pop("max_steps", 2), lr_gen=d.lr,
                     lr_guide=d.lr_guide, seed=cfg.runtime.seed, resolution=cfg.model.resolution, dmd=settings,
                     checkpoint_every=100, sample_every=0, **plan_kw)
    stream = PromptStream(builtin_shapes(), d.batch_size, cfg.runtime.seed)
    return Trainer(st.bundle, st.roles, st.spec, plan, stream, NullSink(), make_accelerator(cfg), sample_prompts=[])


@pytest.mark.parametrize("mode", ["clean", "faithful"])
def test_trainer_clean_mode_skips_the_generator_step(sd3, tmp_path, monkeypatch, mode):
    st = sd3
    tr = _trainer(st, tmp_path, dmd=dataclasses.replace(dmd_settings(st.cfg), nan_mode=mode))
    _nan_in_fake(monkeypatch, st)
    gen0 = {n: p.detach().clone() for n, p in st.roles.gen_parameters().items()}
    guide0 = {n: p.detach().clone() for n, p in st.roles.guide_parameters().items()}
    for _ in range(5):
        assert tr.inner_step() is None
    stats = tr.inner_step()
    assert stats is not None and tr.k == 1 and tr.j == 6
    assert stats["dmd/nonfinite"] == 1.0
    gen_same = all(torch.equal(gen0[n], p) for n, p in st.roles.gen_parameters().items())
    if mode == "clean":
        assert stats["dmd/skipped"] == 1.0
        assert gen_same and len(tr.opt_g.state) == 0  # no optimiser step at all
    else:
        assert stats["dmd/skipped"] == 0.0
        assert not gen_same and len(tr.opt_g.state) == len(gen0)
    live = [n for n in guide0 if "lora_B" in n and DEAD not in n]
    assert len(live) == 14 and not any(torch.equal(guide0[n], st.roles.guide_parameters()[n]) for n in live)
    assert all(p.grad is None for p in st.roles.trainable())


# -- the sign of the DMD gradient ---------------------------------------------------------------------

@pytest.mark.parametrize("fake_is_generator", [False, True])
def test_dmd_update_moves_the_generator_the_right_way(sd3, monkeypatch, fake_is_generator):
    """One generator update moves x0_gen along x0_real - x0_fake (descent on L_dmd). With a fake score that
    models the generator exactly (x0_fake = x0_gen), it moves the generator towards the real score."""
    st = sd3
    perturb(st.roles.guide_parameters(), seed=8)
    x_in, t_g, g = _gen_input(st, seed=1)
    s = dmd_settings(st.cfg)
    seen = {}
    original = dmdr.dmd_loss

    def spy(x0, x0_fake, x0_real, *, nan_mode):
        if fake_is_generator:
            x0_fake = x0.detach().clone()
        seen.update(x0=x0.detach().clone(), fake=x0_fake.clone(), real=x0_real.clone())
        return original(x0, x0_fake, x0_real, nan_mode=nan_mode)

    monkeypatch.setattr(dmdr, "dmd_loss", spy)
    loss, stats = generator_loss(st.roles, st.fam, s, x_in, t_g, st.cond, st.uncond, 0, g)
    loss.backward()
    gen = list(st.roles.gen_parameters().values())
    grad_norm = float(torch.nn.utils.clip_grad_norm_(gen, 1e9))
    assert grad_norm > 0
    opt = torch.optim.SGD(gen, lr=0.05 / grad_norm)  # a fixed-length step in parameter space
    opt.step()

    x0_new = x0_of(st, "gen", x_in, t_g)
    x0_old = seen["x0"]
    torch.testing.assert_close(x0_of(st, "teacher", x_in, t_g), x0_old)  # gen B was 0: gen == teacher before
    delta = x0_new - x0_old
    assert delta.abs().mean() > 1e-5
    direction = seen["real"] - seen["fake"]
    cos = float((delta * direction).sum() / (delta.norm() * direction.norm()))
    assert cos > 0.05, cos
    if fake_is_generator:
        before = (x0_old - seen["real"]).abs().mean()
        after = (x0_new - seen["real"]).abs().mean()
        assert after < before, (float(after), float(before))
        assert float(((x0_new - seen["real"]) ** 2).mean()) < float(((x0_old - seen["real"]) ** 2).mean())


# -- TTUR counters -------------------------------------------------------------------------------------

def test_ttur_counters(sd3, tmp_path, monkeypatch):
    st = sd3
    tr = _trainer(st, tmp_path)
    calls = {"critic": 0, "gen": 0}
    real_critic, real_gen = trainer_mod.critic_loss, trainer_mod.generator_loss

    def critic(*a, **kw):
        calls["critic"] += 1
        return real_critic(*a, **kw)

    def gen(*a, **kw):
        calls["gen"] += 1
        return real_gen(*a, **kw)

    monkeypatch.setattr(trainer_mod, "critic_loss", critic)
    monkeypatch.setattr(trainer_mod, "generator_loss", gen)
    updates, logged = [], []
    for expected_j in range(11):
        assert tr.j == expected_j
        stats = tr.inner_step()
        assert calls["critic"] == expected_j + 1  # the critic at every inner step
        if stats is not None:
            updates.append(expected_j)
            logged.append(stats)
    assert updates == [5, 10]
    assert tr.k == 2 and tr.j == 11 and calls["gen"] == 2
    assert all(int(s["step"]) == 11 for s in tr.opt_c.state.values()) and len(tr.opt_c.state) == 30
    assert all(int(s["step"]) == 2 for s in tr.opt_g.state.values()) and len(tr.opt_g.state) == 30
    # schedules count generator steps: k = 0 then k = 1 of the 20-step horizon
    assert logged[0]["sched/lambda_r"] == pytest.approx(dynadg_scale(0, 20, 0.5))
    assert logged[1]["sched/lambda_r"] == pytest.approx(dynadg_scale(1, 20, 0.5))
    assert logged[1]["sched/lambda_r"] < logged[0]["sched/lambda_r"]
    for s in logged:
        assert {"loss/dmd", "loss/fake", "grad/gen_norm", "grad/guide_norm", "dmd/skipped"} <= set(s)
    # 11 inner steps consumed 11 batches of the prompt stream
    assert tr.stream.state()["epoch"] == 0 and tr.stream.state()["pos"] == 22


@pytest.mark.parametrize("grouped", [True, False])
def test_simulation_groups_follow_the_generator_updates(sd3, tmp_path, monkeypatch, grouped):
    """Inner steps that see the same generator weights (j = 0..5, then 6..10, 11..15 at ttur 5) share one
    batched backward simulation; each still gets its own prompt batch and rows; without grouping every inner
    step simulates on its own."""
    st = sd3
    tr = _trainer(st, tmp_path, group_simulation=grouped)
    sizes = []
    for j, expected in [(0, 6), (1, 5), (4, 2), (5, 1), (6, 5), (10, 1), (11, 5)]:
        tr.j = j
        sizes.append(tr.group_size())
        assert sizes[-1] == expected
    tr.j = 0
    batch_rows = []
    real = trainer_mod.simulate_and_select

    def counting(roles, family, spec, cond, *a, **kw):
        batch_rows.append(len(cond))
        return real(roles, family, spec, cond, *a, **kw)

    monkeypatch.setattr(trainer_mod, "simulate_and_select", counting)
    seen = []
    real_critic = trainer_mod.critic_loss

    def critic(roles, family, s, x_c, cond, k, gen):
        seen.append((x_c.shape[0], len(cond)))
        return real_critic(roles, family, s, x_c, cond, k, gen)

    monkeypatch.setattr(trainer_mod, "critic_loss", critic)
    for _ in range(11):
        tr.inner_step()
    b = st.cfg.distill.batch_size
    assert batch_rows == ([6 * b, 5 * b] if grouped else [b] * 11)
    assert seen == [(b, b)] * 11 and tr.k == 2 and not tr._pending
    assert tr.stream.state()["pos"] == 11 * b  # the same prompt batches in the same order either way


# -- generator loss: guidance interval of the real score -------------------------------------------------

def test_real_score_guidance_interval(sd3, monkeypatch):
    """``real_cfg_t_min``: rows renoised to t >= t_min get the guided real score, rows below the plain
    conditional one; the random stream (w, t_d, eps) is the same as without the interval."""
    st = sd3
    perturb(st.roles.guide_parameters(), seed=5)
    x_in, t_g, g = _gen_input(st, seed=2)
    s = dataclasses.replace(dmd_settings(st.cfg), dynadg=False)
    g_ref = clone(g)
    w = dmdr.sample_cfg_scale(s.real_cfg, s.cfg_jitter, g_ref)
    t_d = dmdr.draw_t(s, x_in.shape[0], 0, g_ref, x_in.device)
    t_min = float(t_d.mean())  # one row on each side (two rows, distinct draws)
    assert float(t_d.min()) < t_min <= float(t_d.max())
    seen = {}
    original = dmdr.dmd_loss

    def spy(x0, x0_fake, x0_real, *, nan_mode):
        seen.update(x0=x0.detach().clone(), real=x0_real.clone())
        return original(x0, x0_fake, x0_real, nan_mode=nan_mode)

    monkeypatch.setattr(dmdr, "dmd_loss", spy)
    _, stats = generator_loss(st.roles, st.fam, dataclasses.replace(s, real_cfg_t_min=t_min), x_in, t_g, st.cond,
                              st.uncond, 0, clone(g))
    assert stats["sched/cfg_w"] == pytest.approx(w)
    eps = torch.randn(x_in.shape, generator=g_ref)
    tt = t_d.view(-1, 1, 1, 1)
    x_td = (1 - tt) * seen["x0"] + tt * eps
    with torch.no_grad(), st.roles.role("real", 0.0) as net:
        out_c = st.fam.predict(net, x_td, t_d, st.cond)
        out_u = st.fam.predict(net, x_td, t_d, st.uncond.expand(2))
    guided = st.fam.to_x0(x_td, out_u + w * (out_c - out_u), t_d)
    plain = st.fam.to_x0(x_td, out_c, t_d)
    above = t_d >= t_min
    torch.testing.assert_close(seen["real"][above], guided[above], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(seen["real"][~above], plain[~above], atol=1e-4, rtol=1e-4)
    assert (guided[~above] - plain[~above]).abs().max() > 1e-3  # the two targets really differ there

    # t_min = 0 is the official everywhere-CFG target; the interval is refused outside [0, 1)
    generator_loss(st.roles, st.fam, s, x_in, t_g, st.cond, st.uncond, 0, clone(g))
    torch.testing.assert_close(seen["real"], guided, atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="real_cfg_t_min"):
        resolve("tiny-sd3-random", sets=["distill.real_cfg_t_min=1.0"])
