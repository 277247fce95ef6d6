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
from cli import build_parser, check_args, named_flags
from errors import UserError


def build_diffusion(args):
    from diffusion import Diffusion
    from unet import Unet

    try:
        net = Unet(args.unet_dim, tuple(args.dim_mults), channels=3, num_res_blocks=args.num_res_blocks,
                   attention_levels=tuple(args.attention_levels) if args.attention_levels else None,
                   dropout=args.dropout, self_condition=args.self_condition, image_size=args.image_size)
        return Diffusion(net, image_size=args.image_size, channels=3, timesteps=args.time_steps, loss_type=args.loss)
    except ValueError as e:
        raise UserError(f"{e} (check --image_size, --unet_dim and --dim_mults)") from None


def run_config(args, device, ctx, image_set) -> dict:
    """Every flag, plus what follows from them: the device, the process count, the effective batch size, and
    the fingerprint of the training images and the folder of their FID statistics (so that ``--evaluate`` can
    find those statistics without the images)."""
    config = dict(vars(args))
    config["channels"] = 3
    config["device"] = str(device)
    config["world_size"] = ctx.world_size
    config["effective_batch_size"] = args.batch_size * args.grad_accum * ctx.world_size
    if image_set is not None:
        config["data_key"] = image_set.pixels_key
        config["fid_cache_dir"] = str(fid_cache_dir(args, image_set).resolve())
    return config


def build_trainer(args, device, diffusion, batches, ctx, image_set):
    from trainer import TrainConfig, Trainer

    return Trainer(diffusion, batches, config=TrainConfig.from_flags(args), device=device, save_folder=args.save_folder,
                   run_config=run_config(args, device, ctx, image_set), dist_ctx=ctx)


def fid_cache_dir(args, image_set) -> Path:
    """Where the FID statistics of ``image_set`` live: beside the decoded-image cache they are computed from."""
    return image_set.cache_path.parent if image_set.cache_path is not None else Path(args.save_folder)


def cached_fid_reference(args, recorded: dict) -> Path | None:
    """The folder holding the cached FID statistics of the images a checkpoint was trained on, if any does."""
    key = recorded.get("data_key")
    if not key or recorded.get("image_size") != args.image_size:
        return None
    from dataset import cache_dir_candidates

    name = f"fid_ref_{args.fid_mode}_{args.image_size}px_{key}.npz"
    candidates = [args.cache_dir, recorded.get("fid_cache_dir"), *cache_dir_candidates(args.data_path), args.save_folder]
    return next((Path(c) for c in candidates if c and (Path(c) / name).is_file()), None)


def build_evaluator(args, device, image_set, *, required: bool, recorded: dict | None = None):
    """The FID evaluator, or None with a warning when the Inception weights cannot be had and FID is optional.

    Without ``image_set`` the statistics must be cached already (``cached_fid_reference``)."""
    import fid as fid_module

    if image_set is not None:
        key, cache_dir = image_set.pixels_key, fid_cache_dir(args, image_set)

        def real_batches():
            for start in range(0, len(image_set.images), 500):
                yield image_set.images[start:start + 500]
    else:
        key, cache_dir = recorded["data_key"], cached_fid_reference(args, recorded)

        def real_batches():
            raise UserError(f"the FID statistics cached in {cache_dir} cannot be used (the warning above says why); "
                            f"pass --data_path with the training images to compute them again")

    evaluator = fid_module.FIDEvaluator(real_key=key, image_size=args.image_size, real_batches=real_batches,
                                        mode=args.fid_mode, num_samples=args.fid_samples, device=device,
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


def check_not_overwriting(args) -> None:
    """A new run must not replace another run's checkpoint unless asked to (resuming that checkpoint is fine)."""
    existing = Path(args.save_folder) / "model.pt"
    if args.overwrite or not existing.exists():
        return
    if args.load_path and Path(args.load_path).resolve() == existing.resolve():
        return
    raise UserError(f"{existing} already holds a trained model; resume it with --load_path {existing}, "
                    f"pass another --save_folder, or add --overwrite to replace it")


def load_data(args, device, ctx):
    """The batches (sharded per rank) and the decoded images; rank 0 downloads and builds the cache first."""
    import dataset
    import download

    if ctx.is_main:
        download.ensure_dataset(args.data_path, args.data_class, download=args.download, source=args.dataset_source)
    for turn in ("main", "others"):  # the other ranks read the cache rank 0 has just written
        if (turn == "main") == ctx.is_main:
            batches, image_set = dataset.make_batches(
                args.data_path, args.data_class, args.image_size, args.batch_size, device=device, flip=args.flip,
                seed=args.seed, rank=ctx.rank, world_size=ctx.world_size, cache_dir=args.cache_dir,
                progress=ctx.is_main)
        distributed.barrier(ctx)
    return batches, image_set


def print_config(config: dict, trainer, device, *, training: bool) -> None:
    """A training run prints its whole configuration; the other modes only what they load and where they run
    (their training flags would describe this command, not how the checkpoint was trained)."""
    params = f"{sum(p.numel() for p in trainer.diffusion.model.parameters()):,} parameters"
    if not training:
        print(f"device {device}, precision {trainer.precision}, {params}, checkpoint at step {trainer.step}")
        return
    width = max(map(len, config))
    print("\n".join(f"{k:>{width}}: {config[k]}" for k in sorted(config)))
    print(f"device {device}, precision {trainer.precision}, {params}, "
          f"effective batch size {config['effective_batch_size']}, learning rate {config['learning_rate']:g}")


def trains(args) -> bool:
    """Whether the command trains (rather than visualizing, sampling or scoring a checkpoint)."""
    return not (args.visualize or args.sample or args.evaluate)


def needs_data(args, recorded: dict) -> bool:
    """Training and --visualize need the images; --evaluate only until their FID statistics are cached;
    --sample never."""
    if args.visualize or trains(args):
        return True
    return bool(args.evaluate) and cached_fid_reference(args, recorded) is None


def load_data_for(args, device, ctx):
    """``load_data``, with missing data under --visualize and --evaluate said as what those commands need."""
    try:
        return load_data(args, device, ctx)
    except UserError as e:
        if args.visualize:
            raise UserError(f"--visualize shows real training images going through both processes, but {e}") from None
        if args.evaluate:
            raise UserError(f"--evaluate needs the training images for FID's reference statistics (none are cached "
                            f"for this model's data; --cache_dir names where they are), but {e}") from None
        raise


def run(args, ctx, recorded: dict) -> int:
    """Build the pieces and run the command; ``recorded`` is the loaded checkpoint's config (empty without one)."""
    import torch

    from metrics import MetricsLogger

    training = trains(args)
    if ctx.enabled and not training:
        raise UserError("--visualize, --sample and --evaluate run in one process; start them without torchrun")
    if ctx.is_main:
        check_save_folder(args.save_folder)
        if training:
            check_not_overwriting(args)
    device = distributed.setup(ctx, args.device)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    diffusion = build_diffusion(args)
    batches, image_set = load_data_for(args, device, ctx) if needs_data(args, recorded) else (None, None)
    trainer = build_trainer(args, device, diffusion, batches, ctx, image_set)
    loaded = trainer.load(args.load_path, resume=training) if args.load_path else {}
    if not loaded:
        torch.manual_seed(args.seed + ctx.rank)  # each rank draws its own timesteps and noise
    elif ctx.rank > 0:  # a checkpoint holds rank 0's RNG state; the others continue on streams of their own
        torch.manual_seed(args.seed + ctx.rank + 1_000_003 * trainer.step)
    config = trainer.run_config
    if ctx.is_main:
        print_config(config, trainer, device, training=training)
        if training:  # --visualize, --sample and --evaluate leave the training run's record alone
            atomic_write_text(Path(args.save_folder) / "config.json", json.dumps(config, indent=1, default=str) + "\n")
        trainer.logger = MetricsLogger(args.save_folder, config=config, wandb_mode=args.wandb,
                                       project=args.wandb_project, run_name=args.run_name,
                                       history=trainer.history if training else None, resume_step=trainer.step,
                                       wandb_run_id=loaded.get("wandb_run_id") if training else None)
    try:
        if not training:  # each mode asked for, in this order
            if args.visualize:
                first = image_set.images[: args.num_vis] if image_set is not None else next(iter(batches))[: args.num_vis]
                first = first.float().div(127.5).sub(1) if first.dtype == torch.uint8 else first
                for path in trainer.visualize(first):
                    print(f"wrote {path}")
            if args.sample:
                from visualize import save_grid

                grid = Path(args.save_folder) / f"samples-{trainer.step}-{args.sampler}.png"
                print(f"wrote {save_grid(trainer.sample(args.sample), grid)}")
            if args.evaluate:
                evaluate_checkpoint(args, device, trainer, image_set, recorded)
            return 0
        if args.fid and ctx.is_main:
            if image_set is None:
                raise UserError("--fid needs the dataset in memory, but it is too large here; lower --image_size")
            trainer.evaluator = build_evaluator(args, device, image_set, required=False)
        trainer.train()
        if ctx.is_main:
            print(f"done: {Path(args.save_folder) / 'model.pt'} at step {trainer.step}")
        return 0
    finally:
        if trainer.logger is not None:
            trainer.logger.close()


def evaluate_checkpoint(args, device, trainer, image_set, recorded: dict) -> None:
    """Score the loaded EMA model once with FID and KID and print the result; no training."""
    if image_set is None and cached_fid_reference(args, recorded) is None:
        raise UserError("--evaluate needs the dataset in memory, but it is too large here; lower --image_size")
    evaluator = build_evaluator(args, device, image_set, required=True, recorded=recorded)
    result = evaluator.evaluate(trainer.fid_sample_fn())
    sampler = args.sampler + (f" ({args.sample_steps} steps)" if args.sampler == "ddim" else "")
    print(f"FID {result['fid']:.2f}  KID {result['kid']:.5f}  ({result['fid_samples']} samples, {sampler} "
          f"sampler, clean-fid mode {args.fid_mode}, step {trainer.step}, {result['seconds']:.0f} s)")


def adopt_checkpoint_flags(args, named: set[str], *, training: bool) -> tuple[dict, dict]:
    """Give ``args`` the checkpoint's value of every flag that decides its network (and, when training resumes,
    of every flag that says how it was trained) unless the command line names that flag. Returns the flags that
    differ from what ``args`` held, and the checkpoint's recorded config. A named flag that contradicts the
    network still fails, in ``Trainer.load``; a checkpoint made with a removed option fails here."""
    import checkpoint as ckpt_io

    # mapped, not read: only the recorded flags are needed here, the tensors are loaded by Trainer.load
    ckpt = ckpt_io.load_checkpoint(args.load_path, mmap=True)
    ckpt_io.check_removed_options(ckpt, args.load_path, training=training)
    saved = ckpt_io.saved_flags(ckpt, training=training)
    changed = {}
    for key, value in saved.items():
        if key in named:
            continue
        if ckpt_io.comparable(getattr(args, key)) != ckpt_io.comparable(value):
            changed[key] = value
        setattr(args, key, list(value) if isinstance(value, tuple) else value)
    return changed, dict(ckpt.get("config", {}))


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.formatwarning = _one_line_warning
    if hasattr(sys.stdout, "reconfigure"):  # progress lines appear at once under nohup, pipes and notebooks
        sys.stdout.reconfigure(line_buffering=True)
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    from trainer import TrainingInterrupted

    ctx = distributed.from_environment()
    recorded: dict = {}
    try:
        if args.load_path:
            kept, recorded = adopt_checkpoint_flags(args, named_flags(parser, argv), training=trains(args))
            check_args(parser, args)
            if kept and ctx.is_main:
                from checkpoint import show

                print(f"from {args.load_path}: " + " ".join(f"--{k} {show(v)}" for k, v in kept.items())
                      + " (name a flag to change it)")
        code = run(args, ctx, recorded)
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
        print(f"error: {e.strerror or e}{where}; the last checkpoint in {args.save_folder} is intact; "
              f"free some disk space or check the folder's permissions, then resume with --load_path",
              file=sys.stderr)
        return 1
    finally:
        distributed.cleanup(ctx)


if __name__ == "__main__":
    sys.exit(main())
