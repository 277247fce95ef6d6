"""Training on a user's own folder: any layout, any folder names, grayscale, sizes other than 32 px, and a checkpoint
that records what its data was. Every folder here is made by the test."""
from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch
from PIL import Image

import main
from helpers import TINY_FLAGS, TinyFeatures
from runtime import checkpoint as ckpt_io
from settings.config import Config, recorded

STEPS = ["--train_steps", "1", "--save_and_sample_every", "1"]


def picture(size: int = 20, *, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).convert(mode)


def fill(folder, count: int, *, ext: str = "png", start: int = 0, mode: str = "RGB") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        picture(seed=i, mode=mode).save(folder / f"img {i:02d}.{ext}")


def train(data, save, *flags, cache=None, extractor=None) -> int:
    cache = cache or save.parent / "cache"
    return main.main([*TINY_FLAGS, *STEPS, "--data_path", str(data), "--save_folder", str(save), "--cache_dir",
                      str(cache), *map(str, flags)], extractor=extractor)


def recorded_data(save) -> dict:
    return ckpt_io.load_checkpoint(save / "model.pt")["run"]["data"]


def test_a_flat_folder_trains_without_data_class_and_says_what_it_found(tmp_path, capsys):
    fill(tmp_path / "flowers", 6)
    (tmp_path / "flowers" / "notes.txt").write_text("not an image")
    (tmp_path / "flowers" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.warns(UserWarning, match="skipped 1 unreadable image file"):
        assert train(tmp_path / "flowers", tmp_path / "run") == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("data: ")]
    assert lines == [f"data: 6 images in {tmp_path / 'flowers'} (flat: ./ (6)), 16px RGB; skipped 2 files (1 not an "
                     f"image, 1 unreadable)"]
    data = recorded_data(tmp_path / "run")
    assert data["layout"] == "flat" and data["folder"] == "all" and data["images"] == 6
    assert data["image_size"] == 16 and data["channels"] == 3 and len(data["key"]) == 16 and data["examples"] == 6


def test_nested_folders_train_on_every_image_and_data_class_picks_one(tmp_path, capsys):
    root = tmp_path / "pics"
    fill(root, 2)  # loose images beside the folders
    fill(root / "roses" / "2024", 3, ext="jpg", start=2)
    fill(root / "tulips", 4, ext="bmp", start=5)
    fill(root / ".thumbnails", 5, start=9)  # hidden: never read
    assert train(root, tmp_path / "all") == 0
    assert f"data: 9 images in {root} (nested: ./ (2), roses/ (3), tulips/ (4))" in capsys.readouterr().out
    assert train(root, tmp_path / "roses", "--data_class", "roses") == 0
    assert f"data: 3 images in {root / 'roses'} (nested: 2024/ (3))" in capsys.readouterr().out
    assert recorded_data(tmp_path / "roses")["folder"] == "roses"


def test_afhq_layout_keeps_reading_cat_when_data_class_is_not_given(tmp_path, capsys):
    fill(tmp_path / "train" / "cat", 4)
    fill(tmp_path / "train" / "dog", 5, start=4)
    assert train(tmp_path / "train", tmp_path / "run") == 0
    assert f"data: 4 images in {tmp_path / 'train' / 'cat'} (flat" in capsys.readouterr().out


def test_an_unknown_data_class_lists_the_folders_there(tmp_path, capsys):
    fill(tmp_path / "pics" / "roses", 2)
    fill(tmp_path / "pics" / "tulips", 2)
    assert train(tmp_path / "pics", tmp_path / "run", "--data_class", "daisies") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --data_path {tmp_path / 'pics'} has no daisies/ folder; its folders are roses/, tulips/: "
                   f"pass one of them as --data_class, or --data_class all to train on every image under it"]
    assert not (tmp_path / "run" / "model.pt").exists()


@pytest.mark.parametrize("make, expected", [
    (lambda f: None, "holds no files; put the images there"),
    (lambda f: (f / "a.txt").write_text("x"), "holds no images (.jpg, .jpeg, .png, .webp, .bmp, .gif, .tif, .tiff), "
                                               "only 1 other file (such as a.txt)"),
    (lambda f: picture(6).save(f / "tiny.png"), "the 1 image under"),
])
def test_a_folder_without_usable_images_is_one_line_and_writes_nothing(tmp_path, capsys, make, expected):
    folder = tmp_path / "empty"
    folder.mkdir()
    make(folder)
    assert train(folder, tmp_path / "run", "--data_class", "all") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "run" / "model.pt").exists() and not (tmp_path / "run" / "config.json").exists()


def test_every_format_a_symlinked_folder_and_names_in_any_script(tmp_path, capsys):
    root = tmp_path / "mixed"
    for ext in ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "PNG"):
        fill(root, 1, ext=ext, start=len(list(root.glob("*"))) if root.exists() else 0)
    fill(tmp_path / "outside", 2, start=20)
    (tmp_path / "outside" / "éléphant 猫.png").write_bytes((tmp_path / "outside" / "img 20.png").read_bytes())
    os.symlink(tmp_path / "outside", root / "linked")
    os.symlink(root, root / "linked" / "back")  # a loop: read once
    assert train(root, tmp_path / "run", "--batch_size", 4) == 0
    assert f"data: 12 images in {root} (nested: ./ (9), linked/ (3))" in capsys.readouterr().out


def test_class_folders_with_any_names_train_a_conditional_model(tmp_path, capsys):
    for i, name in enumerate(("Ahornblätter", "oak leaves")):
        fill(tmp_path / "leaves" / name, 3, start=3 * i)
    assert train(tmp_path / "leaves", tmp_path / "run", "--class_conditional") == 0
    assert "(class folders: Ahornblätter/ (3), oak leaves/ (3))" in capsys.readouterr().out
    data = recorded_data(tmp_path / "run")
    assert data["layout"] == "class folders" and data["classes"] == ["Ahornblätter", "oak leaves"]
    fill(tmp_path / "leaves", 1, start=9)  # a loose image has no class
    assert train(tmp_path / "leaves", tmp_path / "again", "--class_conditional") == 2
    assert "1 image lies directly in" in capsys.readouterr().err


def test_a_folder_smaller_than_a_batch_trains(tmp_path, capsys):
    fill(tmp_path / "few", 3)
    assert train(tmp_path / "few", tmp_path / "run", "--batch_size", 8) == 0
    assert "fewer images than --batch_size 8, so each batch holds some twice or more" in capsys.readouterr().out


def test_grayscale_trains_a_one_channel_network_writes_grey_samples_and_scores_them(tmp_path):
    from evaluation import fid

    fill(tmp_path / "digits", 6, mode="L")
    extractor = fid.FeatureExtractor(model=TinyFeatures().eval())
    assert train(tmp_path / "digits", tmp_path / "run", "--channels", 1, "--fid", "--fid_samples", 4,
                 extractor=extractor) == 0
    ckpt = ckpt_io.load_checkpoint(tmp_path / "run" / "model.pt")
    first = next(k for k in ckpt["model"] if k.endswith("weight") and ckpt["model"][k].dim() == 4)
    assert ckpt["model"][first].shape[1] == 2  # 1 channel, and its self-conditioning estimate
    assert ckpt["examples"].shape == (6, 1, 16, 16) and ckpt["run"]["data"]["channels"] == 1
    assert np.isfinite(ckpt["history"][-1]["fid"])
    with Image.open(tmp_path / "run" / "sample-1.png") as grid:
        assert grid.mode == "L"
    assert main.main([*TINY_FLAGS, "--load_path", str(tmp_path / "run" / "model.pt"), "--sample", "4",
                      "--save_folder", str(tmp_path / "run")]) == 0  # --channels 1 comes from the checkpoint
    with Image.open(tmp_path / "run" / "samples-1-ancestral.png") as grid:
        assert grid.mode == "L"


def test_a_channel_setting_that_contradicts_the_checkpoint_is_refused_before_any_data(tmp_path, capsys):
    fill(tmp_path / "pics", 4)
    assert train(tmp_path / "pics", tmp_path / "run") == 0
    (tmp_path / "pics").rename(tmp_path / "gone")
    assert train(tmp_path / "pics", tmp_path / "run", "--load_path", tmp_path / "run" / "model.pt",
                 "--channels", 1, "--train_steps", 2) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "channels=3 in the checkpoint but 1 here; rerun with --channels 3" in err[0]


def test_resuming_on_other_data_is_refused_saying_how_it_differs(tmp_path, capsys):
    fill(tmp_path / "pics", 4)
    assert train(tmp_path / "pics", tmp_path / "run") == 0
    before = (tmp_path / "run" / "model.pt").read_bytes()
    resume = ["--load_path", tmp_path / "run" / "model.pt", "--train_steps", 2]
    fill(tmp_path / "pics", 1, start=4)
    assert train(tmp_path / "pics", tmp_path / "run", *resume) == 2
    assert "was trained on 4 images, and --data_path" in capsys.readouterr().err
    (tmp_path / "pics" / "img 04.png").unlink()
    picture(seed=99).save(tmp_path / "pics" / "img 03.png")
    assert train(tmp_path / "pics", tmp_path / "run", *resume) == 2
    assert "4 images whose pixels differ from those it was trained on" in capsys.readouterr().err
    assert (tmp_path / "run" / "model.pt").read_bytes() == before


@pytest.mark.parametrize("size, mults, attention", [
    (32, (1, 2, 4, 8), (3,)), (64, (1, 2, 4, 8, 8), (3,)), (128, (1, 1, 2, 4, 8, 8), (4,)),
    (48, (1, 2, 4, 8, 8), (3,))])
def test_each_size_gets_its_network_and_flags_override_it(size, mults, attention):
    from sampling.model import build_diffusion

    config = Config(image_size=size, unet_dim=8)
    assert (config.dim_mults, config.attention_levels) == (mults, attention)
    net = build_diffusion(config).model
    with torch.no_grad():
        out = net(torch.zeros(1, 3, size, size), torch.zeros(1, dtype=torch.long), torch.zeros(1, 3, size, size))
    assert out.shape == (1, 3, size, size) and net.attention_levels == attention
    assert Config(image_size=size, dim_mults=(1, 2)).attention_levels == (1,)
    assert Config(image_size=size, attention_levels=(0,)).attention_levels == (0,)


def test_a_checkpoint_of_an_earlier_version_keeps_its_network():
    """Earlier checkpoints record ``attention_levels: None`` (the lowest level) and no ``channels``."""
    saved = {"image_size": 64, "dim_mults": [1, 2, 4, 8], "attention_levels": None, "unet_dim": 16}
    assert recorded(saved, training=False)["attention_levels"] == (3,)
    ckpt_io.check_architecture(saved, Config(image_size=64, dim_mults=(1, 2, 4, 8)), "old.pt")


@pytest.mark.parametrize("size, mults, attention", [(64, (1, 1, 2, 4, 8), (3, 4)), (128, (1, 1, 2, 2, 4, 8), (4, 5))])
def test_a_checkpoint_of_a_former_size_network_keeps_it(tmp_path, size, mults, attention):
    """Before their networks were chosen by FID, 64 px got ``1 1 2 4 8`` and 128 px ``1 1 2 2 4 8``, each with
    attention at 8 x 8 and 4 x 4; such a checkpoint records its network, and loading it builds that network and
    its weights, not today's."""
    from sampling.model import build_diffusion, load_model
    from settings.cli import build_parser, parse

    former = Config(image_size=size, unet_dim=8, dim_mults=mults, attention_levels=attention)
    assert (Config(image_size=size).dim_mults, Config(image_size=size).attention_levels) != (mults, attention)
    state = build_diffusion(former).model.state_dict()
    ckpt_io.save_checkpoint({"format": ckpt_io.FORMAT, "step": 7, "config": former.to_dict(), "model": state},
                            tmp_path / "old.pt")
    parser = build_parser()
    config, named = parse(["--load_path", str(tmp_path / "old.pt"), "--sample", "4", "--device", "cpu"], parser)
    config, adopted, _ = main.adopt_checkpoint_settings(config, named, parser)
    assert (config.dim_mults, config.attention_levels) == (mults, attention) == (adopted["dim_mults"],
                                                                                 adopted["attention_levels"])
    model = load_model(config)
    assert model.step == 7 and model.diffusion.model.attention_levels == attention
    assert all(torch.equal(v, state[k]) for k, v in model.diffusion.model.state_dict().items())


def test_the_memory_check_says_what_to_lower():
    from runtime.errors import UserError
    from runtime.memory import activation_bytes_per_image, batch_memory
    from sampling.model import build_diffusion

    config = Config(image_size=16, unet_dim=8, dim_mults=(1, 2), batch_size=32, grad_accum=2)
    diffusion = build_diffusion(config)
    per_image = activation_bytes_per_image(diffusion)
    assert batch_memory(diffusion, config, torch.device("cpu"), free=64 * per_image).startswith(
        "memory: a batch's activations take about")
    with pytest.raises(UserError, match=r"a batch of 32 images at 16px needs about .* GiB for its activations, more "
                                        r"than half of the .* GiB free on cpu; lower --batch_size to 10 and raise "
                                        r"--grad_accum to 7 to keep the effective batch of 64, or lower --image_size"):
        batch_memory(diffusion, config, torch.device("cpu"), free=20 * per_image)


def test_large_folders_stream_with_the_same_layout_rules(tmp_path, monkeypatch):
    import warnings

    from imagedata import dataset
    from imagedata.batches import DataWarning, StreamingBatches

    root = tmp_path / "pics"
    fill(root, 2, mode="L")
    fill(root / "deeper", 3, start=2, mode="L")
    monkeypatch.setattr(dataset, "available_memory_bytes", lambda: 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        data = dataset.make_batches(root, "all", 16, 4, device="cpu", progress=False, channels=1)
    assert isinstance(data.batches, StreamingBatches) and data.image_set is None
    assert data.summary == (f"data: 5 images in {root} (nested: ./ (2), deeper/ (3)), 16px grey; decoded from disk "
                            f"as it trains")
    assert next(data.batches).images.shape == (4, 1, 16, 16)


def test_visualize_and_score_a_grey_checkpoint_with_the_data_gone(tmp_path, capsys):
    from evaluation import fid

    fill(tmp_path / "digits", 5, mode="L")
    extractor = fid.FeatureExtractor(model=TinyFeatures().eval())
    run = functools.partial(train, extractor=extractor)
    assert run(tmp_path / "digits", tmp_path / "run", "--channels", 1, "--fid", "--fid_samples", 4) == 0
    (tmp_path / "digits").rename(tmp_path / "gone")
    for cached in (tmp_path / "cache").glob("all_*"):
        cached.unlink()
    load = ["--load_path", tmp_path / "run" / "model.pt"]
    assert run(tmp_path / "digits", tmp_path / "run", *load, "--visualize", "--num_vis", 5) == 0
    assert run(tmp_path / "digits", tmp_path / "run", *load, "--evaluate", "--fid_samples", 4) == 0
    assert "FID " in capsys.readouterr().out
