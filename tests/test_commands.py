"""Using a trained model is not training it: the commands over a checkpoint load its EMA model alone, every sampler
and edit runs the one reverse chain, the mathematics imports no settings, and the folders show the design."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main
from helpers import TINY_FLAGS, make_image_folder, tiny_diffusion, tiny_run
from sampling import samplers
from sampling.editing import edit
from settings.config import SAMPLERS, Config

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ("trainer", "training", "settings", "imagedata", "evaluation", "runtime", "sampling")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-step tiny run (16 px, 12 made-up images in afhq/train/cat): its data, cache and save folders."""
    data, cache, save = tiny_run(tmp_path_factory.mktemp("commands"), 2)
    return {"data": data, "cache": cache, "save": save}


COMMANDS = {  # each command over a trained model, and the progress bar it shows
    "--visualize": (["--visualize"], "figures: 100%"),
    "--sample": (["--sample", "4"], "sampling: 100%"),
    "--evaluate": (["--evaluate", "--fid_samples", "4"], "FID samples: 100%"),
    "--inpaint": (["--inpaint", "{data}/cat/img_000.jpg", "--resample", "2", "--edits", "1"], "inpainting: 100%"),
    "--img2img": (["--img2img", "{data}/cat/img_001.jpg", "--edits", "1"], "redrawing: 100%"),
}

# Runs each command in a fresh process in which building an optimizer, a loss scaler or a DDP wrap fails, then
# prints the exit codes and which of the package's modules were imported.
NO_TRAINING = """
import json, sys
import torch
from torch.nn.parallel import DistributedDataParallel

def refuse(name):
    def init(self, *args, **kwargs):
        raise AssertionError(f"a command over a trained model built {name}")
    return init

scalers = (getattr(torch.amp, "GradScaler", None), torch.cuda.amp.GradScaler)  # torch.amp's came with torch 2.3
for cls in (torch.optim.AdamW, torch.optim.Adam, *filter(None, scalers), DistributedDataParallel):
    cls.__init__ = refuse(cls.__name__)
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
import main
from evaluation.fid import FeatureExtractor
from helpers import TinyFeatures

codes = [main.main(argv, extractor=FeatureExtractor(model=TinyFeatures().eval())) for argv in json.loads(sys.argv[2])]
print(json.dumps({"codes": codes, "modules": sorted(m for m in sys.modules if m.split(".")[0] in %r)}))
""" % (PACKAGE,)


def test_the_commands_over_a_trained_model_build_no_optimizer_import_no_training_step_and_show_progress(tiny, tmp_path):
    base = [*TINY_FLAGS, "--load_path", str(tiny["save"] / "model.pt"), "--save_folder", str(tmp_path),
            "--cache_dir", str(tiny["cache"])]
    argvs = [base + [flag.format(data=tiny["data"]) for flag in flags] for flags, _ in COMMANDS.values()]
    result = subprocess.run([sys.executable, "-c", NO_TRAINING, str(ROOT), json.dumps(argvs)], capture_output=True,
                            text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["codes"] == [0] * len(COMMANDS), result.stderr[-3000:]
    modules = set(report["modules"])
    assert {"sampling.model", "sampling.commands", "sampling.editing"} <= modules  # it did load and edit
    assert not modules & {"trainer", "training.step", "training.build", "training.ema", "training.launch"}, modules
    for flags, bar in COMMANDS.values():
        assert bar in result.stderr, (flags, result.stderr[-2000:])
    assert {p.name for p in tmp_path.glob("*.png")} >= {"forward_process.png", "backward_process.png", "inpaint-2.png",
                                                         "samples-2-ancestral.png", "img2img-2-s0.5.png"}


def test_importing_the_diffusion_model_imports_no_settings_files_downloads_or_logging():
    code = ("import sys\nsys.path.insert(0, sys.argv[1])\nimport diffusion, unet\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in %r + ('PIL', 'wandb', 'cleanfid')))"
            % (PACKAGE,))
    result = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert eval(result.stdout) == ["sampling", "sampling.samplers"]  # the samplers the chain runs, nothing else


def test_the_settings_offer_the_samplers_steps_losses_and_archives_their_modules_have():
    """The command line is built without importing torch, so the settings name these choices themselves."""
    import diffusion
    from imagedata.download import AFHQ_URLS
    from settings.config import DOWNLOAD_SOURCES, LOSSES, SAMPLE_STEPS

    assert tuple(samplers.SAMPLERS) == SAMPLERS
    assert samplers.DEFAULT_STEPS == SAMPLE_STEPS
    assert tuple(diffusion.LOSSES) == LOSSES
    assert tuple(AFHQ_URLS) == DOWNLOAD_SOURCES


def test_a_sampler_added_to_the_table_runs_in_sampling_and_in_both_edits(monkeypatch):
    """A new sampler is one function and one entry: this one takes DDIM's step and counts its calls, and sampling,
    inpainting (with resampling) and image-to-image all run it through the one chain."""
    calls = []

    def throwaway_step(diffusion, x, t, t_next, z, x_prev, *, t_prev, y=None, guidance=0.0, eta=0.0):
        calls.append((int(t[0]), int(t_next[0]), z is not None))
        return samplers.ddim_step(diffusion, x, t, t_next, z, x_prev, t_prev=t_prev, y=y, guidance=guidance, eta=eta)

    monkeypatch.setitem(samplers.SAMPLERS, "throwaway", samplers.Sampler(throwaway_step, stochastic=lambda eta: True))
    d = tiny_diffusion(size=16, T=10, self_condition=True).eval()
    images = d.sample(2, sampler="throwaway", steps=4, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert calls == [(9, 6, True), (6, 3, True), (3, 0, True), (0, -1, False)]  # no noise onto x_0

    calls.clear()
    originals = torch.rand(2, 3, 16, 16)
    keep = torch.ones(1, 1, 16, 16)
    keep[..., 4:12, 4:12] = 0
    filled = edit(d, originals, keep=keep, resample=2, sampler="throwaway", steps=4)
    assert torch.equal(filled[keep.bool().expand_as(filled)], originals[keep.bool().expand_as(originals)])
    assert [c[:2] for c in calls] == [(9, 6), (9, 6), (6, 3), (6, 3), (3, 0), (3, 0), (0, -1)]  # twice but the last

    calls.clear()
    redrawn = edit(d, originals, strength=0.5, sampler="throwaway", steps=4)
    assert redrawn.shape == originals.shape and [c[:2] for c in calls] == [(3, 0), (0, -1)]  # from t = 4 down


def test_an_unknown_sampler_is_refused_before_any_noise_is_drawn():
    d = tiny_diffusion(size=16, T=10)
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"sampler must be one of \('ancestral', 'ddpm', .*\), got 'euler'"):
        d.sample(2, sampler="euler")
    assert torch.equal(torch.get_rng_state(), state)


def test_visualize_writes_both_figures_and_the_gif(tmp_path):
    from PIL import Image

    from sampling.commands import visualize
    from sampling.model import LoadedModel

    config = Config(image_size=16, time_steps=10, unet_dim=8, dim_mults=(1, 2), num_res_blocks=1, precision="fp32",
                    save_folder=str(tmp_path))
    model = LoadedModel.of(tiny_diffusion().eval(), config, step=7)
    paths = visualize(model, torch.rand(3, 3, 16, 16) * 2 - 1)
    assert sorted(p.name for p in paths) == ["backward_process.gif", "backward_process.png", "forward_process.png"]
    with Image.open(tmp_path / "backward_process.gif") as gif:
        assert gif.n_frames == 11  # states t = 9 ... 0, then the output
    with Image.open(tmp_path / "forward_process.png") as fig:
        assert fig.width > 200 and fig.height > 150


def test_a_checkpoint_without_a_data_mean_loads_samples_and_says_its_first_step_is_the_networks(tiny, tmp_path):
    from runtime.checkpoint import load_checkpoint, save_checkpoint
    from sampling.model import load_model

    ckpt = load_checkpoint(tiny["save"] / "model.pt")
    assert ckpt["data_mean"]["count"][-1] > 0
    del ckpt["data_mean"]  # as checkpoints were written before it
    save_checkpoint(ckpt, tmp_path / "old.pt")
    config = Config(image_size=16, unet_dim=8, dim_mults=(1, 2), num_res_blocks=1, time_steps=10, device="cpu",
                    save_folder=str(tmp_path))
    old, new = (load_model(config.replace(load_path=str(path))) for path in (tmp_path / "old.pt", tiny["save"] / "model.pt"))
    assert old.diffusion.data_mean is None and new.diffusion.data_mean is not None
    assert "keeps no data mean" in old.describe() and "data mean" not in new.describe()
    drawn = old.sampler.sample(2)
    assert drawn.shape == (2, 3, 16, 16) and not torch.equal(drawn, new.sampler.sample(2))


def test_a_loaded_model_is_the_checkpoints_ema_and_samples_what_training_sampled(tiny, tmp_path):
    from runtime.checkpoint import load_checkpoint
    from sampling.model import load_model

    path = tiny["save"] / "model.pt"
    config = Config(image_size=16, unet_dim=8, dim_mults=(1, 2), num_res_blocks=1, time_steps=10,
                    load_path=str(path), device="cpu", num_samples=4, save_folder=str(tmp_path))
    model = load_model(config)
    ckpt = load_checkpoint(path)
    assert model.step == 2 and not model.diffusion.training
    assert all(torch.equal(model.diffusion.model.state_dict()[k], v) for k, v in ckpt["ema"].items())
    assert not any(p.requires_grad for p in model.diffusion.parameters())
    assert torch.equal(model.examples, ckpt["examples"])
    # the preview noise of training's grids: the last grid training wrote is the loaded model's own
    from evaluation.figures import grid_picture

    images, per_row = model.sampler.preview(4)
    import numpy as np
    from PIL import Image

    with Image.open(tiny["save"] / "sample-2.png") as written:
        assert np.array_equal(np.asarray(grid_picture(images, nrow=2, pad_value=0.0)), np.asarray(written))


def test_a_resume_without_data_path_reads_the_folder_its_checkpoint_records(tmp_path, monkeypatch, capsys):
    from imagedata import download

    monkeypatch.setattr(download, "download_afhq", lambda *a, **k: pytest.fail("tried to download AFHQ"))
    data = make_image_folder(tmp_path / "mine", count=12, size=24, cls="tabby")  # no cat/ folder: data_class all
    save, cache = tmp_path / "run", tmp_path / "cache"
    common = [*TINY_FLAGS, "--save_folder", str(save), "--save_and_sample_every", "2"]
    assert main.main([*common, "--data_path", str(data), "--cache_dir", str(cache), "--train_steps", "2"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # ./data/train, the default --data_path, does not exist here
    capsys.readouterr()
    assert main.main([*common, "--load_path", str(save / "model.pt"), "--train_steps", "4"]) == 0
    out = capsys.readouterr().out
    assert f"--data_path {data}" in out and "--data_class all" in out and f"--cache_dir {cache}" in out
    assert "data: 12 images" in out and torch.load(save / "model.pt", weights_only=True)["step"] == 4
    assert not (elsewhere / "data").exists()


def test_at_most_eight_modules_at_the_root_and_every_folders_modules_in_the_docs():
    root = sorted(p.name for p in ROOT.glob("*.py"))
    assert root == ["diffusion.py", "main.py", "trainer.py", "unet.py"], root
    tree = (ROOT / "docs" / "how-it-works.md").read_text()
    folders = sorted({p.parent.name for p in ROOT.glob("*/__init__.py")})
    assert folders == ["evaluation", "imagedata", "runtime", "sampling", "serving", "settings", "training"]
    for folder in folders:
        for module in sorted((ROOT / folder).glob("*.py")):
            if module.name != "__init__.py":
                named = re.search(rf"\b{module.stem}\.py\b", tree)
                assert named, f"docs/how-it-works.md does not name {folder}/{module.name}"
        assert f"{folder}/" in tree


@pytest.mark.parametrize("columns", [1, 3, 8])
def test_a_figures_title_fits_inside_it_however_narrow(columns):
    """The inpainting figure of one result per image is three columns wide; its title is longer than that."""
    from evaluation.figures import table_figure

    title = "inpainting (centre, 5 resampling(s) per step, ddpm), after 10000 training steps"
    fig = table_figure({f"c{k}": torch.rand(2, 3, 8, 8) for k in range(columns)}, title=title)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box, frame = fig.texts[0].get_window_extent(renderer), fig.bbox
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
    assert fig.texts[0].get_text().replace("\n", " ") == title
    axes_top = max(ax.get_window_extent(renderer).y1 for ax in fig.axes)
    assert axes_top < box.y0  # the column headings stay below the title
    import matplotlib.pyplot as plt

    plt.close(fig)
