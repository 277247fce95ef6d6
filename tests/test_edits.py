"""Editing images with a trained model: inpainting (RePaint's resampling, or plain replacement) and image-to-image
(towards a class with a conditional model), as functions and as main.py's --inpaint and --img2img commands.
Models and images are made by the tests: tiny networks trained for seconds on images of one colour each."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import main
from helpers import (
    TINY_FLAGS,
    bar_kind,
    bar_set,
    colour_set,
    lit_channel,
    tiny_diffusion,
    tiny_run,
    train_colours,
    train_tiny,
)
from imagedata.files import decode_image
from sampling.editing import consensus, edit, pulled_to_kept


@pytest.fixture(scope="module")
def colour_model(tmp_path_factory):
    """The EMA model of images that are red, green or blue (``helpers.colour_set``), unconditional."""
    return train_colours(tmp_path_factory.mktemp("colours"), conditional=False).ema


@pytest.fixture(scope="module")
def bar_model(tmp_path_factory):
    """The EMA model of horizontal and vertical bars (``helpers.bar_set``), a class each."""
    images, labels = bar_set()
    return train_tiny(tmp_path_factory.mktemp("bars"), images, labels, ("horizontal", "vertical")).ema


def test_strength_0_returns_the_input_and_1_draws_what_sampling_draws():
    diffusion = tiny_diffusion(size=16, T=10, self_condition=True).eval()
    images = torch.rand(3, 3, 16, 16)
    for sampler, steps in (("ddpm", None), ("ddim", 4)):
        assert torch.equal(edit(diffusion, images, strength=0.0, sampler=sampler, steps=steps), images)
        redrawn = edit(diffusion, images, strength=1.0, sampler=sampler, steps=steps,
                       generator=torch.Generator().manual_seed(5))
        plain = diffusion.sample(3, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(5))
        assert torch.equal(redrawn, plain)
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        edit(diffusion, images, strength=1.5)


@pytest.mark.parametrize("sampler, steps, resample", [("ddpm", None, 1), ("ddpm", None, 3), ("ddim", 4, 2)])
def test_inpainting_keeps_every_kept_pixel(sampler, steps, resample):
    diffusion = tiny_diffusion(size=16, T=10, self_condition=True).eval()
    images = torch.rand(2, 3, 16, 16)
    keep = torch.ones(2, 1, 16, 16)
    keep[:, :, 4:12, 4:12] = 0
    out = edit(diffusion, images, keep=keep, resample=resample, sampler=sampler, steps=steps)
    inside = ~keep.bool().expand_as(images)
    assert torch.equal(out[~inside], images[~inside]) and not torch.equal(out[inside], images[inside])


def test_the_consensus_is_the_fill_the_others_agree_with():
    """Among flat fills the consensus is the median grey (the point of least summed distance); among lines on rows
    10, 12 and 11 it is row 11, which the blur puts nearer each other line, though unblurred every pair differs
    in as many pixels."""
    greys = torch.tensor([[0.9, 0.0, 0.2, 1.0, 0.1], [0.3, 0.35, 1.0, 0.0, 0.95]])
    flat = greys[:, :, None, None, None].expand(2, 5, 1, 32, 32)
    assert consensus(flat).tolist() == [2, 1]
    lines = torch.zeros(1, 3, 1, 32, 32)
    for k, row in enumerate((10, 12, 11)):
        lines[0, k, 0, row] = 1
    assert consensus(lines).tolist() == [2]
    assert consensus(lines[:, :, :, :8, :8].contiguous()).shape == (1,)  # a small side still blurs
    close = torch.tensor([0.501, 0.5, 0.5005])[None, :, None, None, None].expand(1, 3, 1, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the commands call it; bf16 would round all three to 0.5
        assert consensus(close).tolist() == [2]


def test_candidates_return_for_each_image_the_consensus_of_its_own_fills():
    diffusion = tiny_diffusion(size=16, T=10).eval()
    images = torch.rand(2, 3, 16, 16)
    keep = torch.ones(16, 16)  # any shape that broadcasts to the images'
    keep[8:] = 0
    out = edit(diffusion, images, keep=keep, candidates=3, generator=torch.Generator().manual_seed(4))
    fills = edit(diffusion, images.repeat_interleave(3, 0), keep=keep,
                 generator=torch.Generator().manual_seed(4)).view(2, 3, 3, 16, 16)
    chosen = consensus(fills)
    assert torch.equal(out, fills[torch.arange(2), chosen]) and chosen.tolist() != [0, 0]  # not merely the first
    assert torch.equal(out[..., :8, :], images[..., :8, :])
    for bad, keep_given in ((0, keep), (2, None)):
        with pytest.raises(ValueError, match="candidates must be at least 1, and 1 for image-to-image"):
            edit(diffusion, images, keep=keep_given, candidates=bad)


def test_a_trained_model_fills_half_an_image_in_the_colour_of_the_other_half(colour_model):
    """The left half hidden: the fill's colour (its lit channel) is the kept half's far more often than a fill with
    the data's mean colour, with RePaint's resampling and with plain replacement, each with and without the pull
    towards the kept pixels."""
    images, colours = colour_set(per_class=12)
    images = images.float() / 255
    keep = torch.ones(1, 1, 16, 16)
    keep[..., :8] = 0
    agree = {}
    for resample, pull in ((1, 0.0), (3, 0.0), (1, 10.0), (3, 10.0)):
        out = edit(colour_model, images, keep=keep, resample=resample, kept_guidance=pull,
                   generator=torch.Generator().manual_seed(0))
        agree[resample, pull] = float((lit_channel(out[..., :8]) == colours).float().mean())
    mean_fill = torch.where(keep.bool(), images, images.mean(dim=(0, 2, 3))[None, :, None, None])
    agree["mean fill"] = float((lit_channel(mean_fill[..., :8]) == colours).float().mean())
    assert min(v for k, v in agree.items() if k != "mean fill") >= 0.8 and agree["mean fill"] <= 0.4, agree


def test_the_pull_is_minus_the_scale_times_the_gradient_of_the_kept_pixels_distance():
    """A step whose x_0 estimate is x / 2 and whose next state is 0.9 x: the distance's gradient is known, the hole
    gets none of it, the pull lowers the distance, and the last step (to x_0) is not pulled."""
    def step(x, t, t_next, z, x_prev, t_prev, y):
        return 0.9 * x, x / 2

    x, x0 = torch.randn(2, 1, 8, 8), torch.rand(2, 1, 8, 8) * 2 - 1
    keep = torch.ones(2, 1, 8, 8)
    keep[..., 4:, :] = 0
    t = torch.full((2,), 5)
    pulled, estimate = pulled_to_kept(step, x0, keep, 0.1)(x, t, t - 1, None, None, t, None)
    residual = keep * (x0 - x / 2)
    gradient = -0.5 * residual / residual.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(pulled, 0.9 * x - 0.1 * gradient)
    torch.testing.assert_close(estimate, x / 2)
    assert torch.equal(pulled[..., 4:, :], 0.9 * x[..., 4:, :])  # the hole: moved by the step alone
    distance = lambda state: (keep * (x0 - state / 2)).flatten(1).norm(dim=1)  # noqa: E731
    assert bool((distance(pulled) < distance(0.9 * x)).all())
    last, _ = pulled_to_kept(step, x0, keep, 0.1)(x, t, torch.full((2,), -1), None, None, t, None)
    assert torch.equal(last, 0.9 * x)


def test_kept_guidance_changes_the_fill_keeps_the_kept_pixels_and_is_off_at_0(colour_model):
    diffusion = colour_model  # trained: a freshly built network's x_0 estimates are clamped, and so flat, everywhere
    images = torch.rand(2, 3, 16, 16)
    keep = torch.ones(2, 1, 16, 16)
    keep[..., 8:, :] = 0
    run = lambda pull, **kw: edit(diffusion, images, keep=keep, resample=2, sampler="ancestral", steps=4,  # noqa: E731
                                  kept_guidance=pull, generator=torch.Generator().manual_seed(3), **kw)
    plain, pulled = run(0.0), run(10.0)
    assert torch.equal(plain, run(0.0, step=diffusion.sampler_step("ancestral")))  # 0: the chain as before
    kept = keep.bool().expand_as(images)
    assert torch.equal(pulled[kept], images[kept]) and not torch.equal(pulled[~kept], plain[~kept])
    replaced = lambda pull: edit(diffusion, images, keep=keep, sampler="ancestral", steps=4,  # noqa: E731
                                 kept_guidance=pull, generator=torch.Generator().manual_seed(3))
    assert torch.equal(replaced(10.0), replaced(0.0))  # no pull on plain replacement
    with pytest.raises(ValueError, match="kept_guidance must be non-negative"):
        run(-1.0)


def test_a_conditional_model_turns_images_into_the_target_class_at_guidance(bar_model):
    """Horizontal bars redrawn at strength 0.5 towards "vertical": at guidance w = 5 far more of them turn than at
    w = 0, and none without a target class."""
    images, labels = bar_set(80, seed=99)
    horizontal = images[labels == 0].float() / 255
    vertical = torch.ones(len(horizontal), dtype=torch.long)
    share = {}
    for name, classes, w in (("w = 5", vertical, 5.0), ("w = 0", vertical, 0.0),
                             ("no class", torch.full_like(vertical, bar_model.null_class), 0.0)):
        out = edit(bar_model, horizontal, strength=0.5, classes=classes, guidance=w,
                   generator=torch.Generator().manual_seed(0))
        share[name] = float(bar_kind(out).float().mean())
    assert share["w = 5"] >= 0.6 and share["w = 5"] >= share["w = 0"] + 0.3 and share["no class"] <= 0.2, share


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-step tiny run (16 px, 12 made-up 24-pixel images in afhq/train/cat) and its folders."""
    root = tmp_path_factory.mktemp("edits")
    data, cache, save = tiny_run(root, 2)
    return {"data": data / "cat", "save": save, "root": root}


def edit_args(tiny, tmp_path, *flags) -> list[str]:
    return [*TINY_FLAGS, "--load_path", str(tiny["save"] / "model.pt"), "--save_folder", str(tmp_path / "out"),
            "--edits", "2", *map(str, flags)]


def test_inpaint_command_on_ddim_writes_a_grid_a_figure_and_each_result_keeping_the_pixels(tiny, tmp_path):
    assert main.main(edit_args(tiny, tmp_path, "--inpaint", tiny["data"], "--mask", "left", "--resample", 2,
                               "--sampler", "ddim", "--sample_steps", 4)) == 0
    out = tmp_path / "out"
    with Image.open(out / "inpaint-2.png") as grid:
        assert grid.size == (4 * 18 + 2, 12 * 18 + 2)  # input, masked input, 2 results per row; 12 rows
    assert (out / "inpaint-2-figure.png").exists()
    singles = sorted((out / "inpaint-2").iterdir())
    assert len(singles) == 24 and singles[0].name == "img_000-0.png"
    expected, _ = decode_image(tiny["data"] / "img_000.jpg", 16)
    result = np.asarray(Image.open(singles[0]))
    assert np.array_equal(result[:, 8:], expected[:, 8:])  # the right half is kept, to the last bit
    assert not np.array_equal(result[:, :8], expected[:, :8])


def test_strokes_are_drawn_afresh_for_each_result(tiny, tmp_path):
    assert main.main(edit_args(tiny, tmp_path, "--inpaint", tiny["data"] / "img_001.jpg", "--mask", "strokes",
                               "--resample", 1)) == 0
    first, second = (np.asarray(Image.open(tmp_path / "out" / "inpaint-2" / f"img_001-{k}.png")) for k in (0, 1))
    source, _ = decode_image(tiny["data"] / "img_001.jpg", 16)
    assert not np.array_equal(first == source, second == source)  # other pixels kept in each


def test_inpaint_command_with_candidates_writes_each_consensus_keeping_the_pixels(tiny, tmp_path):
    assert main.main(edit_args(tiny, tmp_path, "--inpaint", tiny["data"] / "img_003.jpg", "--mask", "bottom",
                               "--resample", 1, "--candidates", 3)) == 0
    source, _ = decode_image(tiny["data"] / "img_003.jpg", 16)
    for k in (0, 1):
        result = np.asarray(Image.open(tmp_path / "out" / "inpaint-2" / f"img_003-{k}.png"))
        assert np.array_equal(result[:8], source[:8]) and not np.array_equal(result[8:], source[8:])
    assert (tmp_path / "out" / "inpaint-2-figure.png").exists()


def test_img2img_command_writes_a_grid_the_strengths_figure_and_each_result(tiny, tmp_path):
    assert main.main(edit_args(tiny, tmp_path, "--img2img", tiny["data"] / "img_002.jpg", "--strength", 0.3)) == 0
    out = tmp_path / "out"
    with Image.open(out / "img2img-2-s0.3.png") as grid:
        assert grid.size == (3 * 18 + 2, 18 + 2)
    assert (out / "img2img-strengths-2.png").exists()
    assert sorted(p.name for p in (out / "img2img-2-s0.3").iterdir()) == ["img_002-0.png", "img_002-1.png"]


@pytest.fixture(scope="module")
def conditional_tiny(tmp_path_factory):
    """A 1-step class-conditional tiny run on the class folders ginger/ and grey/: (class folders, checkpoint)."""
    from helpers import make_image_folder

    root = tmp_path_factory.mktemp("conditional")
    for name in ("ginger", "grey"):
        classes = make_image_folder(root, count=4, size=20, cls=name)
    assert main.main([*TINY_FLAGS, "--class_conditional", "--data_path", str(classes), "--save_folder",
                      str(root / "run"), "--train_steps", "1", "--save_and_sample_every", "1"]) == 0
    return classes, root / "run" / "model.pt"


def test_img2img_towards_a_class_of_a_conditional_checkpoint(conditional_tiny, tmp_path):
    classes, checkpoint = conditional_tiny
    args = [*TINY_FLAGS, "--load_path", str(checkpoint), "--save_folder", str(tmp_path),
            "--img2img", str(classes / "ginger"), "--sample_class", "grey", "--edits", "1"]
    assert main.main(args) == 0
    assert len(list((tmp_path / "img2img-1-s0.5").iterdir())) == 4
    assert (tmp_path / "img2img-strengths-1.png").exists()


def bad_mask(tmp_path, size, colour) -> str:
    path = tmp_path / f"mask-{size[0]}x{size[1]}-{colour}.png"
    Image.new("L", size, colour).save(path)
    return str(path)


@pytest.mark.parametrize("flags, expected", [
    (lambda t, d: ["--inpaint", d, "--mask", bad_mask(t, (30, 20), 255)], "is 30 x 20 pixels and the images are 24 x 24"),
    (lambda t, d: ["--inpaint", d, "--mask", bad_mask(t, (24, 24), 0)], "hides nothing at 16px"),
    (lambda t, d: ["--inpaint", d, "--mask", bad_mask(t, (24, 24), 255)], "hides every pixel at 16px"),
    (lambda t, d: ["--inpaint", d, "--mask", "middle"], "--mask middle is neither a mask image nor one of centre"),
    (lambda t, d: ["--img2img", d, "--strength", "1.5"], "--strength: expected a number in [0, 1], got '1.5'"),
    (lambda t, d: ["--inpaint", d, "--candidates", "2"], "--candidates: expected 1, or 3 to 64 (two fills have no "
                                                         "majority), got '2'"),
    (lambda t, d: ["--inpaint", d, "--candidates", "65"], "--candidates: expected 1, or 3 to 64"),
    (lambda t, d: ["--img2img", d, "--sample_class", "cat"], "--sample_class needs a class-conditional model"),
    (lambda t, d: ["--img2img", str(t / "nothing")], "does not exist; pass an image or a folder of images"),
    (lambda t, d: ["--img2img", str(t / "empty")], "holds no files"),
    (lambda t, d: ["--inpaint", str(t / "broken.png")], "broken.png cannot be used"),
    (lambda t, d: ["--inpaint", str(t / "notes.txt")], "is not an image"),
])
def test_bad_edits_are_one_line_exit_2_and_write_nothing(tiny, tmp_path, capsys, flags, expected):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "notes.txt").write_text("x")
    try:
        code = main.main(edit_args(tiny, tmp_path, *flags(tmp_path, str(tiny["data"]))))
    except SystemExit as e:
        code = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert not any(p.name.startswith(("inpaint", "img2img")) for p in (tmp_path / "out").glob("*"))


@pytest.mark.parametrize("mode", ["--inpaint", "--img2img"])
def test_edits_need_a_checkpoint(mode, capsys):
    with pytest.raises(SystemExit) as exit_:
        main.main([*TINY_FLAGS, mode, "x.png"])
    assert exit_.value.code == 2 and f"{mode} needs a trained model: add --load_path" in capsys.readouterr().err


def test_a_target_class_the_checkpoint_does_not_know_is_refused(conditional_tiny, tmp_path, capsys):
    classes, checkpoint = conditional_tiny
    args = [*TINY_FLAGS, "--load_path", str(checkpoint), "--save_folder", str(tmp_path / "out"),
            "--img2img", str(classes / "ginger"), "--sample_class", "tabby"]
    assert main.main(args) == 2
    assert "--sample_class tabby is not a class of" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("img2img*"))


def test_edits_are_logged_to_wandb(tiny, tmp_path):
    args = edit_args(tiny, tmp_path, "--inpaint", tiny["data"] / "img_000.jpg", "--img2img",
                     tiny["data"] / "img_001.jpg", "--resample", 1)
    args[args.index("--wandb") + 1] = "offline"
    assert main.main(args) == 0
    logged = {p.name.rsplit("_", 2)[0] for p in (tmp_path / "out" / "wandb").glob("offline-run-*/files/media/images/*")}
    assert logged == {"inpaint-2", "inpaint-2-figure", "img2img-2-s0.5", "img2img-strengths-2"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_edits_run_on_cuda_with_masks_drawn_on_the_cpu(tiny, tmp_path):
    args = edit_args(tiny, tmp_path, "--inpaint", tiny["data"] / "img_000.jpg", "--mask", "strokes", "--img2img",
                     tiny["data"] / "img_001.jpg", "--resample", 2, "--candidates", 3)
    args[args.index("--device") + 1] = "cuda"
    assert main.main(args) == 0
    assert len(list((tmp_path / "out" / "inpaint-2").iterdir())) == 2
