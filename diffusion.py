"""DDPM (Ho et al. 2020) with the cosine schedule of Nichol & Dhariwal (2021), as the assignment defines it.

Equation and algorithm numbers refer to the assignment handout (CMU 10-423 Homework 2, programming section).

Conventions:
- Timesteps are 0-indexed: code index ``t = 0 ... T-1`` stands for the paper's ``t = 1 ... T``. So
  ``alphas_cumprod[t]`` is the paper's alpha_bar_{t+1}, and ``alphas_cumprod_prev[0] = 1`` is alpha_bar_0.
- Images inside the model are in [-1, 1]; images returned by the samplers are in [0, 1].
- Every per-timestep coefficient is computed once in float64 (``coefficients``) and stored as a float32 buffer
  named after the math, so ``.to(device)`` moves the whole schedule with the network.
- The samplers (``sampling/samplers.py``) all run in the one loop of ``Diffusion.run_chain``; DDPM's step is
  Algorithm 2's (``reverse_step``).

This module imports torch and the samplers only: no settings, files, downloads or logging.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sampling.samplers import chain_plan, sampler_named

# The losses on the predicted noise, by name: Algorithm 1's is L1 (the assignment's).
LOSSES = {"l1": F.l1_loss, "l2": F.mse_loss, "huber": F.smooth_l1_loss}


def cosine_alphas(timesteps: int, *, s: float = 0.008) -> torch.Tensor:
    """alpha_t of Eq. (16) for paper t = 1 ... T, in float64: clip(alpha_bar_t / alpha_bar_{t-1}, 0.001, 1)."""
    t = torch.arange(timesteps + 1, dtype=torch.float64)
    f = torch.cos((t / timesteps + s) / (1 + s) * math.pi / 2) ** 2
    alphas_bar = f / f[0]  # paper alpha_bar_t = f(t) / f(0), t = 0 ... T
    return (alphas_bar[1:] / alphas_bar[:-1]).clamp(0.001, 1.0)


def extract(a: torch.Tensor, t: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor:
    """Pick ``a[t]`` for each batch element and shape it [B, 1, 1, ...] to broadcast against ``x_shape``."""
    return a.gather(-1, t).reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def coefficients(timesteps: int) -> dict[str, torch.Tensor]:
    """Every coefficient of the forward process, the posterior and the samplers for T = ``timesteps``, by the name
    of its math, in float64 [T]."""
    alphas = cosine_alphas(timesteps)  # Eq. (16)
    betas = 1.0 - alphas
    alphas_cumprod = torch.cumprod(alphas, dim=0)  # Eq. (17): alpha_bar_t = prod_{i <= t} alpha_i
    alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)
    # Eq. (18): posterior q(x_{t-1} | x_t, x_0); at paper t = 1 its variance is 0.
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    return {
        "betas": betas,
        "alphas": alphas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas": alphas.sqrt(),
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "sqrt_recip_alphas_cumprod": alphas_cumprod.rsqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
        "posterior_variance": posterior_variance,
        # log(0) at paper t = 1 is replaced by the next step's value, as in improved-diffusion.
        "posterior_log_variance_clipped": torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
        "posterior_mean_coef1": alphas_cumprod_prev.sqrt() * betas / (1.0 - alphas_cumprod),  # multiplies x_0
        "posterior_mean_coef2": alphas.sqrt() * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod),  # x_t
    }


def kept_input(x0: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """What a mask-conditional network is given of an image to inpaint: ``x0`` ([B, C, H, W] in [-1, 1]) with the
    hole zeroed, and ``keep`` ([B, 1, H, W], 1 where kept); [B, C + 1, H, W]."""
    keep = keep.to(x0.dtype)
    return torch.cat([x0 * keep, keep], dim=1)


class Diffusion(nn.Module):
    """Wraps a noise-prediction network ``model(x_t, t) -> eps`` with the forward and reverse processes.

    ``model`` is the network eps_theta (``self.model``), called with x_t in [-1, 1] and 0-indexed t; images are
    ``channels`` x ``image_size`` x ``image_size``; T = ``timesteps``; ``loss_type`` is ``"l1"`` (the
    assignment's, default), ``"l2"`` or ``"huber"``.

    A ``model`` whose ``self_condition`` attribute is true is called as ``model(x_t, t, x_self_cond)`` with an
    estimate of x_0 beside x_t (self-conditioning, Chen et al. 2023): in training, half of every batch gets the
    network's own estimate from a first pass without gradients and the other half zeros (see
    ``self_condition_estimate``); in sampling, every step gets the clamped x_0 estimate of the step before it
    (zeros at the first step).

    A ``model`` whose ``num_classes`` K is positive is class-conditional: it is called with labels ``y`` as well
    (0 ... K-1, or K = ``null_class`` for "no class"). Training replaces each label by "no class" with
    probability ``class_dropout``, so that one network learns both eps(x_t, c) and eps(x_t, none); sampling with
    a guidance scale w > 0 uses classifier-free guidance (Ho & Salimans 2022) in the convention

        eps = (1 + w) eps(x_t, c) - w eps(x_t, none),

    w = 0 being the plain conditional model; both predictions come from one pass over a doubled batch.

    A ``model`` whose ``mask_conditional`` attribute is true also takes the kept pixels of an image to inpaint
    (``kept_input``; zeros: nothing kept). ``seeing(x0, keep)`` is the model given them for every prediction;
    training gives each image a random hole (``training.masks``), so one network both samples and inpaints.
    """

    def __init__(self, model: nn.Module, *, image_size: int, channels: int = 3, timesteps: int = 1000,
                 loss_type: str = "l1", class_dropout: float = 0.0):
        super().__init__()
        if not isinstance(timesteps, int) or timesteps < 2:
            raise ValueError(f"timesteps (T) must be an integer of at least 2, got {timesteps!r}")
        if not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        if loss_type not in LOSSES:
            raise ValueError(f"loss_type must be one of {tuple(LOSSES)}, got {loss_type!r}")
        if hasattr(model, "check_image_size"):
            model.check_image_size(image_size)
        self.model = model
        self.self_condition = bool(getattr(model, "self_condition", False))
        self.num_classes = int(getattr(model, "num_classes", 0))
        self.mask_conditional = bool(getattr(model, "mask_conditional", False))
        self.kept: torch.Tensor | None = None  # what a mask-conditional model sees of the image (``seeing``)
        if not 0.0 <= class_dropout < 1.0:
            raise ValueError(f"class_dropout must be in [0, 1), got {class_dropout}")
        self.class_dropout = class_dropout
        self.image_size, self.channels = image_size, channels
        self.num_timesteps, self.loss_type = timesteps, loss_type
        for name, value in coefficients(timesteps).items():  # Eqs. (16) to (18), as float32 buffers
            self.register_buffer(name, value.to(torch.float32))
        # The training images' mean (``set_data_mean``): the x_0 estimate at the last timestep once known.
        self.register_buffer("data_mean", None, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.betas.device

    @property
    def null_class(self) -> int:
        """The label of "no class" (K) of a class-conditional model."""
        return self.num_classes

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, x_self_cond: torch.Tensor | None = None,
                      y: torch.Tensor | None = None, guidance: float = 0.0) -> torch.Tensor:
        """eps_theta(x_t, t): the network's prediction of the noise in x_t.

        ``x_self_cond`` is the x_0 estimate handed to a self-conditioned network (None: zeros); a network
        without self-conditioning is called without it. ``y``: class labels of a class-conditional network (None:
        "no class"). ``guidance`` w > 0: (1 + w) eps(x_t, y) - w eps(x_t, none), both from one pass over the
        batch twice (the conditional half, then the "no class" half).
        """
        if not guidance:
            return self._network(x_t, t, x_self_cond, y, self.kept)
        if guidance < 0:
            raise ValueError(f"the guidance scale must be non-negative, got {guidance}")
        if y is None or not self.num_classes:
            raise ValueError("classifier-free guidance needs a class-conditional model and class labels")
        twice = (lambda v: None if v is None else torch.cat([v, v]))
        eps = self._network(twice(x_t), twice(t), twice(x_self_cond), torch.cat([y, torch.full_like(y, self.null_class)]),
                            twice(self.kept))
        conditional, unconditional = eps.chunk(2)
        return conditional + guidance * (conditional - unconditional)

    def _network(self, x_t, t, x_self_cond, y, kept) -> torch.Tensor:
        args = (x_t, t, x_self_cond) if self.self_condition else (x_t, t)
        extra = {"kept": kept} if self.mask_conditional else {}
        if self.num_classes:
            return self.model(*args, y=y, **extra)
        if y is not None:
            raise ValueError("class labels were given to a model that is not class-conditional")
        return self.model(*args, **extra)

    def seeing(self, x0: torch.Tensor, keep: torch.Tensor) -> Diffusion:
        """This mask-conditional model given the pixels of ``x0`` ([B, C, H, W] in [-1, 1]) where ``keep`` ([B, 1 or
        C, H, W]) is 1, for every prediction over those B images: a shallow copy that shares the network and the
        schedule, made for one chain or one training batch."""
        if not self.mask_conditional:
            raise ValueError("only a mask-conditional model can be given kept pixels (train with --mask_conditional)")
        return self._given(kept_input(x0, keep[:, :1]))

    def _given(self, kept: torch.Tensor | None) -> Diffusion:
        view = copy.copy(self)
        view.kept = kept
        return view

    def set_data_mean(self, means: torch.Tensor | None) -> None:
        """Give the model its training images' mean in [-1, 1]: [K + 1, C, S, S], each class's mean by label and the
        mean over all images last (an unconditional model: [1, C, S, S]). ``predict_start`` estimates x_0 with it
        at the last timestep. A mean of the same shape is copied into the one held, so that a captured CUDA graph
        reads the new values; None forgets it."""
        if means is None:
            self.data_mean = None
            return
        shape = (self.num_classes + 1, self.channels, self.image_size, self.image_size)
        if tuple(means.shape) != shape:
            raise ValueError(f"the data mean must have shape {list(shape)}, got {list(means.shape)}")
        if self.data_mean is not None:  # of the checked shape too
            self.data_mean.copy_(means)
        else:
            self.data_mean = means.detach().to(self.device, torch.float32).clone()

    def drop_labels(self, y: torch.Tensor) -> torch.Tensor:
        """Training labels with each replaced by "no class" with probability ``class_dropout`` (one uniform draw
        per label, on the labels' device)."""
        dropped = torch.rand(y.shape, device=y.device) < self.class_dropout
        return torch.where(dropped, torch.full_like(y, self.null_class), y)

    # ----------------------------------------------------------------------------------------------
    # Training (Algorithm 1)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0), Eq. (15): sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def p_loss(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None, *,
               loss_type: str | None = None, conditioned: int | None = None,
               y: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The loss between the true noise and eps_theta(x_t, t), Algorithm 1 line 6 (L1 by default); a scalar.

        ``conditioned``: how many leading images a self-conditioned network gets its own x_0 estimate for
        (``self_condition_estimate``; by default half the batch). ``y``: the class labels of a class-conditional
        model, as the network is to see them (label dropout already applied). ``keep``: the pixels a
        mask-conditional model is given of each image ([B, 1, H, W], 1 where kept; None: none)."""
        loss_type = loss_type or self.loss_type
        if noise is None:
            noise = torch.randn_like(x_start)
        model = self if keep is None else self.seeing(x_start, keep)
        x_t = self.q_sample(x_start, t, noise)
        x_self_cond = model.self_condition_estimate(x_t, t, conditioned, y) if self.self_condition else None
        if loss_type not in LOSSES:
            raise ValueError(f"loss_type must be one of {tuple(LOSSES)}, got {loss_type!r}")
        return LOSSES[loss_type](model.predict_noise(x_t, t, x_self_cond, y), noise)

    def forward(self, x_start: torch.Tensor, t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                conditioned: int | None = None, y: torch.Tensor | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """Algorithm 1 for a batch x_0 in [-1, 1]: t ~ Uniform({0 ... T-1}) and eps ~ N(0, I) (drawn in that
        order unless given); returns the loss. ``conditioned``, ``y`` and ``keep`` as in ``p_loss``."""
        b, c, h, w = x_start.shape
        if (c, h, w) != (self.channels, self.image_size, self.image_size):
            raise ValueError(f"expected images of shape [B, {self.channels}, {self.image_size}, {self.image_size}], "
                             f"got {list(x_start.shape)}")
        if t is None:
            t = self.sample_timesteps(b, x_start.device)
        return self.p_loss(x_start, t, noise, conditioned=conditioned, y=y, keep=keep)

    def self_condition_estimate(self, x_t: torch.Tensor, t: torch.Tensor, conditioned: int | None = None,
                                y: torch.Tensor | None = None) -> torch.Tensor:
        """The x_0 input of a self-conditioned network in training: for the first ``conditioned`` images (by
        default half the batch, rounded down), the network's own clamped x_0 estimate from a pass with zeros in
        its place, without gradients; zeros for the rest.

        So the network learns both to denoise from scratch (the first sampling step, with zeros) and to refine
        an estimate (every later step). Taking a fixed half rather than a random one keeps shapes and control
        flow fixed (CUDA graphs, torch.compile); batches are shuffled and their timesteps independent, so which
        half it is does not matter. The extra pass is a forward pass over half the batch, without a backward.
        """
        estimate = torch.zeros_like(x_t)
        half = x_t.shape[0] // 2 if conditioned is None else conditioned
        if half:
            with torch.no_grad():
                x_h = x_t[:half]
                y_h = None if y is None else y[:half]
                part = self if self.kept is None else self._given(self.kept[:half])
                estimate[:half] = part.predict_start(x_h, t[:half], torch.zeros_like(x_h), y_h).to(estimate.dtype)
        return estimate

    def sample_timesteps(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """Training timesteps [B], t ~ Uniform({0 ... T-1}) (Algorithm 1 line 3, 0-indexed)."""
        return torch.randint(0, self.num_timesteps, (batch_size,), device=device)

    # ----------------------------------------------------------------------------------------------
    # Sampling (Algorithm 2)

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_0 from x_t and the noise, Eq. (19): (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise)

    def predict_start(self, x_t: torch.Tensor, t: torch.Tensor, x_self_cond: torch.Tensor | None = None,
                      y: torch.Tensor | None = None, guidance: float = 0.0, *, mean_at_last: bool = True) -> torch.Tensor:
        """The network's x_0 estimate, clamped to [-1, 1] (Algorithm 2, lines 4 to 6): eps_theta through Eq. (19)
        (guided by ``y`` and ``guidance`` as in ``predict_noise``).

        At the last timestep, once the model knows its data's mean (``set_data_mean``) and unless
        ``mean_at_last`` is false, the estimate is that mean (of class ``y``; of all images for "no class").
        There alpha_bar is about 1e-6 for the cosine schedule's clipped last step: x_T holds a thousandth of x_0,
        so the best estimate is the data's mean, while Eq. (19) multiplies the network's error by
        1 / sqrt(alpha_bar), about 1,000, and the clamp turns that into a saturated image. A chain that jumps
        from there to a timestep with signal keeps that image's colours (docs/sampling.md, "The first step")."""
        eps = self.predict_noise(x_t, t, x_self_cond, y, guidance)
        x_start = self.predict_start_from_noise(x_t, t, eps).clamp(-1.0, 1.0)
        if self.data_mean is None or not mean_at_last:
            return x_start
        row = torch.full_like(t, self.null_class) if y is None else y
        last = (t == self.num_timesteps - 1).view(-1, *((1,) * (x_t.dim() - 1)))
        return torch.where(last, self.data_mean[row].to(x_start.dtype), x_start)

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0), Eq. (18)."""
        mean = (extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
                + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        return mean, extract(self.posterior_variance, t, x_t.shape)

    @torch.no_grad()
    def p_sample(self, x: torch.Tensor, t: torch.Tensor, t_index: int, *,
                 generator: torch.Generator | None = None, x_self_cond: torch.Tensor | None = None,
                 y: torch.Tensor | None = None, guidance: float = 0.0) -> torch.Tensor:
        """One reverse step x_t -> x_{t-1} (Algorithm 2, lines 3 to 9); ``t_index`` is t's 0-indexed value.

        ``x_self_cond``: a self-conditioned network's x_0 input (the previous step's estimate; None: zeros).
        ``y``, ``guidance``: class labels and guidance scale, as in ``predict_noise``.
        """
        # line 3: z ~ N(0, I), none at the last step (paper t = 1)
        z = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator) if t_index > 0 else None
        return self.reverse_step(x, t, z, x_self_cond, y, guidance)[0]

    def reverse_step(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor | None,
                     x_self_cond: torch.Tensor | None = None, y: torch.Tensor | None = None,
                     guidance: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Algorithm 2, lines 4 to 9, with the step's noise ``z`` given (None: none): x_{t-1}, and the clamped x_0
        estimate (a self-conditioned network's input at the next step). The estimate is always the network's, as
        the handout has it (the data's mean at the last step measured no better on this chain)."""
        x_start = self.predict_start(x, t, x_self_cond, y, guidance, mean_at_last=False)  # lines 4 to 6
        mean, variance = self.q_posterior(x_start, x, t)  # lines 7 and 8
        return (mean if z is None else mean + variance.sqrt() * z), x_start  # line 9; the variance is 0 at t = 1

    def alpha_bar(self, t: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor:
        """alpha_bar at the 0-indexed timesteps ``t`` ([B]; -1 stands for x_0, where alpha_bar is 1), shaped
        [B, 1, 1, ...] to broadcast against ``x_shape``."""
        return extract(F.pad(self.alphas_cumprod, (1, 0), value=1.0), t + 1, x_shape)

    @torch.no_grad()
    def run_chain(self, x: torch.Tensor, *, sampler: str = "ddpm", steps: int | None = None, eta: float = 0.0,
                  start_t: int | None = None, plan: list[tuple[int, int]] | None = None,
                  return_steps: Iterable[int] = (), generator: torch.Generator | None = None,
                  classes: torch.Tensor | None = None, guidance: float = 0.0, step=None,
                  merge: Callable[[torch.Tensor, int], torch.Tensor] | None = None, resample: int = 1,
                  progress: Callable[[float], None] | None = None
                  ) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The reverse chain: the one loop that every sampler, sample and edit runs. From ``x`` ([B, C, H, W] in
        [-1, 1] at the plan's first timestep) to images in [0, 1].

        ``plan``: the (from, to) timesteps to visit (default ``samplers.chain_plan`` of ``sampler``, ``steps`` and
        ``start_t``); image-to-image passes the tail of a plan and a start noised to its first timestep. At each
        (t, t') the loop draws the step's noise from ``generator`` (where the sampler adds noise and t' is not
        x_0) and calls ``step`` (default: the sampler's step of ``samplers.SAMPLERS``, with ``eta``; a CUDA
        graph's replay takes its place) with the previous step's x_0 estimate and its timestep; the step returns x
        at t' and its own x_0 estimate.

        ``merge(x, t')``, when given, replaces x after each step (inpainting puts the kept pixels back there), and
        each step but the last then runs ``resample`` times, x noised back from t' to t in between (RePaint's
        resampling, Lugmayr et al. 2022).

        ``classes`` ([B] labels) and ``guidance`` (w) steer a class-conditional model, as in ``predict_noise``; a
        ``step`` given here brings its own guidance scale. ``progress(f)`` is called after each network pass with
        the fraction f of the chain done so far (1 at its end). ``return_steps``: 0-indexed timesteps whose x_t
        (the state before the step at t, in [0, 1]) is also returned; with any given, the result is
        ``(images, {t: x_t})``.
        """
        if eta < 0:
            raise ValueError(f"DDIM eta must be non-negative, got {eta}")
        if resample < 1:
            raise ValueError(f"resample must be at least 1, got {resample}")
        plan = chain_plan(self.num_timesteps, sampler, steps=steps, start_t=start_t) if plan is None else plan
        y = self.check_classes(classes, x.shape[0])
        step = self.sampler_step(sampler, guidance=guidance, eta=eta) if step is None else step
        noisy = sampler_named(sampler).stochastic(eta)
        turns = [resample if merge is not None and j >= 0 else 1 for _, j in plan]
        passes, done = sum(turns), 0
        wanted, intermediates = set(return_steps), {}
        x_start, t_prev = torch.zeros_like(x), None  # the first step has no estimate yet: zeros, made "at t"
        for (i, j), count in zip(plan, turns):
            if i in wanted:
                intermediates[i] = unnormalize(x)
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            t_prev = t if t_prev is None else t_prev
            for turn in range(count):
                if turn:  # back from t' to t: x_t ~ N(sqrt(abar_t / abar_t') x_t', (1 - abar_t / abar_t') I)
                    ratio = self.alphas_cumprod[i] / self.alphas_cumprod[j]
                    x = ratio.sqrt() * x + (1 - ratio).sqrt() * torch.randn(x.shape, device=x.device,
                                                                            generator=generator)
                z = None
                if noisy and j >= 0:  # no noise onto x_0
                    z = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
                x, x_start = step(x, t, t + (j - i), z, x_start, t_prev, y)
                t_prev = t
                if merge is not None:
                    x = merge(x, j)
                done += 1
                if progress is not None:
                    progress(done / passes)
        images = unnormalize(x)
        return (images, intermediates) if wanted else images

    def sampler_step(self, sampler: str, *, guidance: float = 0.0, eta: float = 0.0):
        """``sampler``'s reverse step on this model as ``run_chain`` calls it, ``step(x, t, t_next, z, x_prev, t_prev,
        y) -> (x at t_next, clamped x_0 estimate)``, at classifier-free ``guidance`` and DDIM's ``eta``."""
        chosen = sampler_named(sampler)

        def step(x, t, t_next, z, x_prev, t_prev, y):
            return chosen.step(self, x, t, t_next, z, x_prev, t_prev=t_prev, y=y, guidance=guidance, eta=eta)
        return step

    def check_classes(self, classes: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
        """The labels of a chain over ``batch_size`` images as a long tensor on the model's device, after checking
        that they suit this model."""
        if classes is None:
            return None
        if not self.num_classes:
            raise ValueError("classes were asked of a model that is not class-conditional")
        y = torch.as_tensor(classes, dtype=torch.long, device=self.device).reshape(-1)
        if len(y) != batch_size or bool(((y < 0) | (y > self.null_class)).any()):
            raise ValueError(f"classes must be {batch_size} labels in 0 ... {self.null_class} (the last is "
                             f"\"no class\"), got {classes}")
        return y

    def noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_T ~ N(0, I) for ``batch_size`` images, drawn from ``generator`` (Algorithm 2, line 1)."""
        shape = (batch_size, self.channels, self.image_size, self.image_size)
        return torch.randn(shape, device=self.device, generator=generator)

    @torch.no_grad()
    def p_sample_loop(self, shape_or_noise: Sequence[int] | torch.Tensor, *, start_t: int | None = None,
                      return_steps: Iterable[int] = (), generator: torch.Generator | None = None,
                      progress: Callable[[float], None] | None = None, classes: torch.Tensor | None = None,
                      guidance: float = 0.0, step=None) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The reverse chain (Algorithm 2) from x_T ~ N(0, I) of shape ``shape_or_noise`` (drawn from ``generator``,
        as the steps' noise is), or from that tensor at 0-indexed timestep ``start_t`` (default T-1: the figure of
        the backward process starts from a forward-process image this way); images in [0, 1]. ``return_steps``,
        ``progress``, ``classes``, ``guidance`` and ``step`` as in ``run_chain``."""
        if isinstance(shape_or_noise, torch.Tensor):
            x = shape_or_noise.to(self.device)
        else:
            x = torch.randn(tuple(shape_or_noise), device=self.device, generator=generator)
        return self.run_chain(x, sampler="ddpm", start_t=start_t, return_steps=return_steps, generator=generator,
                              progress=progress, classes=classes, guidance=guidance, step=step)

    @torch.no_grad()
    def sample(self, batch_size: int = 16, *, sampler: str = "ddpm", steps: int | None = None, eta: float = 0.0,
               generator: torch.Generator | None = None, progress: Callable[[float], None] | None = None,
               classes: torch.Tensor | None = None, guidance: float = 0.0, step=None) -> torch.Tensor:
        """``batch_size`` new images in [0, 1], [B, C, S, S]: the full DDPM chain (Algorithm 2), or another
        sampler of ``samplers.SAMPLERS`` over ``steps`` timesteps (default min(``samplers.DEFAULT_STEPS``, T));
        ``eta``, ``progress``, ``classes`` ([B] labels), ``guidance`` and ``step`` as in ``run_chain``."""
        chain_plan(self.num_timesteps, sampler, steps=steps)  # a bad sampler or step count fails before any noise
        self.check_classes(classes, batch_size)
        return self.run_chain(self.noise(batch_size, generator), sampler=sampler, steps=steps, eta=eta,
                              generator=generator, progress=progress, classes=classes, guidance=guidance, step=step)


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((x + 1.0) * 0.5).clamp(0.0, 1.0)
