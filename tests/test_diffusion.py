"""The diffusion math against closed forms (assignment Eq. 15 to 19, Algorithms 1 and 2)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from diffusion import Diffusion, cosine_alphas, extract


class Oracle(nn.Module):
    """A network that knows the single data point x_0 and returns the exact noise in x_t (from Eq. 15)."""

    def __init__(self, x_start: torch.Tensor):
        super().__init__()
        self.x_start = x_start
        self.diffusion = None

    def forward(self, x_t, t):
        d = self.diffusion
        a = extract(d.sqrt_alphas_cumprod, t, x_t.shape)
        b = extract(d.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
        return (x_t - a * self.x_start) / b


class Zero(nn.Module):
    def forward(self, x_t, t):
        return torch.zeros_like(x_t)


def make(model=None, *, T=50, size=8, **kw):
    return Diffusion(model or Zero(), image_size=size, channels=3, timesteps=T, **kw)


def reference_schedule(T, s=0.008):
    """Eq. (16) written out independently in numpy float64."""
    t = np.arange(T + 1, dtype=np.float64)
    f = np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2
    alpha_bar = f / f[0]
    alphas = np.clip(alpha_bar[1:] / alpha_bar[:-1], 0.001, 1.0)
    return alphas, np.cumprod(alphas)


# --- schedule -------------------------------------------------------------------------------------

def test_cosine_schedule_pinned_values():
    # alpha_t at 0-indexed t = 0, 24, 48, 49 for T = 50, from Eq. (16) evaluated by hand (float64).
    alphas = cosine_alphas(50)
    assert alphas.dtype == torch.float64
    assert alphas[0].item() == pytest.approx(0.9982524864661346, rel=1e-12)
    assert alphas[24].item() == pytest.approx(0.9406463357077433, rel=1e-12)
    assert alphas[48].item() == pytest.approx(0.2502429964842516, rel=1e-12)
    assert alphas[49].item() == 0.001  # f(T) = 0, so the ratio is clipped from below


@pytest.mark.parametrize("T", [10, 50, 300, 1000])
def test_schedule_buffers_match_closed_form(T):
    d = make(T=T)
    alphas, alphas_cumprod = reference_schedule(T)
    np.testing.assert_allclose(d.alphas.numpy(), alphas, rtol=1e-6)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), alphas_cumprod, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(d.betas.numpy(), 1 - alphas, rtol=1e-5, atol=1e-7)
    prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
    np.testing.assert_allclose(d.alphas_cumprod_prev.numpy(), prev, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(d.sqrt_recip_alphas_cumprod.numpy(), 1 / np.sqrt(alphas_cumprod), rtol=1e-5)
    np.testing.assert_allclose(d.sqrt_one_minus_alphas_cumprod.numpy(), np.sqrt(1 - alphas_cumprod), rtol=1e-5)
    for name, buf in d.named_buffers():
        assert buf.dtype == torch.float32, name
        assert torch.isfinite(buf).all(), name


@pytest.mark.parametrize("T", [10, 50, 1000])
def test_schedule_is_monotone_and_inside_clip(T):
    d = make(T=T)
    assert (d.alphas >= 0.001).all() and (d.alphas <= 1).all()
    assert (d.alphas_cumprod[1:] < d.alphas_cumprod[:-1]).all()
    assert (d.betas[1:] >= d.betas[:-1]).all()
    assert 0 < d.alphas_cumprod[-1] < 1e-3  # x_T is essentially pure noise


def test_extract_broadcasts_per_batch_element():
    a = torch.arange(10.0)
    t = torch.tensor([3, 0, 9])
    out = extract(a, t, (3, 2, 4, 4))
    assert out.shape == (3, 1, 1, 1)
    assert out.flatten().tolist() == [3.0, 0.0, 9.0]


# --- forward process --------------------------------------------------------------------------------

def test_q_sample_matches_eq17_moments():
    d = make(T=50)
    x_start = torch.linspace(-1, 1, 12).reshape(1, 3, 2, 2)
    n = 20000
    for t_index in (0, 20, 49):
        t = torch.full((n,), t_index)
        x_t = d.q_sample(x_start.expand(n, -1, -1, -1), t)
        abar = d.alphas_cumprod[t_index].double()
        mean = x_t.double().mean(0)
        var = x_t.double().var(0)
        assert torch.allclose(mean, abar.sqrt() * x_start[0].double(), atol=4 / math.sqrt(n))
        assert torch.allclose(var, (1 - abar).expand_as(var), rtol=0.05, atol=1e-4)


def test_q_sample_uses_given_noise():
    d = make(T=50)
    x, noise, t = torch.rand(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 20, 49])
    expected = d.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1) * x + d.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1) * noise
    assert torch.allclose(d.q_sample(x, t, noise), expected)


# --- posterior and reverse process ----------------------------------------------------------------------

def test_posterior_matches_product_of_gaussians():
    """Eq. (18) against q(x_t | x_{t-1}) q(x_{t-1} | x_0), multiplied out independently in float64."""
    T = 50
    d = make(T=T)
    alphas, alphas_cumprod = reference_schedule(T)
    rng = np.random.default_rng(0)
    x0, xt = rng.normal(size=5), rng.normal(size=5)
    for t_index in (1, 10, 30, 49):
        a, abar_prev = alphas[t_index], alphas_cumprod[t_index - 1]
        # exponent in x_{t-1}: -(x_t - sqrt(a) x)^2 / 2(1-a) - (x - sqrt(abar_prev) x0)^2 / 2(1-abar_prev)
        precision = a / (1 - a) + 1 / (1 - abar_prev)
        mean = (math.sqrt(a) * xt / (1 - a) + math.sqrt(abar_prev) * x0 / (1 - abar_prev)) / precision
        t = torch.full((5,), t_index)
        got_mean, got_var = d.q_posterior(torch.tensor(x0).float().view(5, 1, 1, 1),
                                          torch.tensor(xt).float().view(5, 1, 1, 1), t)
        np.testing.assert_allclose(got_mean.flatten().numpy(), mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got_var.flatten().numpy(), 1 / precision, rtol=1e-4)
    assert d.posterior_variance[0] == 0  # paper t = 1: x_0 is known exactly
    assert torch.isfinite(d.posterior_log_variance_clipped).all()
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]


def test_predict_start_inverts_q_sample():
    d = make(T=50)
    x, noise, t = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8), torch.tensor([0, 5, 25, 48])
    assert torch.allclose(d.predict_start_from_noise(d.q_sample(x, t, noise), t, noise), x, atol=1e-4)


class ZeroClasses(nn.Module):
    """A class-conditional network over two classes that predicts no noise."""

    num_classes = 2

    def forward(self, x_t, t, y=None):
        return torch.zeros_like(x_t)


def test_with_the_data_mean_the_last_timesteps_estimate_is_that_mean_and_no_other_estimate_changes():
    d = make(T=50)
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([49, 48, 10, 49])
    plain = d.predict_start(x, t)
    # what the mean replaces: at t = 49 Eq. (19) multiplies by about 1,000, so the clamp saturates every pixel
    assert (plain[0].abs() == 1).float().mean().item() > 0.95
    mean = torch.rand(1, 3, 8, 8) * 2 - 1
    d.set_data_mean(mean)
    estimate = d.predict_start(x, t)
    assert torch.equal(estimate[[0, 3]], mean.expand(2, -1, -1, -1))
    assert torch.equal(estimate[1:3], plain[1:3])
    d.set_data_mean(None)
    assert torch.equal(d.predict_start(x, t), plain)


def test_a_class_conditional_models_last_estimate_is_its_classs_mean_and_no_class_the_mean_of_all():
    d = make(ZeroClasses(), T=20)
    means = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 8, 8) / 4  # classes 0, 1 and all
    d.set_data_mean(means)
    x, t = torch.randn(3, 3, 8, 8), torch.full((3,), 19)
    assert torch.equal(d.predict_start(x, t, y=torch.tensor([1, 0, 2])), means[[1, 0, 2]])
    assert torch.equal(d.predict_start(x, t), means[[2, 2, 2]])


def test_algorithm_2_keeps_the_networks_estimate_while_the_samplers_that_jump_take_the_mean():
    d = make(T=20)

    def draw(sampler):
        steps = None if sampler == "ddpm" else 5
        return d.sample(2, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0))

    names = ("ddpm", "ancestral", "ddim", "dpmpp_2m", "dpmpp_2m_sde")
    before = {name: draw(name) for name in names}
    d.set_data_mean(torch.zeros(1, 3, 8, 8))
    after = {name: draw(name) for name in names}
    assert torch.equal(after["ddpm"], before["ddpm"])
    assert all(not torch.allclose(after[name], before[name], atol=1e-3) for name in names[1:])


def test_a_new_data_mean_is_copied_into_the_held_tensor_and_a_wrong_shape_is_refused():
    d = make(T=10)
    d.set_data_mean(torch.zeros(1, 3, 8, 8))
    held = d.data_mean
    d.set_data_mean(torch.ones(1, 3, 8, 8))
    assert d.data_mean is held and torch.equal(held, torch.ones(1, 3, 8, 8))  # a captured graph reads it
    with pytest.raises(ValueError, match=r"shape \[1, 3, 8, 8\]"):
        d.set_data_mean(torch.zeros(2, 3, 8, 8))


def test_oracle_gives_zero_loss_and_chain_ends_at_data_point():
    x_start = torch.rand(1, 3, 8, 8) * 2 - 1
    oracle = Oracle(x_start)
    d = make(oracle, T=50)
    oracle.diffusion = d
    x = x_start.expand(6, -1, -1, -1)
    for loss_type in ("l1", "l2", "huber"):
        assert d.p_loss(x, torch.randint(0, 50, (6,)), loss_type=loss_type).item() == pytest.approx(0, abs=1e-5)
    images = d.p_sample_loop((6, 3, 8, 8))
    assert images.min() >= 0 and images.max() <= 1
    assert torch.allclose(images, ((x + 1) / 2), atol=1e-4)
    ddim = d.sample(6, sampler="ddim", steps=10)
    assert torch.allclose(ddim, ((x + 1) / 2), atol=1e-4)


def test_p_loss_types_match_their_definitions():
    class Const(nn.Module):
        def forward(self, x_t, t):
            return torch.full_like(x_t, 0.5)

    d = make(Const(), T=10)
    x, noise, t = torch.zeros(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    diff = 0.5 - noise
    assert d.p_loss(x, t, noise).item() == pytest.approx(diff.abs().mean().item(), rel=1e-5)  # L1 default
    assert d.p_loss(x, t, noise, loss_type="l2").item() == pytest.approx((diff ** 2).mean().item(), rel=1e-5)
    huber = torch.where(diff.abs() < 1, 0.5 * diff ** 2, diff.abs() - 0.5).mean()
    assert d.p_loss(x, t, noise, loss_type="huber").item() == pytest.approx(huber.item(), rel=1e-5)
    with pytest.raises(ValueError, match="loss_type"):
        d.p_loss(x, t, noise, loss_type="l3")


def test_forward_draws_uniform_timesteps_and_returns_scalar_with_grad():
    seen = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, x_t, t):
            seen.append(t.clone())
            return x_t * self.w

    d = make(Recorder(), T=7)
    loss = d(torch.rand(512, 3, 8, 8) * 2 - 1)
    assert loss.dim() == 0 and loss.requires_grad
    t = seen[0]
    assert t.min() == 0 and t.max() == 6 and t.dtype == torch.long
    assert len(torch.unique(t)) == 7
    with pytest.raises(ValueError, match="expected images of shape"):
        d(torch.rand(2, 3, 16, 16))


def test_last_step_adds_no_noise_and_others_do():
    d = make(T=50)
    x = torch.randn(4, 3, 8, 8)
    t0 = torch.zeros(4, dtype=torch.long)
    a = d.p_sample(x, t0, 0, generator=torch.Generator().manual_seed(1))
    b = d.p_sample(x, t0, 0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    mean, _ = d.q_posterior(d.predict_start_from_noise(x, t0, torch.zeros_like(x)).clamp(-1, 1), x, t0)
    assert torch.equal(a, mean)
    t5 = torch.full((4,), 5, dtype=torch.long)
    c = d.p_sample(x, t5, 5, generator=torch.Generator().manual_seed(1))
    e = d.p_sample(x, t5, 5, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(c, e)


def test_same_seed_same_samples_and_ddim_is_deterministic():
    d = make(T=20)
    s1 = d.sample(3, generator=torch.Generator().manual_seed(7))
    s2 = d.sample(3, generator=torch.Generator().manual_seed(7))
    s3 = d.sample(3, generator=torch.Generator().manual_seed(8))
    assert s1.shape == (3, 3, 8, 8) and torch.equal(s1, s2) and not torch.equal(s1, s3)
    noise = torch.randn(3, 3, 8, 8)
    state = torch.get_rng_state()
    a = d.run_chain(noise, sampler="ddim", steps=5)
    b = d.run_chain(noise, sampler="ddim", steps=5)
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)  # eta = 0 draws no noise at all
    c = d.run_chain(noise, sampler="ddim", steps=5, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a, c)


def test_p_sample_loop_returns_requested_intermediates():
    d = make(T=20)
    noise = torch.randn(2, 3, 8, 8)
    images, inter = d.p_sample_loop(noise, return_steps=[19, 10, 0])
    assert sorted(inter) == [0, 10, 19]
    assert torch.allclose(inter[19], ((noise + 1) / 2).clamp(0, 1))  # the state before the first step
    assert images.shape == (2, 3, 8, 8)
    # starting part-way down the chain runs only start_t + 1 steps
    _, inter = d.p_sample_loop(noise, start_t=5, return_steps=[5, 0])
    assert torch.allclose(inter[5], ((noise + 1) / 2).clamp(0, 1))
    with pytest.raises(ValueError, match="start_t"):
        d.p_sample_loop(noise, start_t=20)


def test_sampling_runs_without_grad():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x, t):
            return self.conv(x)

    d = make(Net(), T=5)
    assert not d.sample(2).requires_grad
    assert not d.sample(2, sampler="ddim", steps=3).requires_grad


def test_bad_arguments_fail_with_messages():
    with pytest.raises(ValueError, match="timesteps"):
        make(T=1)
    with pytest.raises(ValueError, match="loss_type"):
        make(loss_type="l0")
    with pytest.raises(ValueError, match="image_size"):
        make(size=0)
    d = make(T=10)
    with pytest.raises(ValueError, match="DDIM steps"):
        d.sample(1, sampler="ddim", steps=11)
    with pytest.raises(ValueError, match="sampler"):
        d.sample(1, sampler="euler")


# --- self-conditioning ----------------------------------------------------------------------------

class SelfCondRecorder(nn.Module):
    """A self-conditioned network eps = w x_t + 0.1 x_self_cond that records every call."""

    self_condition = True

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))
        self.calls = []

    def forward(self, x_t, t, x_self_cond):
        self.calls.append(dict(x_t=x_t.detach().clone(), t=t.clone(), cond=x_self_cond.detach().clone(),
                               grad=torch.is_grad_enabled()))
        return self.w * x_t + 0.1 * x_self_cond


@pytest.mark.parametrize("batch", [6, 5])
def test_self_conditioning_in_training_feeds_half_the_batch_its_own_estimate_without_gradient(batch):
    net = SelfCondRecorder()
    d = make(net, T=10)
    assert d.self_condition
    g = torch.Generator().manual_seed(0)
    x_start = torch.rand(batch, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(batch, 3, 8, 8, generator=g)
    t = torch.tensor([9, 0, 4, 7, 2, 5])[:batch]
    loss = d.p_loss(x_start, t, noise)
    half = batch // 2
    first, second = net.calls
    x_t = d.q_sample(x_start, t, noise)
    # the first pass: the first half of the batch, with zeros as its estimate, and no graph
    assert not first["grad"] and first["x_t"].shape[0] == half
    torch.testing.assert_close(first["x_t"], x_t[:half])
    assert first["cond"].abs().max() == 0
    # the second pass: the whole batch, the first half with its clamped x_0 estimate (Eq. 19), the rest zeros
    assert second["grad"] and torch.equal(second["t"], t)
    expected = torch.zeros_like(x_t)
    expected[:half] = d.predict_start_from_noise(x_t[:half], t[:half], 0.5 * x_t[:half]).clamp(-1, 1)
    torch.testing.assert_close(second["cond"], expected)
    assert second["cond"][:half].abs().max() > 0
    # the gradient treats the estimate as a constant
    loss.backward()
    w = torch.tensor(0.5, requires_grad=True)
    l1 = (w * x_t + 0.1 * expected - noise).abs().mean()
    (reference,) = torch.autograd.grad(l1, w)
    torch.testing.assert_close(net.w.grad, reference)


def test_self_conditioning_in_sampling_passes_each_step_the_previous_estimate():
    T = 6
    for sampler, kw, steps in (("ddpm", {}, T), ("ddim", {"steps": 3}, 3)):
        net = SelfCondRecorder()
        d = make(net, T=T)
        d.sample(2, sampler=sampler, generator=torch.Generator().manual_seed(0), **kw)
        assert len(net.calls) == steps
        assert net.calls[0]["cond"].abs().max() == 0  # no estimate before the first step
        for before, call in zip(net.calls, net.calls[1:]):
            eps = 0.5 * before["x_t"] + 0.1 * before["cond"]
            estimate = d.predict_start_from_noise(before["x_t"], before["t"], eps).clamp(-1, 1)
            torch.testing.assert_close(call["cond"], estimate)
        # and p_sample, the single step, takes the estimate as an argument
        x, t = torch.randn(2, 3, 8, 8), torch.full((2,), 3)
        cond = torch.rand(2, 3, 8, 8)
        d.p_sample(x, t, 3, x_self_cond=cond)
        torch.testing.assert_close(net.calls[-1]["cond"], cond)


def test_networks_without_self_conditioning_are_called_with_two_arguments():
    d = make(Zero())  # Zero.forward takes (x_t, t) only
    assert not d.self_condition
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    assert d.p_loss(x, torch.tensor([0, 1, 2, 3])).item() > 0
    assert d.sample(2, generator=torch.Generator().manual_seed(0)).shape == (2, 3, 8, 8)
