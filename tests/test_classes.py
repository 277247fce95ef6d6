"""Class-conditional training and classifier-free guidance, on class folders the tests make: labels from the
folders, label dropout, the guided pass, the sampling paths, grids, figures, per-class FID, checkpoints, the
refusals, and a short run whose guided samples show the class asked for."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import main
from diffusion import Diffusion
from evaluation.scoring import ClassFIDEvaluator
from helpers import TINY_FLAGS, TinyFeatures, lit_channel, train_colours
from imagedata import dataset
from imagedata.batches import Batch, DeviceBatches, StreamingBatches
from runtime.errors import UserError
from sampling.captured_step import ChainStep
from sampling.ema_sampler import GUIDANCE_SCALES
from sampling.model import load_model
from settings.config import Config
from training.step import draw_inputs
from unet import Unet

COLOURS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}  # sorted: labels 0, 1, 2
RGB_LABEL = {"red": 0, "green": 1, "blue": 2}  # the channel each colour lights


def conditional_diffusion(*, num_classes: int = 3, self_condition: bool = True, class_dropout: float = 0.0) -> Diffusion:
    torch.manual_seed(0)
    net = Unet(8, (1, 2), num_res_blocks=1, image_size=16, self_condition=self_condition, num_classes=num_classes)
    torch.nn.init.normal_(net.output[-1].weight, std=0.1)  # an output that depends on the class embedding
    return Diffusion(net, image_size=16, timesteps=10, class_dropout=class_dropout)


def colour_folders(root, counts: dict[str, int], *, size: int = 16, noise: int = 40):
    """``root/<colour>/`` folders of noisy solid-colour PNGs, ``counts[colour]`` each; returns ``root``."""
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = np.clip(np.array(COLOURS[name]) + rng.integers(-noise, noise, (size, size, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


# ------------------------------------------------------------------------------------------------------------
# the network and the guided prediction

def test_the_guided_prediction_is_one_pass_equal_to_the_two_it_replaces():
    d = conditional_diffusion()
    x, t, estimate = torch.randn(4, 3, 16, 16), torch.tensor([0, 3, 6, 9]), torch.rand(4, 3, 16, 16) * 2 - 1
    y = torch.tensor([0, 1, 2, 1])
    calls = []
    d.model.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    with torch.no_grad():
        guided = d.predict_noise(x, t, estimate, y, guidance=2.5)
        assert calls == [8]  # one pass over the batch twice
        conditional = d.predict_noise(x, t, estimate, y)
        unconditional = d.predict_noise(x, t, estimate, torch.full_like(y, d.null_class))
    torch.testing.assert_close(guided, 3.5 * conditional - 2.5 * unconditional, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(conditional, unconditional)  # the labels reach the output
    with torch.no_grad():  # w = 0 is the plain conditional model, in a pass of the batch alone
        torch.testing.assert_close(d.predict_noise(x, t, estimate, y, guidance=0.0), conditional)


def test_no_labels_mean_no_class_and_an_unconditional_network_takes_none():
    d = conditional_diffusion()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 5])
    with torch.no_grad():
        torch.testing.assert_close(d.model(x, t), d.model(x, t, y=torch.full((2,), 3)))
    assert d.null_class == 3 and d.model.class_embed.num_embeddings == 4
    plain = Unet(8, (1, 2), num_res_blocks=1, image_size=16)
    with pytest.raises(ValueError, match="without num_classes"):
        plain(x, t, y=torch.zeros(2, dtype=torch.long))
    assert not hasattr(plain, "class_embed")


def test_label_dropout_replaces_labels_by_no_class_at_its_rate():
    d = conditional_diffusion(class_dropout=0.2)
    y = torch.randint(0, 3, (200_000,))
    dropped = d.drop_labels(y)
    rate = (dropped == d.null_class).float().mean().item()
    assert abs(rate - 0.2) < 0.005
    kept = dropped != d.null_class
    assert torch.equal(dropped[kept], y[kept])
    assert torch.equal(conditional_diffusion(class_dropout=0.0).drop_labels(y), y)
    with pytest.raises(ValueError, match="class_dropout"):
        conditional_diffusion(class_dropout=1.0)


def test_labels_and_guidance_are_checked_before_any_sampling():
    d = conditional_diffusion()
    with pytest.raises(ValueError, match="needs a class-conditional model and class labels"):
        d.sample(2, guidance=1.0)
    with pytest.raises(ValueError, match="non-negative"):
        d.sample(2, classes=torch.tensor([0, 1]), guidance=-1.0)
    with pytest.raises(ValueError, match=r"2 labels in 0 \.\.\. 3"):
        d.sample(2, classes=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="not class-conditional"):
        Diffusion(Unet(8, (1, 2), num_res_blocks=1), image_size=16, timesteps=10).sample(2, classes=torch.tensor([0, 1]))


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5), ("dpmpp_2m", 0.0)])
def test_the_static_chain_step_gives_the_eager_guided_images(sampler, eta):
    d = conditional_diffusion()
    y = torch.tensor([2, 0, 1])

    def draw(step=None):
        generator = torch.Generator().manual_seed(5)
        return d.sample(3, sampler=sampler, steps=6, eta=eta, generator=generator, classes=y, guidance=2.0, step=step)

    expected = draw()
    step = ChainStep(d, (3, 3, 16, 16), sampler=sampler, eta=eta, guidance=2.0, capture=False)
    assert torch.equal(draw(step), expected)
    assert torch.equal(draw(step), expected)  # the static tensors hold nothing over from the last chain
    generator = torch.Generator().manual_seed(5)
    unguided = d.sample(3, sampler=sampler, steps=6, eta=eta, generator=generator, classes=y)
    assert not torch.equal(unguided, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_the_captured_guided_step_samples_what_the_eager_chain_samples_on_a_gpu(sampler):
    d = conditional_diffusion().cuda()
    y = torch.tensor([0, 1, 2, 3], device="cuda")  # the last: "no class"

    def draw(step=None):
        generator = torch.Generator("cuda").manual_seed(5)
        return d.sample(4, sampler=sampler, steps=5, generator=generator, classes=y, guidance=3.0, step=step)

    step = ChainStep(d, (4, 3, 16, 16), sampler=sampler, guidance=3.0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected, first, again = draw(), draw(step), draw(step)  # eager; warm-up and capture; replays only
    assert step.captured.graph is not None
    torch.testing.assert_close(first, expected, rtol=0, atol=2e-3)
    torch.testing.assert_close(again, expected, rtol=0, atol=2e-3)


# ------------------------------------------------------------------------------------------------------------
# labels from the folders, through the cache and the batches

def test_class_folders_give_sorted_labels_that_the_cache_keeps(tmp_path):
    root = colour_folders(tmp_path / "data", {"red": 3, "blue": 5, "green": 2})
    first = dataset.load_images(root, "all", 16, progress=False, cache_dir=tmp_path / "cache")
    again = dataset.load_images(root, "all", 16, progress=False, cache_dir=tmp_path / "cache")
    assert again.from_cache and not first.from_cache
    for image_set in (first, again):
        assert image_set.classes == ("blue", "green", "red")
        assert image_set.labels.tolist() == [0] * 5 + [1] * 2 + [2] * 3
        assert lit_channel(image_set.images.float()).tolist() == [2] * 5 + [1] * 2 + [0] * 3
    keys = first.class_keys()
    assert keys == again.class_keys() and len(set(keys.values())) == 3
    assert keys["blue"] == dataset.pixels_key(first.of_class(0).numpy())


def test_device_batches_serve_each_images_label_and_resume_with_them():
    n = 10
    images = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    images[:, 0] = torch.arange(n, dtype=torch.uint8)[:, None, None]
    labels = torch.arange(n) % 3
    stream = DeviceBatches(images, 3, device="cpu", labels=labels, seed=2)
    served = [next(stream) for _ in range(7)]  # over two epochs
    for x, y in served:
        ids = ((x[:, 0, 0, 0] + 1) * 127.5).round().long()
        assert torch.equal(y, ids % 3)
    state = stream.state_dict()
    expected = [next(stream) for _ in range(4)]
    resumed = DeviceBatches(images, 3, device="cpu", labels=labels, seed=2)
    resumed.load_state_dict(state)
    for (x, y), (x2, y2) in zip(expected, [next(resumed) for _ in range(4)]):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_streaming_gives_an_unreadable_files_place_and_its_label_to_the_next_file(tmp_path):
    root = colour_folders(tmp_path, {"blue": 2, "green": 2, "red": 2})
    files = dataset.find_images(root, "all")
    classes, labels = dataset.class_labels(files, root)
    files[1].write_bytes(b"broken")  # the second blue: served as the first green, with its label
    stream = StreamingBatches(files, 16, 6, device="cpu", num_workers=0, flip=False, labels=labels)
    with pytest.warns(UserWarning, match="unreadable"):
        x, y = next(stream)
    assert classes == ("blue", "green", "red")
    assert torch.equal(2 - lit_channel(x), y)  # blue lights channel 2 and is label 0, red the reverse
    assert y.bincount(minlength=3).tolist() == [1, 3, 2]


def test_conditional_batches_need_two_class_folders(tmp_path):
    root = colour_folders(tmp_path, {"red": 4})
    with pytest.raises(UserError, match=r"at least two class folders .* only red/"):
        dataset.make_batches(root, "all", 16, 2, device="cpu", progress=False, labelled=True)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_labels_go_through_the_pass_as_the_images_do(grad_accum):
    """One pass over k batches puts every label beside its image, self-conditioned halves first, dropout drawn
    after each batch's noise."""
    d = conditional_diffusion(class_dropout=0.5)
    images = [torch.rand(4, 3, 16, 16) for _ in range(grad_accum)]
    labels = [torch.tensor([0, 1, 2, 0]) + i for i in range(grad_accum)]
    torch.manual_seed(3)
    x, t, noise, conditioned, y, keep = draw_inputs(d, [Batch(*pair) for pair in zip(images, labels)])
    torch.manual_seed(3)
    separate = [draw_inputs(d, [Batch(images[i], labels[i])]) for i in range(grad_accum)]
    order = [(i, j) for j in (slice(0, 2), slice(2, 4)) for i in range(grad_accum)]
    assert conditioned == 2 * grad_accum
    assert torch.equal(x, torch.cat([images[i][j] for i, j in order]))
    assert torch.equal(y, torch.cat([separate[i][4][j] for i, j in order]))
    assert torch.equal(noise, torch.cat([separate[i][2][j] for i, j in order]))


# ------------------------------------------------------------------------------------------------------------
# guidance steers a short run to the class asked for

def test_guided_samples_show_the_requested_class_far_more_often_than_unguided_or_unconditional_ones(tmp_path):
    asked = torch.arange(3).repeat_interleave(30)
    conditional = train_colours(tmp_path, conditional=True)
    # the first step's estimate, the asked class's mean colour, draws that class already
    assert (lit_channel(conditional.sample(90, classes=asked, guidance=0.0)) == asked).float().mean() >= 0.9
    conditional.ema.set_data_mean(None)  # guidance through the network alone
    share = {w: (lit_channel(conditional.sample(90, classes=asked, guidance=w)) == asked).float().mean().item()
             for w in (0.0, 5.0)}
    unconditional = (lit_channel(train_colours(tmp_path, conditional=False).sample(90)) == asked).float().mean().item()
    assert share[5.0] >= share[0.0] + 0.2 and share[5.0] >= unconditional + 0.3 and share[5.0] >= 0.6, \
        (share, unconditional)


# ------------------------------------------------------------------------------------------------------------
# main.py: training, sampling by class name, figures, scores, checkpoints and refusals

def tiny_args(data, save, *extra) -> list[str]:
    return [*TINY_FLAGS, "--data_path", str(data), "--save_folder", str(save), *map(str, extra)]


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    """A 4-step class-conditional run on three colour folders of uneven sizes."""
    root = tmp_path_factory.mktemp("classes")
    data = colour_folders(root / "data", {"red": 6, "green": 9, "blue": 5})
    save = root / "run"
    assert main.main(tiny_args(data, save, "--class_conditional", "--train_steps", 4, "--save_and_sample_every", 2,
                               "--num_samples", 4, "--cache_dir", root / "cache")) == 0
    return data, save, root / "cache"


def grid_shape(path) -> tuple[int, int]:
    """(rows, columns) of a torchvision grid of 16-pixel images (2-pixel padding)."""
    width, height = Image.open(path).size
    return (height - 2) // 18, (width - 2) // 18


def test_conditional_training_records_its_classes_and_draws_a_grid_row_per_class(conditional_run):
    data, save, _ = conditional_run
    record = json.loads((save / "config.json").read_text())
    assert record["classes"] == ["blue", "green", "red"] and record["class_sizes"] == [5, 9, 6]
    assert record["class_conditional"] is True and record["class_dropout"] == 0.1
    ckpt = torch.load(save / "model.pt", weights_only=True)
    assert ckpt["run"]["classes"] == ["blue", "green", "red"] and ckpt["config"]["class_conditional"] is True
    assert ckpt["ema"]["class_embed.weight"].shape[0] == 4
    assert grid_shape(save / "sample-4.png") == (3, 2)  # ceil(4 / 3) images in each class's row


def test_sampling_by_class_name_needs_no_data(conditional_run, tmp_path, capsys):
    _, save, _ = conditional_run
    out = tmp_path / "out"
    gone = tmp_path / "no-data"
    base = ["--load_path", save / "model.pt"]
    assert main.main(tiny_args(gone, out, *base, "--sample", 4, "--sample_class", "green", "--guidance", 3)) == 0
    assert grid_shape(out / "samples-4-ancestral-green-w3.png") == (2, 2)
    assert main.main(tiny_args(gone, out, *base, "--sample", 3)) == 0
    assert grid_shape(out / "samples-4-ancestral-all-w1.png") == (3, 3)  # every class, a row each
    assert "error" not in capsys.readouterr().err


def test_visualize_adds_the_figure_of_classes_by_guidance_scales(conditional_run, tmp_path):
    data, save, _ = conditional_run
    out = tmp_path / "figures"
    assert main.main(tiny_args(data, out, "--load_path", save / "model.pt", "--visualize", "--num_vis", 6)) == 0
    assert {p.name for p in out.iterdir()} >= {"forward_process.png", "backward_process.png", "guidance.png"}


def test_guidance_figure_rows_share_their_noise_across_scales(conditional_run, tmp_path, monkeypatch):
    """A row per class and --num_vis // classes rows of each; every column is the preview noise, guided by its w."""
    from sampling import ema_sampler as sampling

    _, save, _ = conditional_run
    drawn = {}
    monkeypatch.setattr(sampling, "save_guidance_figure",
                        lambda images, names, path, title: drawn.update(images=images, names=names) or path)
    config = Config(image_size=16, unet_dim=8, dim_mults=(1, 2), num_res_blocks=1, time_steps=10, num_vis=6,
                    class_conditional=True, save_folder=str(tmp_path), load_path=str(save / "model.pt"))
    t = load_model(config, device="cpu")
    assert t.classes == ("blue", "green", "red")
    t.sampler.guidance_figure(tmp_path / "guidance.png", step=t.step)
    assert drawn["names"] == ["blue", "blue", "green", "green", "red", "red"]
    assert list(drawn["images"]) == list(GUIDANCE_SCALES)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    for w, images in drawn["images"].items():
        assert torch.equal(images, t.sampler.sample(6, classes=labels, guidance=w))  # the same noise at every w
    assert not torch.equal(drawn["images"][0.0], drawn["images"][GUIDANCE_SCALES[-1]])


def test_fid_is_scored_per_class_and_over_all_classes(tmp_path, capsys):
    from evaluation import fid

    data = colour_folders(tmp_path / "data", {"red": 6, "green": 9, "blue": 5})
    save, cache = tmp_path / "run", tmp_path / "cache"
    stand_in = fid.FeatureExtractor(model=TinyFeatures().eval())
    assert main.main(tiny_args(data, save, "--class_conditional", "--train_steps", 2, "--save_and_sample_every", 2,
                               "--fid", "--fid_samples", 12, "--cache_dir", cache), extractor=stand_in) == 0
    [record] = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines() if "fid" in line]
    assert record["fid_samples"] == 12
    assert [record[f"fid_samples/{c}"] for c in ("blue", "green", "red")] == [3, 5, 4]  # as the classes' sizes
    assert all(record[f"fid/{c}"] >= 0 for c in ("blue", "green", "red"))
    assert len(list(cache.glob("fid_ref_clean_16px_*.npz"))) == 4  # all classes, and each class
    assert (save / "fid.png").exists()
    shutil.rmtree(data)  # the statistics are cached: scoring needs no images
    capsys.readouterr()
    assert main.main(tiny_args(data, save, "--load_path", save / "model.pt", "--evaluate", "--fid_samples", 12,
                               "--cache_dir", cache, "--guidance", 2), extractor=stand_in) == 0
    out = capsys.readouterr().out
    assert "guidance 2" in out and all(f"  {c}: FID " in out for c in ("blue", "green", "red"))


def refusal(argv, capsys) -> str:
    """The one error line of a refused command (after any progress bar of work done before the refusal)."""
    assert main.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    said = [line for line in err if "%|" not in line]
    assert len(said) == 1 and said[0] == err[-1] and said[0].startswith("error: "), err
    return said[0]


def test_bad_requests_are_one_line_and_exit_2(conditional_run, tmp_path, capsys):
    data, save, cache = conditional_run
    ckpt = save / "model.pt"
    out = tmp_path / "out"
    err = refusal(tiny_args(data, out, "--load_path", ckpt, "--sample", 2, "--sample_class", "lion"), capsys)
    assert "--sample_class lion is not a class of" in err and "knows blue, green, red" in err
    with pytest.raises(SystemExit) as exit_info:
        main.main(tiny_args(data, out, "--load_path", ckpt, "--sample", 2, "--guidance", -1))
    assert exit_info.value.code == 2 and "--guidance: expected a non-negative number" in capsys.readouterr().err
    err = refusal(tiny_args(data, out, "--load_path", ckpt, "--sample_class", "red"), capsys)
    assert "add --sample" in err

    plain_data = colour_folders(tmp_path / "plain", {"red": 6})
    (plain_data / "red").rename(plain_data / "cat")
    plain = tmp_path / "plain-run"
    assert main.main(tiny_args(plain_data, plain, "--train_steps", 1)) == 0
    capsys.readouterr()
    for flag, value in (("--guidance", 2), ("--sample_class", "red")):
        err = refusal(tiny_args(plain_data, out, "--load_path", plain / "model.pt", "--sample", 2, flag, value), capsys)
        assert f"{flag} needs a class-conditional model" in err and "is an unconditional model" in err
    err = refusal(tiny_args(plain_data, out, "--class_dropout", 0.2), capsys)
    assert "--class_dropout needs a class-conditional model, and this run is unconditional" in err
    err = refusal(tiny_args(plain_data, tmp_path / "one", "--class_conditional"), capsys)
    assert "needs at least two class folders" in err and "only cat/" in err
    err = refusal(tiny_args(data, tmp_path / "two", "--class_conditional", "--data_class", "cat"), capsys)
    assert "drop --data_class cat" in err

    other = colour_folders(tmp_path / "other", {"red": 4, "green": 4})
    err = refusal(tiny_args(other, save, "--load_path", ckpt, "--train_steps", 6, "--cache_dir", cache), capsys)
    assert "was trained on the classes blue, green, red" in err and "holds green, red" in err


def test_resuming_a_conditional_run_goes_on_with_its_classes(conditional_run, tmp_path, capsys):
    data, save, cache = conditional_run
    run = tmp_path / "resumed"
    shutil.copytree(save, run)
    assert main.main(tiny_args(data, run, "--load_path", run / "model.pt", "--train_steps", 6,
                               "--save_and_sample_every", 3, "--cache_dir", cache)) == 0
    assert "--class_conditional True" in capsys.readouterr().out  # adopted from the checkpoint
    ckpt = torch.load(run / "model.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["run"]["classes"] == ["blue", "green", "red"]


def test_two_processes_with_torchrun_train_a_conditional_model_with_identical_weights(tmp_path):
    """torchrun with two processes on the CPU (gloo): the ranks' weights agree, rank 0 alone reports, the labels
    travel with each rank's shard, and the checkpoint loads in a single process."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data = colour_folders(tmp_path / "data", {"red": 8, "green": 8, "blue": 8})
    save = tmp_path / "ddp"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(root, "main.py"), *tiny_args(data, save, "--class_conditional",
                                                                       "--train_steps", 2)],
                            capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "weights identical on all 2 ranks" in result.stdout
    assert result.stdout.count("done:") == 1  # rank 0 alone reports, saves and samples
    config = json.loads((save / "config.json").read_text())
    assert config["world_size"] == 2 and config["effective_batch_size"] == 16  # 4 x 2 batches x 2 processes
    ckpt = torch.load(save / "model.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["run"]["classes"] == ["blue", "green", "red"]
    assert main.main(tiny_args(data, save, "--load_path", save / "model.pt", "--sample", 3)) == 0


def test_the_fid_curve_draws_a_line_per_class_beside_all_classes(tmp_path):
    from evaluation.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, config={})
    for step in (2, 4):
        logger.log({"step": step, "loss": 0.5})
        logger.log({"step": step, "fid": 30.0 / step, "fid/cat": 40.0 / step, "fid/dog": float("nan")})
    drawn = logger.curves()
    assert drawn["loss.png"] == {"loss": [(2, 0.5), (4, 0.5)]}
    assert drawn["fid.png"] == {"all classes": [(2, 15.0), (4, 7.5)], "cat": [(2, 20.0), (4, 10.0)]}
    assert sorted(p.name for p in logger.plot()) == ["fid.png", "loss.png"]


def test_all_classes_statistics_come_from_the_classes_features_without_a_second_inception_pass(tmp_path):
    from evaluation import fid

    images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2] * 4)
    extractor = fid.FeatureExtractor(model=TinyFeatures().eval())

    def evaluator(key, batch, folder):
        return fid.FIDEvaluator(real_key=key, image_size=16, real_batches=lambda: [batch], num_samples=6,
                                cache_dir=folder, extractor=extractor)

    def never():
        raise AssertionError("the images of all classes went through Inception again")

    overall = fid.FIDEvaluator(real_key="all", image_size=16, real_batches=never, num_samples=6,
                               cache_dir=tmp_path / "pooled", extractor=extractor)
    per_class = {str(c): evaluator(f"c{c}", images[labels == c], tmp_path / "pooled") for c in range(3)}
    pooled = ClassFIDEvaluator(overall, per_class, [4, 4, 4]).reference()
    direct = evaluator("all", images, tmp_path / "direct").reference()
    np.testing.assert_allclose(pooled.mu, direct.mu, rtol=1e-6)
    np.testing.assert_allclose(pooled.sigma, direct.sigma, rtol=1e-5, atol=1e-9)
    assert (tmp_path / "pooled" / fid.statistics_file("clean", 16, "all")).exists()  # cached like any statistics
