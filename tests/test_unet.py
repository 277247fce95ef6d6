"""The U-Net: shapes, gradients, time conditioning, and the size checks at construction."""

import pytest
import torch

from diffusion import Diffusion
from unet import Unet


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


def test_self_conditioning_adds_only_three_input_channels_to_the_first_convolution():
    def count(net):
        return sum(p.numel() for p in net.parameters())

    plain, conditioned = Unet(16), Unet(16, self_condition=True)
    assert conditioned.input_conv.in_channels == 2 * plain.input_conv.in_channels == 6
    kernel = plain.input_conv.kernel_size
    assert count(conditioned) - count(plain) == 3 * 16 * kernel[0] * kernel[1]


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
