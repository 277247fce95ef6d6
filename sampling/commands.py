"""The commands over a trained model: ``--visualize``, ``--sample``, ``--evaluate``, ``--inpaint``, ``--img2img`` and
``--serve`` (the page, ``serving/page.py``).

``run_commands`` reads what data the commands need (none, most often: ``imagedata.loading.needs_data``), loads the
checkpoint's EMA model once (``sampling.model.load_model``) and runs each command asked for, in that order, as a
function of the loaded model. Every command shows a progress bar over the chains it runs, writes its files into
``--save_folder`` and logs its figures to wandb when wandb is on. Nothing here imports the training step.
"""
from __future__ import annotations

from pathlib import Path

import torch

from evaluation.figures import save_grid, write_process_figures
from evaluation.metrics import MetricsLogger
from imagedata.loading import load_data_for, needs_data
from runtime import distributed
from runtime.errors import UserError
from sampling.edit_commands import img2img_command, inpaint_command
from sampling.ema_sampler import GUIDANCE_SCALES
from sampling.model import LoadedModel, load_model
from settings.record import RunRecord


def class_label(config, classes: tuple[str, ...]) -> int:
    """The label of ``--sample_class``, refused in one line when the model does not know it."""
    if config.sample_class not in classes:
        raise UserError(f"--sample_class {config.sample_class} is not a class of {config.load_path}, which knows "
                        f"{', '.join(classes)}; pass one of those")
    return classes.index(config.sample_class)


def run_commands(config, saved: RunRecord, *, extractor=None) -> None:
    """Run every command ``config`` asks for on the checkpoint ``config.load_path``, whose record is ``saved``;
    ``extractor`` replaces clean-fid's Inception for ``--evaluate``."""
    from evaluation.scoring import statistics_dir

    device = distributed.pick_device(config.device)
    ctx = distributed.Context()
    data = load_data_for(config, device, ctx) if needs_data(config, saved) else None
    image_set = data.image_set if data is not None else None
    run = RunRecord.of_run(config, device=device, world_size=1, data=data, saved=saved,
                           fid_cache_dir=str(statistics_dir(config, image_set).resolve()) if image_set else None)
    label = class_label(config, run.classes) if config.sample_class is not None else None  # before any work
    torch.manual_seed(config.seed)
    model = load_model(config, device=device, run=run)
    print(model.describe())
    logger = MetricsLogger(config.save_folder, config={**config.to_dict(), **run.to_dict()}, wandb_mode=config.wandb,
                           project=config.wandb_project, run_name=config.run_name, resume_step=model.step)
    try:
        if config.visualize:
            report(visualize(model, first_images(model, data)), logger, model.step)
        if config.sample:
            report([write_samples(model, label)])
        if config.evaluate:
            evaluate(model, image_set, extractor)
        if config.inpaint:
            report(inpaint_command(model, label), logger, model.step)
        if config.img2img:
            report(img2img_command(model, label), logger, model.step)
        if config.serve:
            import sys

            from serving.page import serve

            serve(model, config, block="ipykernel" not in sys.modules)  # a notebook shows the page and goes on
    finally:
        logger.close()


def report(paths: list[Path], logger: MetricsLogger | None = None, step: int = 0) -> None:
    """Say what a command wrote, and log its figures (the files, not the folders of single images) to wandb."""
    for path in paths:
        print(f"wrote {path}")
        if logger is not None and path.is_file():
            logger.log_image(path.stem, path, step)


def first_images(model: LoadedModel, data) -> torch.Tensor:
    """The ``--num_vis`` training images the figures show, in [-1, 1]: the checkpoint's own, else the data's."""
    count = model.config.num_vis
    if data is None:
        return model.examples[:count].float().div(127.5).sub(1)
    if data.image_set is not None:
        return data.image_set.images[:count].float().div(127.5).sub(1)
    return next(iter(data.batches)).images[:count]


@torch.no_grad()
def visualize(model: LoadedModel, x_start: torch.Tensor) -> list[Path]:
    """The figures of the forward and backward processes on ``x_start`` ([B, C, H, W] in [-1, 1]) and the backward
    chain's GIF (the assignment's 5.3 and 5.4); for a class-conditional model also the guidance figure."""
    sampler, folder = model.sampler, Path(model.config.save_folder)
    guided = len(model.classes) * max(1, model.config.num_vis // len(model.classes)) if model.classes else 0
    with sampler.progress(len(x_start) + guided * len(GUIDANCE_SCALES), "figures"):
        paths = write_process_figures(model.diffusion, x_start, folder, step=model.step, generator=sampler.generator(),
                                      chain_step=sampler.chain_step(len(x_start), "ddpm"),
                                      progress=sampler.chain_progress(len(x_start)))
        if model.classes:
            paths.append(sampler.guidance_figure(folder / "guidance.png", step=model.step))
    return paths


def write_samples(model: LoadedModel, label: int | None = None) -> Path:
    """The ``--sample`` grid: ``--sample`` images, of the class ``label`` or of every class (a row each) for a
    class-conditional model."""
    config = model.config
    name, labels, per_row = f"samples-{model.step}-{config.sampler}", None, None
    if model.classes:
        if label is not None:
            labels = torch.full((config.sample,), label)
        else:
            labels, per_row = model.sampler.class_rows(config.sample), config.sample
        name += f"-{config.sample_class or 'all'}-w{config.guidance:g}"
    count = config.sample if labels is None else len(labels)
    with model.sampler.progress(count, "sampling"):
        images = model.sampler.sample(count, classes=labels)
    return save_grid(images, Path(config.save_folder) / f"{name}.png", nrow=per_row)


def evaluate(model: LoadedModel, image_set, extractor=None) -> dict:
    """Score the model once with FID and KID (a class-conditional model's per class too), print the result and
    return it."""
    from evaluation.scoring import build_evaluator, cached_reference

    config = model.config
    if image_set is None and cached_reference(config, model.run) is None:
        raise UserError("--evaluate needs the dataset in memory, but it is too large here; lower --image_size")
    evaluator = build_evaluator(config, model.device, image_set, model.run, required=True, extractor=extractor)
    with model.sampler.progress(evaluator.num_samples, "FID samples"):
        result = evaluator.evaluate(model.sampler.fid_sample_fn())
    guided = f", guidance {config.guidance:g}" if model.classes else ""
    print(f"FID {result['fid']:.2f}  KID {result['kid']:.5f}  ({result['fid_samples']} samples, sampler "
          f"{config.sampler_name}{guided}, clean-fid mode {config.fid_mode}, step {model.step}, {result['seconds']:.0f} s)")
    for name in model.classes:
        print(f"  {name}: FID {result[f'fid/{name}']:.2f}  KID {result[f'kid/{name}']:.5f}  "
              f"({result[f'fid_samples/{name}']} samples)")
    return result
