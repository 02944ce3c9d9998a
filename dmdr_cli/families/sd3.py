"""SD3 family (SD3-Medium, SD3.5-Medium/Large): rectified flow, ``SD3Transformer2DModel``.

ALGORITHM.md 1.2/1.4: ``x_t = (1 - t) x0 + t eps``, the network predicts ``v = eps - x0``,
``x0_hat = x_t + (x0_end - t) v_hat`` (``x0_end`` = 0.001 faithful, 0 clean), network time ``round(1000 t)``.
Prompt encoding: CLIP-L + CLIP-G penultimate states and T5 (``max_sequence_length`` 128), pooled =
both CLIP pooled outputs; the unconditional branch is the encoding of "".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dmdr_cli.families.base import Bundle, Cond, bcast
from dmdr_cli.schedules.grids import flow_student_grid, flow_teacher_grid, flow_time_input

LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)


class ZeroTokenAttnProcessor:
    """diffusers' ``JointAttnProcessor2_0`` plus an additive attention-logit bias on the context keys.

    Without T5, SD3's ``encode_prompt`` appends ``max_sequence_length`` all-zero "T5" tokens. They enter the joint
    blocks identical and stay identical (the context stream has no positional embedding), so as keys/values they
    are exactly ONE token whose attention logit weighs ``log N`` more, and their own outputs are copies. dmdr
    therefore encodes one zero token and adds ``log N`` to its logit: the same network function at a fraction
    of the context length (160 -> 33 tokens for the digits teacher). ``bias`` (``[B|1, 1, 1, S]``) overrides
    the fixed ``log_n`` on the last key (the digits-teacher trainer draws ``N`` per sample).
    """

    def __init__(self, log_n: float | None = None) -> None:
        self.log_n = log_n
        self.bias: torch.Tensor | None = None

    def _mask(self, n_keys: int, like: torch.Tensor) -> torch.Tensor | None:
        if self.bias is not None:
            return self.bias.to(like.dtype)
        if self.log_n is None:
            return None
        mask = torch.zeros(1, 1, 1, n_keys, dtype=like.dtype, device=like.device)
        mask[..., -1] = self.log_n
        return mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        import torch.nn.functional as F

        b, n_img = hidden_states.shape[0], hidden_states.shape[1]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        mask = None
        if encoder_hidden_states is not None:
            cq = heads(attn.add_q_proj(encoder_hidden_states))
            ck = heads(attn.add_k_proj(encoder_hidden_states))
            cv = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
            mask = self._mask(k.shape[2], q)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1]).to(q.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        hs, ctx = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            ctx = attn.to_add_out(ctx)
        return attn.to_out[1](attn.to_out[0](hs)), ctx


class SD3Family:
    """Flow-matching family. One instance per run; holds the run's shift and x0 end point."""

    name = "sd3"
    lora_targets = LORA_TARGETS

    def __init__(self, shift: float = 3.0, x0_end: float = 0.001, max_sequence_length: int = 128,
                 use_t5: bool = True) -> None:
        self.shift = shift
        self.x0_end = x0_end
        self.max_sequence_length = max_sequence_length
        self.use_t5 = use_t5

    # -- loading -----------------------------------------------------------------------------
    def load(self, folder: str, *, device: torch.device, dtype: torch.dtype, source: str) -> Bundle:
        from diffusers import StableDiffusion3Pipeline

        kwargs: dict[str, Any] = {}
        if not self.use_t5 or not (Path(folder) / "text_encoder_3").is_dir():
            kwargs.update(text_encoder_3=None, tokenizer_3=None)
        pipe = StableDiffusion3Pipeline.from_pretrained(folder, dtype=dtype, local_files_only=True, **kwargs)
        pipe.to(device)
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            if module is not None:
                module.requires_grad_(False).eval()
        pipe.set_progress_bar_config(disable=True)
        pipe.vae.to(memory_format=torch.channels_last)  # VAE convolutions ~15-30% faster (CPU and CUDA alike)
        t5 = pipe.text_encoder_3 is not None
        if not t5 and self.max_sequence_length > 1:  # exact: N zero tokens = one token with +log N (see above)
            import math

            pipe.transformer.set_attn_processor(ZeroTokenAttnProcessor(math.log(self.max_sequence_length)))
        return Bundle(self, pipe, source, str(folder), device, dtype, {"t5": t5})

    def network_of(self, pipe: Any) -> torch.nn.Module:
        return pipe.transformer

    def latent_shape(self, bundle: Bundle, resolution: int) -> tuple[int, int, int]:
        f = 2 ** (len(bundle.pipe.vae.config.block_out_channels) - 1)
        return (bundle.pipe.transformer.config.in_channels, resolution // f, resolution // f)

    # -- conditioning --------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, bundle: Bundle, prompts: list[str]) -> Cond:
        compact = not bundle.info.get("t5", True)  # one zero "T5" token stands for max_sequence_length of them
        embeds, _, pooled, _ = bundle.pipe.encode_prompt(
            prompt=prompts, prompt_2=prompts, prompt_3=prompts, device=bundle.device,
            do_classifier_free_guidance=False, max_sequence_length=1 if compact else self.max_sequence_length,
        )
        return Cond({"encoder_hidden_states": embeds.to(bundle.dtype), "pooled_projections": pooled.to(bundle.dtype)})

    # -- noise schedule (all in fp32) ----------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``renoise(x, t, eps) = (1 - t) x + t eps``."""
        tt = bcast(t, x0)
        return ((1 - tt) * x0.float() + tt * noise.float()).to(x0.dtype)

    def predict(self, net: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Velocity ``v_hat`` at continuous time ``t`` (network input ``round(1000 t)``)."""
        dtype = next(net.parameters()).dtype
        out = net(
            hidden_states=x_t.to(dtype),
            timestep=flow_time_input(t.to(x_t.device)),  # fp32: bf16 would turn round(1000 t) = 898 into 896
            encoder_hidden_states=cond.tensors["encoder_hidden_states"].to(dtype),
            pooled_projections=cond.tensors["pooled_projections"].to(dtype),
            return_dict=False,
        )[0]
        return out

    def to_x0(self, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x0_hat = x_t + (x0_end - t) v_hat`` in fp32."""
        return x_t.float() + (self.x0_end - bcast(t, x_t)) * out.float()

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Flow-matching target ``v = eps - x0``."""
        return noise.float() - x0.float()

    def eps_from(self, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``eps_hat`` such that ``x_t = (1 - t) x0_hat + t eps_hat`` with this family's ``to_x0``:
        ``eps_hat = x_t - (1 - t)(x0_end - t)/t v_hat`` (= ``x_t + (1 - t) v_hat`` when ``x0_end = 0``)."""
        tt = bcast(t, x_t)
        return x_t.float() - (1 - tt) * (self.x0_end - tt) / tt * out.float()

    def noise_std(self, t: torch.Tensor) -> torch.Tensor:
        """Noise level of ``x_t``: ``t``."""
        return t.float()

    def ode_step(self, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor, t_next: float) -> torch.Tensor:
        """Euler step ``x_{t'} = x_t + (t' - t) v_hat``."""
        return x_t.float() + (t_next - bcast(t, x_t)) * out.float()

    # -- grids -----------------------------------------------------------------------------------
    def student_grid(self, steps: int, grid: list, grid_dtype: str) -> list[float]:
        if grid:
            return [float(v) for v in grid]
        return flow_student_grid(steps, self.shift, t_end=self.x0_end, dtype=grid_dtype)

    def student_end(self) -> float:
        return self.x0_end

    def teacher_grid(self, steps: int) -> list[float]:
        return flow_teacher_grid(steps, self.shift)

    # -- latent codec --------------------------------------------------------------------------
    def decode(self, bundle: Bundle, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1]: ``D(z / scaling + shift)`` (gradients flow if enabled)."""
        vae = bundle.pipe.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        img = vae.decode(z, return_dict=False)[0]
        return ((img.float() + 1) / 2).clamp(0, 1)

    def encode_images(self, bundle: Bundle, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> latents ``(E(img) - shift) * scaling`` (posterior mode)."""
        vae = bundle.pipe.vae
        post = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist
        return (post.mode() - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
