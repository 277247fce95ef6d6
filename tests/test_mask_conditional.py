"""A mask-conditional model (--mask_conditional): the U-Net also sees the kept pixels, trains on random holes
(training.masks), inpaints in one plain chain, still samples from noise, and grows out of a model without it."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

import main
from diffusion import Diffusion, kept_input
from helpers import TINY_FLAGS, colour_set, lit_channel, tiny_run, train_colours
from imagedata.batches import Batch
from imagedata.files import decode_image
from runtime import checkpoint as ckpt_io
from sampling.editing import edit
from training.masks import NOTHING_KEPT, random_keep
from training.step import draw_inputs
from unet import Unet


def masked_net(**kwargs) -> Unet:
    return Unet(8, (1, 2), channels=3, num_res_blocks=1, self_condition=True, mask_conditional=True, **kwargs)


def test_the_training_holes_are_of_every_kind_and_a_fifth_hide_everything():
    keep = random_keep(4000, 16, generator=torch.Generator().manual_seed(0))
    assert keep.shape == (4000, 1, 16, 16) and set(keep.unique().tolist()) == {0.0, 1.0}
    kept = keep.mean(dim=(1, 2, 3))
    assert abs((kept == 0).float().mean().item() - NOTHING_KEPT) < 0.03
    assert (kept == 1).sum() == 0  # every image has a hole
    halves = keep[kept == 0.5]
    sides = {(h[0, :8] == 0).all().item() and "top" or (h[0, 8:] == 0).all().item() and "bottom"
             or (h[0, :, :8] == 0).all().item() and "left" or (h[0, :, 8:] == 0).all().item() and "right"
             for h in halves}
    assert {"top", "bottom", "left", "right"} <= sides
    partial = kept[(kept > 0) & (kept != 0.5)]
    assert len(partial) > 1500 and partial.min() < 0.3 and partial.max() > 0.8  # boxes and blobs of many sizes
    again = random_keep(4000, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)


def test_the_network_takes_the_kept_pixels_as_more_input_channels_and_none_as_zeros():
    net = masked_net()
    assert net.input_conv.in_channels == 3 + 3 + 4
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 5])
    torch.nn.init.normal_(net.output[-1].weight)  # an untrained network predicts zeros whatever it sees
    kept = kept_input(torch.rand(2, 3, 16, 16) * 2 - 1, (torch.rand(2, 1, 16, 16) > 0.5).float())
    assert torch.equal(net(x, t, kept=None), net(x, t, kept=torch.zeros(2, 4, 16, 16)))
    assert not torch.allclose(net(x, t, kept=None), net(x, t, kept=kept))
    with pytest.raises(ValueError, match="without mask_conditional"):
        Unet(8, (1, 2), num_res_blocks=1)(x, t, kept=kept)


def test_seeing_gives_the_kept_pixels_to_every_prediction_without_changing_the_model():
    net = masked_net()
    torch.nn.init.normal_(net.output[-1].weight)
    d = Diffusion(net, image_size=16, timesteps=10).eval()
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    keep = torch.ones(2, 3, 16, 16)
    keep[..., :8] = 0
    seen = d.seeing(x0, keep)
    x_t, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 3])
    assert d.kept is None and seen.model is d.model
    assert torch.equal(seen.kept, kept_input(x0, keep[:, :1]))
    assert torch.equal(seen.predict_noise(x_t, t), net(x_t, t, kept=seen.kept))
    assert torch.equal(d.predict_noise(x_t, t), net(x_t, t))
    with pytest.raises(ValueError, match="only a mask-conditional model"):
        Diffusion(Unet(8, (1, 2), num_res_blocks=1), image_size=16, timesteps=10).seeing(x0, keep)


def test_the_loss_sees_each_images_kept_pixels_also_in_the_self_conditioning_pass(monkeypatch):
    net = masked_net()
    torch.nn.init.normal_(net.output[-1].weight)  # so that gradients reach the input convolution
    d = Diffusion(net, image_size=16, timesteps=10)
    seen = []
    forward = net.forward
    monkeypatch.setattr(net, "forward", lambda *a, **k: seen.append(k["kept"]) or forward(*a, **k))
    x0, keep = torch.rand(4, 3, 16, 16) * 2 - 1, random_keep(4, 16, generator=torch.Generator().manual_seed(1))
    d(x0, keep=keep).backward()
    expected = kept_input(x0, keep)
    assert [len(k) for k in seen] == [2, 4]  # the estimate over the first half, then the whole batch
    assert torch.equal(seen[0], expected[:2]) and torch.equal(seen[1], expected)
    assert net.input_conv.weight.grad[:, 6:].abs().sum() > 0  # the new channels learn


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_each_batch_draws_its_masks_and_one_pass_keeps_them_beside_their_images(grad_accum):
    d = Diffusion(masked_net(), image_size=16, timesteps=10)
    images = [torch.rand(4, 3, 16, 16) for _ in range(grad_accum)]
    torch.manual_seed(3)
    *_, keep = draw_inputs(d, [Batch(x) for x in images])
    torch.manual_seed(3)
    separate = [draw_inputs(d, [Batch(x)])[-1] for x in images]
    order = [(i, j) for j in (slice(0, 2), slice(2, 4)) for i in range(grad_accum)]
    assert torch.equal(keep, torch.cat([separate[i][j] for i, j in order]))
    assert draw_inputs(Diffusion(Unet(8, (1, 2), num_res_blocks=1), image_size=16, timesteps=10),
                       [Batch(images[0])])[-1] is None


@pytest.fixture(scope="module")
def colour_model(tmp_path_factory):
    """The EMA sampler of a tiny mask-conditional model of one-colour images (``helpers.colour_set``)."""
    return train_colours(tmp_path_factory.mktemp("masked"), conditional=False, mask_conditional=True)


def test_a_trained_mask_conditional_model_fills_in_one_plain_chain_and_still_samples_every_colour(colour_model):
    """Trained on random holes, the model fills the hidden half of one-colour images in the kept half's colour by
    plain replacement, and, given nothing, draws every colour. (On images this simple replacement alone agrees
    too; that the kept pixels seen make the fill continue what is kept where it does not is the digits
    benchmark's to show, ``bench/bench_digits.py complete``.)"""
    images, colours = colour_set(per_class=16)
    images = images.float() / 255
    keep = torch.ones(1, 1, 16, 16)
    keep[..., :8] = 0
    filled = colour_model.using(resample=1).edit(images, keep=keep, generator=torch.Generator().manual_seed(0))
    assert (lit_channel(filled[..., :8]) == colours).float().mean() >= 0.95
    drawn = lit_channel(colour_model.sample(48, generator=torch.Generator().manual_seed(1)))
    assert drawn.bincount(minlength=3).min() >= 5, drawn


def test_the_sampler_inpaints_with_the_kept_pixels_seen_and_keeps_them(colour_model):
    """EMASampler.edit (the commands' and the page's) runs the chain that sees the kept pixels: the same as
    ``edit`` on the model, not as the same chain blind to them (the network given zeros)."""
    images, _ = colour_set(per_class=2)
    images = images.float() / 255
    keep = torch.ones(1, 1, 16, 16)
    keep[..., 4:12, 4:12] = 0
    cfg = colour_model.config
    out = colour_model.edit(images, keep=keep, generator=torch.Generator().manual_seed(0))
    blind = copy.copy(colour_model.ema)
    blind.mask_conditional = False
    seen, unseen = (edit(d, images, keep=keep, resample=cfg.resample, sampler=cfg.sampler, steps=cfg.chain_length,
                         kept_guidance=cfg.kept_guidance, generator=torch.Generator().manual_seed(0))
                    for d in (colour_model.ema, blind))
    assert torch.equal(out * keep, images * keep)
    assert torch.allclose(out, seen, atol=1e-6) and not torch.allclose(out, unseen, atol=1e-3)


# ------------------------------------------------------------------------------------------------------------
# through main.py: training from scratch, growing out of a model without it, and the checks

@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A 2-step tiny run without mask conditioning."""
    root = tmp_path_factory.mktemp("plain")
    data, cache, save = tiny_run(root, 2)
    return {"data": data, "cache": cache, "model": save / "model.pt", "root": root}


def test_training_goes_on_from_a_model_without_it_predicting_as_it_did(plain, tmp_path):
    """The widened input convolution starts at zero there, so the grown model predicts what the old one did
    whatever it is shown; its Adam moments start afresh; the run then trains, saves and inpaints."""
    from helpers import FakeBatches
    from sampling.model import build_diffusion
    from settings.config import Config
    from trainer import Trainer

    old = torch.load(plain["model"], weights_only=True)
    config = Config(**{k: v for k, v in old["config"].items() if k in Config.__dataclass_fields__})
    config = config.replace(mask_conditional=True, save_folder=str(tmp_path / "grown"))

    trainer = Trainer(build_diffusion(config), FakeBatches(4, 16), config=config, device="cpu")
    trainer.load(plain["model"])
    before = build_diffusion(config.replace(mask_conditional=False)).eval()
    before.model.load_state_dict(old["ema"])
    x_t, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 4, 9])
    seen = trainer.ema.eval().seeing(torch.rand(3, 3, 16, 16) * 2 - 1, random_keep(3, 16))
    expected = before.predict_noise(x_t, t, torch.zeros_like(x_t))
    assert expected.abs().mean() > 1e-4  # two steps have moved the zero-initialised output
    assert torch.allclose(seen.predict_noise(x_t, t, torch.zeros_like(x_t)), expected, rtol=1e-4, atol=1e-7)
    assert trainer.step == 2 and trainer.diffusion.model.input_conv.weight not in trainer.stepper.optimizer.state

    save = tmp_path / "run"
    assert main.main([*TINY_FLAGS, "--load_path", str(plain["model"]), "--mask_conditional", "True",
                      "--save_folder", str(save), "--train_steps", "4", "--save_and_sample_every", "4"]) == 0
    grown = torch.load(save / "model.pt", weights_only=True)
    assert grown["step"] == 4 and grown["config"]["mask_conditional"] is True
    widened, width = grown["model"]["input_conv.weight"], old["ema"]["input_conv.weight"].shape[1]
    assert widened.shape[1] == width + 4 and widened[:, width:].abs().sum() > 0  # the new channels learn
    out = tmp_path / "out"
    source = plain["data"] / "cat" / "img_000.jpg"
    assert main.main([*TINY_FLAGS, "--load_path", str(save / "model.pt"), "--save_folder", str(out), "--edits", "1",
                      "--inpaint", str(source), "--mask", "left", "--resample", "1"]) == 0
    result = np.asarray(Image.open(out / "inpaint-4" / "img_000-0.png"))
    expected, _ = decode_image(source, 16)
    assert np.array_equal(result[:, 8:], expected[:, 8:])


def refused(args: list[str], capsys) -> str:
    """main.py's exit code 2 and its one error line."""
    try:
        code = main.main(args)
    except SystemExit as e:
        code = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2 and len(err) == 1, err
    return err[0]


def test_a_mask_conditional_checkpoint_cannot_lose_it_and_a_plain_one_cannot_be_used_as_one(plain, tmp_path, capsys):
    before = sorted(p.name for p in plain["model"].parent.iterdir())
    assert "name a --save_folder other than" in refused(  # growing in place would replace the model it grows from
        [*TINY_FLAGS, "--load_path", str(plain["model"]), "--mask_conditional", "True", "--train_steps", "3"], capsys)
    assert sorted(p.name for p in plain["model"].parent.iterdir()) == before
    assert "mask_conditional=False in the checkpoint but True here" in refused(
        [*TINY_FLAGS, "--load_path", str(plain["model"]), "--mask_conditional", "True",
         "--save_folder", str(tmp_path / "out"), "--sample", "2"], capsys)
    save = tmp_path / "masked"
    assert main.main([*TINY_FLAGS, "--data_path", str(plain["data"]), "--cache_dir", str(plain["cache"]),
                      "--mask_conditional", "True", "--save_folder", str(save), "--train_steps", "2",
                      "--save_and_sample_every", "2"]) == 0
    assert "mask_conditional=True in the checkpoint but False here" in refused(
        [*TINY_FLAGS, "--load_path", str(save / "model.pt"), "--mask_conditional", "False", "--train_steps", "3"],
        capsys)


def test_an_earlier_checkpoint_without_the_setting_reads_as_a_model_without_it(plain):
    from runtime.errors import UserError
    from settings.config import Config

    saved = {k: v for k, v in torch.load(plain["model"], weights_only=True)["config"].items()
             if k != "mask_conditional"}
    config = Config(**{k: v for k, v in saved.items() if k in Config.__dataclass_fields__}).replace(
        load_path=str(plain["model"]), sample=2)
    ckpt_io.check_architecture(saved, config, "old.pt")
    with pytest.raises(UserError, match="mask_conditional=False in the checkpoint but True here"):
        ckpt_io.check_architecture(saved, config.replace(mask_conditional=True), "old.pt")
