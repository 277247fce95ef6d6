"""Entry point: parse flags, build the pieces, then train, visualize, sample or score.

    python main.py --train_steps 10000                                   # train (AFHQ cats downloaded if missing)
    python main.py --train_steps 1000 --save_and_sample_every 100 --fid  # FID curve
    python main.py --load_path results/model.pt --visualize              # forward and backward figures

Every flag of the assignment's Table 1 keeps its name, meaning and recommended value as its default. With
``--load_path``, the flags the command line does not name that shape the network (and, when training resumes,
that say how it was trained) take the checkpoint's values. A checkpoint is all that ``--sample`` needs;
``--evaluate`` needs the training images only until their FID statistics are cached, ``--visualize`` always.
Mistakes in the input end with one line on stderr and exit code 2 (see ``errors.UserError``).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import distributed
from atomic import atomic_write_text
from config import Config, build_parser, checked, comparable, parse, recorded, show
from errors import UserError


def build_diffusion(config: Config):
    from diffusion import Diffusion
    from unet import Unet

    try:
        net = Unet(config.unet_dim, config.dim_mults, channels=3, num_res_blocks=config.num_res_blocks,
                   attention_levels=config.attention_levels or None, dropout=config.dropout,
                   self_condition=config.self_condition, image_size=config.image_size)
        return Diffusion(net, image_size=config.image_size, channels=3, timesteps=config.time_steps,
                         loss_type=config.loss)
    except ValueError as e:
        raise UserError(f"{e} (check --image_size, --unet_dim and --dim_mults)") from None


def check_torch_numpy() -> None:
    """torch before 2.3 was built for NumPy 1 and hands no array to NumPy 2 ("Numpy is not available"); pip cannot
    tell (torch names no NumPy requirement), so it is said here, in one line, before any work starts."""
    import numpy
    import torch

    try:
        torch.from_numpy(numpy.zeros(1))
    except RuntimeError:
        raise UserError(f"torch {torch.__version__} was built for NumPy 1, and NumPy {numpy.__version__} is "
                        f"installed: pip install 'numpy<2' (or torch 2.3 or newer)") from None


def run_info(config: Config, device, ctx, image_set) -> dict:
    """What follows from the settings: the device, the process count, the effective batch size, and the
    fingerprint of the training images and the folder of their FID statistics (so that ``--evaluate`` can find
    those statistics without the images)."""
    info = {"device": str(device), "world_size": ctx.world_size,
            "effective_batch_size": config.batch_size * config.grad_accum * ctx.world_size}
    if image_set is not None:
        info["data_key"] = image_set.pixels_key
        info["fid_cache_dir"] = str(fid_cache_dir(config, image_set).resolve())
    return info


def fid_cache_dir(config: Config, image_set) -> Path:
    """Where the FID statistics of ``image_set`` live: beside the decoded-image cache they are computed from."""
    return image_set.cache_path.parent if image_set.cache_path is not None else Path(config.save_folder)


def cached_fid_reference(config: Config, recorded_run: dict) -> Path | None:
    """The folder holding the cached FID statistics of the images a checkpoint was trained on, if any does:
    ``--cache_dir``, the folder the checkpoint records, the usual cache folders of ``--data_path``, or the
    save folder."""
    import fid
    from dataset import cache_dir_candidates

    key = recorded_run.get("data_key")
    folders = [config.cache_dir, recorded_run.get("fid_cache_dir"), *cache_dir_candidates(config.data_path),
               config.save_folder]
    return fid.find_statistics(folders, mode=config.fid_mode, image_size=config.image_size, real_key=key) if key else None


def build_evaluator(config: Config, device, image_set, *, required: bool, recorded_run: dict | None = None):
    """The FID evaluator, or None with a warning when the Inception weights cannot be had and FID is optional.

    Without ``image_set`` the statistics must be cached already (``cached_fid_reference``)."""
    import fid as fid_module

    if image_set is not None:
        key, cache_dir = image_set.pixels_key, fid_cache_dir(config, image_set)

        def real_batches():
            for start in range(0, len(image_set.images), 500):
                yield image_set.images[start:start + 500]
    else:
        key, cache_dir = recorded_run["data_key"], cached_fid_reference(config, recorded_run)

        def real_batches():
            raise UserError(f"the FID statistics cached in {cache_dir} cannot be used (the warning above says why); "
                            f"pass --data_path with the training images to compute them again")

    evaluator = fid_module.FIDEvaluator(real_key=key, image_size=config.image_size, real_batches=real_batches,
                                        mode=config.fid_mode, num_samples=config.fid_samples, device=device,
                                        cache_dir=cache_dir)
    try:
        evaluator.reference()
    except fid_module.InceptionUnavailable as e:
        if required:
            raise
        import warnings
        warnings.warn(f"FID is skipped and training goes on: {e}")
        return None
    return evaluator


def check_save_folder(folder: str) -> None:
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--save_folder {folder} cannot be written ({e.strerror or e}); pass a folder you can write to") from None


def check_not_overwriting(config: Config) -> None:
    """A new run must not replace another run's checkpoint unless asked to (resuming that checkpoint is fine)."""
    existing = Path(config.save_folder) / "model.pt"
    if config.overwrite or not existing.exists():
        return
    if config.load_path and Path(config.load_path).resolve() == existing.resolve():
        return
    raise UserError(f"{existing} already holds a trained model; resume it with --load_path {existing}, "
                    f"pass another --save_folder, or add --overwrite to replace it")


def load_data(config: Config, device, ctx):
    """The batches (sharded per rank) and the decoded images; rank 0 downloads and builds the cache first."""
    import dataset
    import download

    if ctx.is_main:
        download.ensure_dataset(config.data_path, config.data_class, download=config.download,
                                source=config.dataset_source)
    for turn in ("main", "others"):  # the other ranks read the cache rank 0 has just written
        if (turn == "main") == ctx.is_main:
            batches, image_set = dataset.make_batches(
                config.data_path, config.data_class, config.image_size, config.batch_size, device=device,
                flip=config.flip, seed=config.seed, rank=ctx.rank, world_size=ctx.world_size,
                cache_dir=config.cache_dir, progress=ctx.is_main)
        distributed.barrier(ctx)
    return batches, image_set


def print_config(record: dict, trainer, device, *, training: bool) -> None:
    """A training run prints its whole configuration; the other modes only what they load and where they run
    (their training flags would describe this command, not how the checkpoint was trained)."""
    params = f"{sum(p.numel() for p in trainer.diffusion.model.parameters()):,} parameters"
    if not training:
        print(f"device {device}, precision {trainer.precision}, {params}, checkpoint at step {trainer.step}")
        return
    width = max(map(len, record))
    print("\n".join(f"{k:>{width}}: {show(record[k])}" for k in sorted(record)))
    print(f"device {device}, precision {trainer.precision}, {params}, "
          f"effective batch size {record['effective_batch_size']}, learning rate {record['learning_rate']:g}")


def needs_data(config: Config, recorded_run: dict) -> bool:
    """Training and --visualize need the images; --evaluate only until their FID statistics are cached;
    --sample never."""
    if config.visualize or config.trains:
        return True
    return config.evaluate and cached_fid_reference(config, recorded_run) is None


def load_data_for(config: Config, device, ctx):
    """``load_data``, with missing data under --visualize and --evaluate said as what those commands need."""
    try:
        return load_data(config, device, ctx)
    except UserError as e:
        if config.visualize:
            raise UserError(f"--visualize shows real training images going through both processes, but {e}") from None
        if config.evaluate:
            raise UserError(f"--evaluate needs the training images for FID's reference statistics (none are cached "
                            f"for this model's data; --cache_dir names where they are), but {e}") from None
        raise


def run(config: Config, ctx, recorded_run: dict) -> int:
    """Build the pieces and run the command; ``recorded_run`` is what the loaded checkpoint records of its run
    (empty without one)."""
    import torch

    from metrics import MetricsLogger
    from trainer import Trainer

    training = config.trains
    if ctx.enabled and not training:
        raise UserError("--visualize, --sample and --evaluate run in one process; start them without torchrun")
    if ctx.is_main:
        check_save_folder(config.save_folder)
        if training:
            check_not_overwriting(config)
    device = distributed.setup(ctx, config.device)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    diffusion = build_diffusion(config)
    batches, image_set = load_data_for(config, device, ctx) if needs_data(config, recorded_run) else (None, None)
    trainer = Trainer(diffusion, batches, config=config, device=device, dist_ctx=ctx,
                      run_info=run_info(config, device, ctx, image_set))
    loaded = trainer.load(config.load_path, resume=training) if config.load_path else {}
    if not loaded:
        torch.manual_seed(config.seed + ctx.rank)  # each rank draws its own timesteps and noise
    elif ctx.rank > 0:  # a checkpoint holds rank 0's RNG state; the others continue on streams of their own
        torch.manual_seed(config.seed + ctx.rank + 1_000_003 * trainer.step)
    record = {**config.to_dict(), **trainer.run_info}
    if ctx.is_main:
        print_config(record, trainer, device, training=training)
        if training:  # --visualize, --sample and --evaluate leave the training run's record alone
            atomic_write_text(Path(config.save_folder) / "config.json", json.dumps(record, indent=1, default=str) + "\n")
        trainer.logger = MetricsLogger(config.save_folder, config=record, wandb_mode=config.wandb,
                                       project=config.wandb_project, run_name=config.run_name,
                                       history=trainer.history if training else None, resume_step=trainer.step,
                                       wandb_run_id=loaded.get("wandb_run_id") if training else None)
    try:
        if not training:  # each mode asked for, in this order
            if config.visualize:
                first = image_set.images[: config.num_vis] if image_set is not None else next(iter(batches))[: config.num_vis]
                first = first.float().div(127.5).sub(1) if first.dtype == torch.uint8 else first
                for path in trainer.visualize(first):
                    print(f"wrote {path}")
            if config.sample:
                from visualize import save_grid

                grid = Path(config.save_folder) / f"samples-{trainer.step}-{config.sampler}.png"
                print(f"wrote {save_grid(trainer.sample(config.sample), grid)}")
            if config.evaluate:
                evaluate_checkpoint(config, device, trainer, image_set, recorded_run)
            return 0
        if config.fid and ctx.is_main:
            if image_set is None:
                raise UserError("--fid needs the dataset in memory, but it is too large here; lower --image_size")
            trainer.evaluator = build_evaluator(config, device, image_set, required=False)
        trainer.train()
        if ctx.is_main:
            print(f"done: {Path(config.save_folder) / 'model.pt'} at step {trainer.step}")
        return 0
    finally:
        if trainer.logger is not None:
            trainer.logger.close()


def evaluate_checkpoint(config: Config, device, trainer, image_set, recorded_run: dict) -> None:
    """Score the loaded EMA model once with FID and KID and print the result; no training."""
    if image_set is None and cached_fid_reference(config, recorded_run) is None:
        raise UserError("--evaluate needs the dataset in memory, but it is too large here; lower --image_size")
    evaluator = build_evaluator(config, device, image_set, required=True, recorded_run=recorded_run)
    result = evaluator.evaluate(trainer.fid_sample_fn())
    sampler = config.sampler + (f" ({config.sample_steps} steps)" if config.sampler == "ddim" else "")
    print(f"FID {result['fid']:.2f}  KID {result['kid']:.5f}  ({result['fid_samples']} samples, {sampler} "
          f"sampler, clean-fid mode {config.fid_mode}, step {trainer.step}, {result['seconds']:.0f} s)")


def adopt_checkpoint_settings(config: Config, named: set[str], parser) -> tuple[Config, dict, dict]:
    """Give ``config`` the checkpoint's value of every network setting (and, when training resumes, of every
    training setting) that the command line does not name. Returns the new config, the settings that changed,
    and what the checkpoint records of its run. A named flag that contradicts the network fails in
    ``Trainer.load``."""
    import checkpoint as ckpt_io

    # mapped, not read: only the recorded settings are needed here, the tensors are loaded by Trainer.load
    ckpt = ckpt_io.load_checkpoint(config.load_path, mmap=True)
    saved = recorded(ckpt["config"], training=config.trains)
    adopted = {k: v for k, v in saved.items() if k not in named and comparable(getattr(config, k)) != v}
    return checked(parser, config, **adopted), adopted, dict(ckpt.get("run", {}))


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.formatwarning = _one_line_warning
    if hasattr(sys.stdout, "reconfigure"):  # progress lines appear at once under nohup, pipes and notebooks
        sys.stdout.reconfigure(line_buffering=True)
    parser = build_parser()
    config, named = parse(argv, parser)
    from trainer import TrainingInterrupted

    ctx = distributed.from_environment()
    recorded_run: dict = {}
    try:
        check_torch_numpy()
        if config.load_path:
            config, adopted, recorded_run = adopt_checkpoint_settings(config, named, parser)
            if adopted and ctx.is_main:
                print(f"from {config.load_path}: " + " ".join(f"--{k} {show(v)}" for k, v in adopted.items())
                      + " (name a flag to change it)")
        code = run(config, ctx, recorded_run)
        # every rank reaches the teardown together: gloo aborts a rank whose peer has already closed its connections
        distributed.barrier(ctx)
        return code
    except TrainingInterrupted as e:
        if ctx.is_main:
            print(f"\ninterrupted: {e}", file=sys.stderr)
        return 130
    except UserError as e:
        print(f"error: {e}" if not ctx.enabled else f"error (rank {ctx.rank}): {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # the disk filled up or a folder became unwritable outside a checkpoint save
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}; the last checkpoint in {config.save_folder} is intact; "
              f"free some disk space or check the folder's permissions, then resume with --load_path",
              file=sys.stderr)
        return 1
    finally:
        distributed.cleanup(ctx)


if __name__ == "__main__":
    sys.exit(main())
