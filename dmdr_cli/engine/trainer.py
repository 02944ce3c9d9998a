"""The training loop shared by ``distill`` (stage 1) and ``finetune-rl`` (stage 2).

Counters: ``j`` inner steps (one critic update each), ``k`` generator updates (every ``ttur``-th inner
step, j > 0). Every schedule, ``max_steps``, checkpoint and sample cadence counts ``k``.

Distributed: the base network is not DDP-wrapped; after each ``backward()`` the trainable LoRA
gradients are all-reduced (mean) by hand (ALGORITHM.md 2.2). Each rank draws its own noise, times and
CFG scales from ``seed + rank``; only rank 0 writes files.
"""

from __future__ import annotations

import resource
import signal
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from dmdr_cli.engine import checkpoint as ckpt_io
from dmdr_cli.engine.dmdr import DMDSettings, critic_loss, generator_loss, simulate_and_select
from dmdr_cli.engine.ema import EMA, ema_copy, ema_update
from dmdr_cli.engine.networks import GEN, GUIDE
from dmdr_cli.engine.regression import regression_loss
from dmdr_cli.engine.sampler import PromptEncodings
from dmdr_cli.errors import DmdrError


PENDING_ROWS = ("x_c", "x_in", "t_g")  # the tensors of a pending inner step, as saved in pending.safetensors


class TrainingDiverged(DmdrError):
    """A non-finite loss: the run stops, the last good checkpoint stays intact."""


@dataclass
class TrainPlan:
    """Flat training settings (built from the config by a recipe)."""

    run_dir: Path
    stage: str
    max_steps: int                  # absolute generator step to stop at
    lr_gen: float
    lr_guide: float
    wd_gen: float = 0.01
    wd_guide: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    use_8bit_adam: bool = False
    checkpoint_every: int = 500
    sample_every: int = 100
    keep_last: int = 3
    sde_input: str = "official"
    seed: int = 30
    resolution: int = 512
    dmd: DMDSettings = field(default_factory=DMDSettings)
    identity: dict = field(default_factory=dict)
    stage_start: int = 0            # generator step this stage started at (stage 2: the stage-1 step)
    ema_decay: float = 0.0          # EMA of the generator weights (engine.ema); 0 = none, as the official recipes
    group_simulation: bool = True   # one batched backward simulation per generator state (Trainer._next_inputs)
    regression_weight: float = 0.0  # teacher-trajectory regression (engine.regression), with Trainer.pairs
    regression_batch: int = 8
    regression_t_max: float = 1.0


def _adamw(params, lr, wd, plan: TrainPlan, device):
    if plan.use_8bit_adam and device.type == "cuda":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=lr, betas=plan.betas, eps=plan.adam_eps, weight_decay=wd)
        except ImportError:
            pass
    return torch.optim.AdamW(params, lr=lr, betas=plan.betas, eps=plan.adam_eps, weight_decay=wd)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Trainer:
    def __init__(self, bundle, roles, spec, plan: TrainPlan, stream, sink, accel, sample_prompts: list[str],
                 rl_fn: Callable | None = None) -> None:
        self.bundle, self.family, self.roles, self.spec = bundle, bundle.family, roles, spec
        self.plan, self.stream, self.sink, self.accel = plan, stream, sink, accel
        self.sample_prompts, self.rl_fn = sample_prompts, rl_fn
        self.device = bundle.device
        self.rank, self.world = accel.process_index, accel.num_processes
        self.is_main = accel.is_main_process
        self.gen = torch.Generator().manual_seed(plan.seed + self.rank)
        self.opt_g = _adamw(list(roles.gen_parameters().values()), plan.lr_gen, plan.wd_gen, plan, self.device)
        self.opt_c = _adamw(list(roles.guide_parameters().values()), plan.lr_guide, plan.wd_guide, plan, self.device)
        self.k = 0
        self.j = 0
        self.last_saved: Path | None = None
        self.latent_shape = self.family.latent_shape(bundle, plan.resolution)
        self.uncond = self.family.encode_prompts(bundle, [""])
        self.encode = PromptEncodings(self.family, bundle)
        self.ema = ema_copy(roles.gen_parameters()) if plan.ema_decay > 0 else None
        self.ema_updates = 0
        self._pending: deque = deque()  # (prompts, x_c, x_in, t_g) of this generator state's remaining inner steps
        self.pairs = None               # TeacherPairs of the regression term (set by the recipe iff its weight > 0)

    # -- state ------------------------------------------------------------------------------------
    def set_lrs(self) -> dict[str, float]:
        """Re-apply this stage's learning rates (loading optimiser state restores the saved ones)."""
        for g in self.opt_g.param_groups:
            g["lr"] = self.plan.lr_gen
        for g in self.opt_c.param_groups:
            g["lr"] = self.plan.lr_guide
        return {"lr/gen": self.plan.lr_gen, "lr/guide": self.plan.lr_guide}

    def restore(self, ckpt: Path, *, same_stage: bool) -> None:
        """Load adapters, optimiser states and counters; for ``same_stage`` also RNG and prompt position."""
        state = ckpt_io.read_state(ckpt)
        ckpt_io.check_identity(state, self.plan.identity, ckpt)
        tensors = ckpt_io.load_groups(ckpt)
        saved_ema = tensors.pop(EMA, None)
        pending = tensors.pop(ckpt_io.PENDING, None)
        if saved_ema is not None and not same_stage:  # a new stage continues from the student, the previous EMA
            tensors[GEN] = saved_ema
        try:
            self.roles.load_adapter_state(tensors)
        except KeyError as exc:
            raise ckpt_io.CheckpointError(f"checkpoint {ckpt} does not fit this model: {exc}",
                                          "resume with the preset and LoRA ranks it was trained with") from None
        if self.ema is not None:
            self.ema = ema_copy(self.roles.gen_parameters())
            self.ema_updates = 0
            if same_stage and saved_ema is not None:
                with torch.no_grad():
                    for n, v in self.ema.items():
                        v.copy_(saved_ema[n])
                self.ema_updates = int(state.get("ema_updates", 0))
        optim, rng = ckpt_io.load_extras(ckpt)
        self.opt_g.load_state_dict(optim[GEN])
        self.opt_c.load_state_dict(optim[GUIDE])
        self.k, self.j = int(state["k"]), int(state["j"])
        if same_stage:
            states = rng["train_gen"]
            if len(states) == self.world:
                self.gen.set_state(states[self.rank])
            ckpt_io.restore_global_rng(rng)
            self.stream.restore(state["prompt_stream"])
            if pending is not None:
                self._queue(state.get("pending_prompts", []), *(pending[n].to(self.device) for n in PENDING_ROWS))
        self.sink.event(f"resumed from {ckpt.name} (k={self.k}, j={self.j}); " +
                        ", ".join(f"{k}={v:g}" for k, v in self.set_lrs().items()) +
                        ("; generator from its EMA weights" if saved_ema is not None and not same_stage else ""))

    def _queue(self, batches: list[list[str]], x_c: torch.Tensor, x_in: torch.Tensor, t_g: torch.Tensor) -> None:
        """Split one group's simulated rows back into its inner steps' (prompts, x_c, x_in, t_g)."""
        at = 0
        for b in batches:
            rows = slice(at, at + len(b))
            self._pending.append((list(b), x_c[rows], x_in[rows], t_g[rows]))
            at += len(b)

    def _check_ranks_in_sync(self) -> None:
        """All ranks must hold the same trainable weights (gradients are all-reduced, not weights): a plain
        multi-process launch without a process group would silently train independent copies."""
        if self.world == 1:
            return
        total = sum(float(p.detach().double().sum()) for p in self.roles.trainable())
        sums = self._gather([total])
        if max(sums) - min(sums) > 1e-6 * max(1.0, abs(sums[0])):
            raise DmdrError(f"ranks hold different weights ({sums}); gradients are not being synchronised",
                            "launch with `accelerate launch --multi_gpu` or torchrun so a process group exists")

    def save(self) -> Path | None:
        named = [*self.roles.gen_parameters().items(), *self.roles.guide_parameters().items(),
                 *((f"{EMA}:{n}", v) for n, v in (self.ema or {}).items())]
        bad = [n for n, p in named if not torch.isfinite(p).all()]
        if bad:  # never replace a good checkpoint with broken weights
            where = f"the last good checkpoint is {self.last_saved}" if self.last_saved else "no checkpoint was written yet"
            raise TrainingDiverged(f"{len(bad)} trainable tensors became non-finite at generator step {self.k} "
                                   f"(e.g. {bad[0]}); {where}", "lower the learning rates")
        self._check_ranks_in_sync()
        states = self._gather([self.gen.get_state()])
        if self.is_main:
            state = {"j": self.j, "stage": self.plan.stage, "stage_start": self.plan.stage_start, "world": self.world,
                     "prompt_stream": self.stream.state(),
                     "grid": list(self.spec.grid), "t_end": self.spec.t_end, "mode": self.spec.mode,
                     "schedule": {"dynamic_steps": self.plan.dmd.dynamic_steps}, **self.plan.identity}
            tensors = self.roles.adapter_state()
            if self.ema is not None:
                tensors[EMA] = {n: v.detach().cpu().clone() for n, v in self.ema.items()}
                state.update(ema_decay=self.plan.ema_decay, ema_updates=self.ema_updates)
            if self._pending and self.world == 1:  # inside a simulation group (an immediate interrupt):
                # keep its samples so the resume is exact (several ranks redraw theirs)
                tensors[ckpt_io.PENDING] = {name: torch.cat([item[i + 1] for item in self._pending]).detach().cpu()
                                            for i, name in enumerate(PENDING_ROWS)}
                state["pending_prompts"] = [item[0] for item in self._pending]
            optim = {GEN: self.opt_g.state_dict(), GUIDE: self.opt_c.state_dict()}
            self.last_saved = ckpt_io.save(self.plan.run_dir, self.k, tensors, optim,
                                           _RankStates(states), state, self.plan.keep_last)
            self.sink.event(f"checkpoint {self.last_saved.name}")
        self.accel.wait_for_everyone()
        return self.last_saved

    def _gather(self, obj: list):
        if self.world == 1:
            return obj
        from accelerate.utils import gather_object

        return gather_object(obj)

    # -- one inner step ---------------------------------------------------------------------------
    def group_size(self) -> int:
        """Inner steps from ``j`` up to and including the next generator update (``j % ttur == 0, j > 0``): they
        all simulate the same generator weights (ttur + 1 for the first group, ttur after each update)."""
        ttur = self.plan.dmd.ttur
        return max(ttur, -(-self.j // ttur) * ttur) - self.j + 1

    def _next_inputs(self):
        """Prompts, ``x_c``, ``x_in`` and ``t_g`` of the next inner step.

        The generator changes only at its update, so the backward simulations of the inner steps up to it are
        independent draws from one generator state: with ``group_simulation`` they run as one batch (their
        prompt batches concatenated; same distribution, one set of network calls instead of ``group_size``,
        2.3-2.5x faster simulation on tiny-sd3). The random draws then come in a different order than one
        simulation per inner step, so the two settings train different (equally valid) trajectories."""
        if not self._pending:
            n = self.group_size() if self.plan.group_simulation else 1
            batches = [self.stream.next() for _ in range(n)]
            flat = [p for b in batches for p in b]
            x_c, x_in, t_g, _ = simulate_and_select(self.roles, self.family, self.spec, self.encode(flat),
                                                    self.latent_shape, self.gen, self.device, self.bundle.dtype,
                                                    self.plan.sde_input)
            self._queue(batches, x_c, x_in, t_g)
        return self._pending.popleft()

    def _sync_grads(self, params) -> None:
        if self.world == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
            p.grad /= self.world

    def _check_finite(self, loss: torch.Tensor, name: str) -> None:
        if not torch.isfinite(loss):
            where = f"the last good checkpoint is {self.last_saved}" if self.last_saved else "no checkpoint was written yet"
            raise TrainingDiverged(f"{name} became {float(loss.detach())} at generator step {self.k} (inner step {self.j}); {where}",
                                   "lower the learning rates, or try --set distill.nan_mode=clean")

    def inner_step(self) -> dict | None:
        s = self.plan.dmd
        prompts, x_c, x_in, t_g = self._next_inputs()
        cond = self.encode(prompts)
        guide = list(self.roles.guide_parameters().values())
        gen = list(self.roles.gen_parameters().values())
        with self.accel.autocast():
            loss_c, cstats = critic_loss(self.roles, self.family, s, x_c, cond, self.k, self.gen)
        self._check_finite(loss_c, "the fake-score loss")
        loss_c.backward()
        self._sync_grads(guide)
        cstats["grad/guide_norm"] = float(torch.nn.utils.clip_grad_norm_(guide, s.grad_clip))
        self.opt_c.step()
        self.opt_c.zero_grad(set_to_none=True)
        self.opt_g.zero_grad(set_to_none=True)
        stats = None
        if self.j % s.ttur == 0 and self.j > 0:
            rl = (lambda x0: self.rl_fn(x0, prompts, cond, self.gen)) if self.rl_fn is not None else None
            with self.accel.autocast():
                loss_g, stats = generator_loss(self.roles, self.family, s, x_in, t_g, cond, self.uncond, self.k, self.gen, rl)
                if self.pairs is not None:
                    loss_r, rstats = regression_loss(self.roles, self.family, self.pairs, self.plan.regression_batch,
                                                     self.gen, self.encode, self.plan.regression_t_max)
                    loss_g = loss_g + self.plan.regression_weight * loss_r
                    stats.update(rstats)
            self._check_finite(loss_g, "the generator loss")
            loss_g.backward()
            self._sync_grads(gen)
            stats["grad/gen_norm"] = float(torch.nn.utils.clip_grad_norm_(gen, s.grad_clip))
            skip = s.nan_mode == "clean" and stats.get("dmd/nonfinite", 0) > 0
            if not skip:
                self.opt_g.step()
                if self.ema is not None:
                    self.ema_updates += 1
                    stats["ema/decay"] = ema_update(self.ema, self.roles.gen_parameters(), self.plan.ema_decay,
                                                    self.ema_updates)
            stats["dmd/skipped"] = float(skip)
            self.opt_g.zero_grad(set_to_none=True)
            self.opt_c.zero_grad(set_to_none=True)
            self.k += 1
            stats.update(cstats)
        self.j += 1
        return stats

    @contextmanager
    def _ema_weights(self):
        """With an EMA, the generator holds the EMA weights inside the block (the student the grids should show)
        and its own weights again, bit for bit, after it."""
        if self.ema is None:
            yield
            return
        params = self.roles.gen_parameters()
        saved = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.ema[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n])

    # -- samples ------------------------------------------------------------------------------------
    def write_samples(self) -> Path | None:
        if not self.is_main or not self.sample_prompts:
            return None
        from dmdr_cli.engine.images import make_grid, save_png, to_pil
        from dmdr_cli.engine.sampler import generate

        with self._ema_weights(), self.roles.role("gen") as net:
            imgs = generate(self.bundle, net, self.spec, self.sample_prompts, list(range(len(self.sample_prompts))),
                            self.plan.resolution)
        path = save_png(make_grid([to_pil(i) for i in imgs]), self.plan.run_dir / "samples" / f"step-{self.k:06d}.png")
        self.sink.event(f"samples {path.name}")
        return path

    # -- loop ---------------------------------------------------------------------------------------
    @contextmanager
    def _deferred_interrupt(self):
        """The first Ctrl-C only sets a flag, honoured at the next simulation-group boundary (after a generator
        update, at most ``ttur + 1`` inner steps away): a checkpoint taken mid-step would hold a half-updated
        state, one taken mid-group would lose the group's simulated samples. A second Ctrl-C interrupts at once
        (that checkpoint resumes, but not bit-exactly).
        """
        self._interrupted = False
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._interrupted:
                raise KeyboardInterrupt
            self._interrupted = True

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def run(self) -> Path | None:
        with self._deferred_interrupt():
            return self._run()

    def _run(self) -> Path | None:
        plan = self.plan
        self.sink.start(plan.max_steps, self.k, plan.stage)
        self.sink.event(f"{self.world} process(es) on {self.device}, batch {self.stream.batch_size} per process")
        t_last = time.perf_counter()
        try:
            if self.k == 0 and plan.sample_every > 0:
                self.write_samples()
            while self.k < plan.max_steps:
                if self._interrupted and not self._pending:  # at a group boundary: the checkpoint resumes exactly
                    raise KeyboardInterrupt
                stats = self.inner_step()
                if stats is None:
                    continue
                now = time.perf_counter()
                stats.update({"lr/gen": self.opt_g.param_groups[0]["lr"], "lr/guide": self.opt_c.param_groups[0]["lr"],
                              "mem/peak_mb": peak_memory_mb(self.device), "time/step_s": now - t_last, "time/inner": self.j})
                t_last = now
                if self.is_main:
                    self.sink.log(self.k, stats)
                if plan.sample_every > 0 and self.k % plan.sample_every == 0:
                    self.write_samples()
                if (plan.checkpoint_every > 0 and self.k % plan.checkpoint_every == 0) or self.k == plan.max_steps:
                    self.save()
        except KeyboardInterrupt:
            if self.last_saved is None or not self.last_saved.name.endswith(f"{self.k:06d}"):
                self.sink.event("interrupted: writing a checkpoint")
                self.save()
            raise
        finally:
            self.sink.close()
        return self.last_saved


class _RankStates:
    """Adapter so ``checkpoint.save`` stores every rank's generator state under ``train_gen``."""

    def __init__(self, states: list) -> None:
        self.states = states

    def get_state(self):
        return self.states

