"""The data side of a command: which images it reads, whether it needs them at all, and loading them.

``--data_class`` not given reads ``cat/`` when ``--data_path`` has one (AFHQ's layout, the assignment's command),
and otherwise every image under ``--data_path``; given, it names the sub-folder to read (or ``all``). A
checkpoint records what its data was (``settings.record.RunRecord.data``) and keeps a few of its images, so ``--sample``
never needs the data, ``--visualize`` only for more figure rows than the checkpoint keeps, and ``--evaluate``
only until the FID statistics are cached.
"""
from __future__ import annotations

from pathlib import Path

from imagedata.files import has_images
from runtime.errors import UserError
from settings.config import Config


def resolve_data_class(config: Config, named: set[str]) -> Config:
    """``config`` reading every image under --data_path when --data_class was not given and there is no cat/
    folder there but there are images."""
    if "data_class" in named or config.class_conditional:
        return config
    root = Path(config.data_path).expanduser()
    if (root / config.data_class).is_dir() or not has_images(root):
        return config  # AFHQ's layout, or nothing there yet (the download, or the error, says what next)
    return config.replace(data_class="all")


def needs_data(config: Config, saved) -> bool:
    """Training needs the images; --visualize when the checkpoint keeps fewer than --num_vis of them; --evaluate
    until their FID statistics are cached; --sample never."""
    from evaluation.scoring import cached_reference

    if config.trains or (config.visualize and saved.data.get("examples", 0) < config.num_vis):
        return True
    return config.evaluate and cached_reference(config, saved) is None


def load_data(config: Config, device, ctx):
    """The training data (``imagedata.dataset.TrainingData``, its batches sharded per rank); rank 0 downloads and
    builds the cache first, and prints the one line saying what it found."""
    from imagedata import dataset, download
    from runtime import distributed

    if ctx.is_main:
        download.ensure_dataset(config.data_path, config.data_selection, download=config.download,
                                source=config.dataset_source)
    for turn in ("main", "others"):  # the other ranks read the cache rank 0 has just written
        if (turn == "main") == ctx.is_main:
            data = dataset.make_batches(
                config.data_path, config.data_selection, config.image_size, config.batch_size, device=device,
                flip=config.flip, seed=config.seed, rank=ctx.rank, world_size=ctx.world_size,
                cache_dir=config.cache_dir, progress=ctx.is_main, labelled=config.class_conditional,
                channels=config.channels)
        distributed.barrier(ctx)
    if ctx.is_main:
        print(data.summary)
    return data


def load_data_for(config: Config, device, ctx):
    """``load_data``, with missing data under --visualize and --evaluate said as what those commands need."""
    try:
        return load_data(config, device, ctx)
    except UserError as e:
        if config.visualize:
            raise UserError(f"--visualize shows real training images going through both processes (the checkpoint "
                            f"keeps fewer than --num_vis {config.num_vis}), but {e}") from None
        if config.evaluate:
            raise UserError(f"--evaluate needs the training images for FID's reference statistics (none are cached "
                            f"for this model's data; --cache_dir names where they are), but {e}") from None
        raise
