"""The U-Net: shapes, gradients, time conditioning, and the size checks at construction."""
import math

import pytest
import torch
import torch.nn.functional as F

from diffusion import Diffusion
from unet import ResidualBlock, StandardizedConv2d, Unet


@pytest.mark.parametrize("size,dim,mults", [(32, 16, (1, 2, 4, 8)), (64, 8, (1, 2, 2, 4)), (128, 8, (1, 1, 2, 2, 4)),
                                            (32, 24, (1, 2, 4))])
def test_output_shape_equals_input_shape(size, dim, mults):
    net = Unet(dim, mults, image_size=size)
    x = torch.randn(2, 3, size, size)
    assert net(x, torch.tensor([0, 9])).shape == x.shape


def test_untrained_network_predicts_zero_and_gradients_reach_every_parameter():
    net = Unet(8, (1, 2, 2), num_res_blocks=1, attention_levels=(1, 2))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 40])
    assert torch.count_nonzero(net(x, t)) == 0  # zero-initialised output convolution
    # With a zero output layer no gradient flows further back; move it off zero to check the rest.
    torch.nn.init.normal_(net.output[-1].weight, std=0.1)
    net(x, t).square().mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert missing == []


def test_time_embedding_changes_the_output():
    net = Unet(8, (1, 2), num_res_blocks=1)
    torch.nn.init.normal_(net.output[-1].weight, std=0.1)
    x = torch.randn(1, 3, 8, 8)
    assert not torch.allclose(net(x, torch.tensor([0])), net(x, torch.tensor([30])))


def test_time_scale_multiplies_the_timestep_the_embedding_sees():
    torch.manual_seed(0)
    plain = Unet(8, (1, 2), num_res_blocks=1)
    torch.nn.init.normal_(plain.output[-1].weight, std=0.1)
    scaled = Unet(8, (1, 2), num_res_blocks=1, time_scale=20.0)
    scaled.load_state_dict(plain.state_dict())
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 41])
    torch.testing.assert_close(scaled(x, t), plain(x, t * 20.0))
    assert not torch.allclose(scaled(x, t), plain(x, t))


def test_weight_standardization_ignores_the_kernels_scale_and_offset():
    torch.manual_seed(0)
    conv = StandardizedConv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 8, 8)
    w = conv.weight.detach()
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    std = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False).add(conv.eps).sqrt()
    torch.testing.assert_close(conv(x), F.conv2d(x, (w - mean) / std, conv.bias, padding=1))
    y = conv(x)
    with torch.no_grad():
        conv.weight.mul_(3.0).add_(0.5)  # affine changes of the kernel leave the output alone (up to eps)
    assert (conv(x) - y).abs().max() < 0.005 * y.abs().max()
    net = Unet(8, (1, 2), num_res_blocks=1, weight_standardization=True)
    kinds = {type(m) for name, m in net.named_modules() if name.endswith(("conv1", "conv2"))}
    assert kinds == {StandardizedConv2d}
    assert sum(isinstance(m, StandardizedConv2d) for m in Unet(8, (1, 2), num_res_blocks=1).modules()) == 0
    torch.nn.init.normal_(net.output[-1].weight, std=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    assert torch.isfinite(out.float()).all()


def test_zero_init_residual_makes_every_block_start_as_its_skip_path():
    torch.manual_seed(0)
    net = Unet(8, (1, 2), num_res_blocks=1, attention_levels=(0, 1), zero_init_residual=True)
    x, emb = torch.randn(2, 8, 8, 8), torch.randn(2, 32)
    blocks = [m for m in net.modules() if type(m).__name__ == "ResidualBlock"]
    attns = [m for m in net.modules() if type(m).__name__ == "SelfAttention"]
    assert len(blocks) == 8 and len(attns) == 7  # 2 down, 2 middle, 4 up; attention after the 6 level blocks and 1 in the middle
    same = blocks[0]  # 8 -> 8 channels: an identity skip
    torch.testing.assert_close(same(x, emb), x)
    torch.testing.assert_close(attns[0](x), x)
    wider = next(b for b in blocks if isinstance(b.skip, torch.nn.Conv2d))
    xin = torch.randn(2, wider.norm1.num_channels, 8, 8)
    torch.testing.assert_close(wider(xin, emb), wider.skip(xin))
    # Gradients still reach the zeroed layers and, through them after one step, the layers before them.
    torch.nn.init.normal_(net.output[-1].weight, std=0.1)
    net(torch.randn(2, 3, 8, 8), torch.tensor([1, 7])).square().mean().backward()
    assert all(torch.count_nonzero(b.conv2.weight.grad) > 0 for b in blocks)
    assert all(torch.count_nonzero(a.out.weight.grad) > 0 for a in attns)
    # Off by default: the same seed gives non-zero residual branches.
    torch.manual_seed(0)
    plain = Unet(8, (1, 2), num_res_blocks=1, attention_levels=(0, 1))
    assert all(torch.count_nonzero(m.conv2.weight) > 0 for m in plain.modules() if type(m).__name__ == "ResidualBlock")


def test_residual_scaling_divides_every_residual_sum_by_sqrt2():
    torch.manual_seed(0)
    plain = Unet(8, (1, 2), num_res_blocks=1, attention_levels=(0, 1))
    torch.manual_seed(0)
    scaled = Unet(8, (1, 2), num_res_blocks=1, attention_levels=(0, 1), residual_scaling=True)
    # No new parameters: the same seed gives the same weights, so the two networks differ only in the scaling.
    assert plain.state_dict().keys() == scaled.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), scaled.state_dict().values()))
    emb = torch.randn(2, 32)
    blocks = [(p, s) for p, s in zip(plain.modules(), scaled.modules()) if type(p).__name__ in ("ResidualBlock", "SelfAttention")]
    assert len(blocks) == 15
    for p, s in blocks:
        assert p.out_scale == 1.0 and s.out_scale == pytest.approx(2 ** -0.5)
        if type(p).__name__ == "SelfAttention":
            xin = torch.randn(2, p.norm.num_channels, 8, 8)
            torch.testing.assert_close(s(xin), p(xin) / math.sqrt(2))
        else:
            xin = torch.randn(2, p.norm1.num_channels, 8, 8)
            torch.testing.assert_close(s(xin, emb), p(xin, emb) / math.sqrt(2))
    # So the whole network computes another function from the same weights.
    weight = torch.randn_like(plain.output[-1].weight) * 0.1
    for net in (plain, scaled):
        net.output[-1].weight.data.copy_(weight)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 7])
    assert not torch.allclose(plain(x, t), scaled(x, t), atol=1e-3)
    # Through a chain of identity-skip blocks, plain sums let the spread grow block by block (each adds its
    # branch's variance); scaled sums, averages of two, stay within the unit-variance input's spread.
    stds = {}
    for scale in (1.0, 2 ** -0.5):
        torch.manual_seed(1)
        h, emb = torch.randn(4, 64, 8, 8), torch.randn(4, 32)
        with torch.no_grad():
            for _ in range(16):
                h = ResidualBlock(64, 64, 32, groups=8, dropout=0.0, out_scale=scale)(h, emb)
        stds[scale] = h.std().item()
    assert stds[2 ** -0.5] < 1.0 < 1.5 < stds[1.0], stds


def test_default_recommended_size_parameter_count():
    net = Unet(16)
    n = sum(p.numel() for p in net.parameters())
    # The README reports this figure; keep them in step.
    assert n == 3_972_947


def test_attention_placement_and_dropout():
    net = Unet(8, (1, 2, 4), attention_levels=(0, 2), dropout=0.1)
    names = [n for n, _ in net.named_modules() if n.endswith(".attn")]
    assert any(n.startswith("down.0") for n in names)
    assert sum(isinstance(m, torch.nn.Dropout) and m.p == 0.1 for m in net.modules()) > 0
    with pytest.raises(ValueError, match="attention_levels"):
        Unet(8, (1, 2), attention_levels=(2,))


def test_autocast_bf16_forward_is_finite():
    net = Unet(8, (1, 2), num_res_blocks=1)
    torch.nn.init.normal_(net.output[-1].weight, std=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    assert torch.isfinite(y.float()).all()


@pytest.mark.parametrize("kwargs,message", [
    (dict(dim=0), "dim must be a positive integer"),
    (dict(dim=-8), "dim must be a positive integer"),
    (dict(dim=12), "GroupNorm cannot split"),
    (dict(dim=16, dim_mults=()), "dim_mults"),
    (dict(dim=16, dim_mults=(1, 0)), "dim_mults"),
    (dict(dim=16, image_size=36), "not divisible by 8"),
    (dict(dim=16, image_size=0), "positive integer"),
    (dict(dim=16, dropout=1.0), "dropout"),
])
def test_bad_sizes_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Unet(**kwargs)


def test_diffusion_rejects_image_size_the_unet_cannot_take():
    with pytest.raises(ValueError, match="not divisible by 8"):
        Diffusion(Unet(16), image_size=20, timesteps=10)
    with pytest.raises(ValueError, match="not divisible"):
        Unet(16)(torch.randn(1, 3, 12, 12), torch.tensor([0]))


def test_self_condition_takes_the_x0_estimate_as_extra_input_channels():
    torch.manual_seed(0)
    net = Unet(8, (1, 2), num_res_blocks=1, self_condition=True)
    plain = Unet(8, (1, 2), num_res_blocks=1)
    assert (net.input_conv.in_channels, plain.input_conv.in_channels) == (6, 3)
    assert net.self_condition and not plain.self_condition
    # only the input convolution differs
    assert {k: v.shape for k, v in net.state_dict().items() if k != "input_conv.weight"} == \
        {k: v.shape for k, v in plain.state_dict().items() if k != "input_conv.weight"}
    torch.nn.init.normal_(net.output[-1].weight, std=0.1)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 7])
    estimate = torch.rand(2, 3, 8, 8) * 2 - 1
    torch.testing.assert_close(net(x, t), net(x, t, torch.zeros_like(x)))  # no estimate means zeros
    assert (net(x, t, estimate) - net(x, t)).abs().max() > 1e-3  # the estimate reaches the output
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a float32 estimate under bf16 autocast
        assert torch.isfinite(net(x, t, estimate).float()).all()
    with pytest.raises(ValueError, match="built without self_condition"):
        plain(x, t, estimate)
