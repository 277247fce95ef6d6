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
from config import CLASS_FLAGS, Config, build_parser, checked, comparable, parse, recorded, show
from errors import UserError


def build_diffusion(config: Config, num_classes: int = 0):
    """The model ``config`` describes; ``num_classes`` > 0 for a class-conditional one."""
    from diffusion import Diffusion
    from unet import Unet

    try:
        net = Unet(config.unet_dim, config.dim_mults, channels=3, num_res_blocks=config.num_res_blocks,
                   attention_levels=config.attention_levels or None, dropout=config.dropout,
                   self_condition=config.self_condition, image_size=config.image_size, num_classes=num_classes)
        return Diffusion(net, image_size=config.image_size, channels=3, timesteps=config.time_steps,
                         loss_type=config.loss, class_dropout=config.class_dropout if num_classes else 0.0)
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


def run_info(config: Config, device, ctx, image_set, batches, classes: tuple[str, ...], recorded_run: dict) -> dict:
    """What follows from the settings: the device, the process count, the effective batch size, the fingerprint
    of the training images and the folder of their FID statistics (so that ``--evaluate`` can find those
    statistics without the images), and a class-conditional model's class names (by label), image counts and
    per-class fingerprints. Without the images, the checkpoint's record of its data (``recorded_run``) stands."""
    info = {"device": str(device), "world_size": ctx.world_size,
            "effective_batch_size": config.batch_size * config.grad_accum * ctx.world_size}
    info.update({k: recorded_run[k] for k in ("data_key", "fid_cache_dir", "class_data_keys") if k in recorded_run})
    labels = getattr(batches, "labels", None)
    if classes:
        info["classes"] = list(classes)
        info["class_sizes"] = (recorded_run.get("class_sizes") if labels is None
                               else labels.bincount(minlength=len(classes)).tolist())
    if image_set is not None:
        info["data_key"] = image_set.pixels_key
        info["fid_cache_dir"] = str(fid_cache_dir(config, image_set).resolve())
        if classes:
            info["class_data_keys"] = image_set.class_keys()
    return info


def model_classes(config: Config, batches, recorded_run: dict, load_path: str | None) -> tuple[str, ...]:
    """The class names of the model to build, by label: the checkpoint's, else the training data's. A resumed run
    must see the classes its checkpoint was trained on."""
    if not config.class_conditional:
        return ()
    saved = tuple(recorded_run.get("classes", ()))
    found = tuple(getattr(batches, "classes", ()))
    if load_path and not saved:
        raise UserError(f"{load_path} records no class names, so it cannot be a class-conditional model; "
                        f"load a checkpoint that --class_conditional training wrote")
    if saved and found and saved != found:
        raise UserError(f"{load_path} was trained on the classes {', '.join(saved)}, and --data_path "
                        f"{config.data_path} holds {', '.join(found)}; pass the data it was trained on")
    return saved or found


def check_class_flags(config: Config, named: set[str]) -> None:
    """Refuse, in one line, what only a class-conditional model takes when the model is not one, and a
    --data_class beside --class_conditional (which reads every class folder)."""
    if not config.class_conditional:
        given = [flag for flag in CLASS_FLAGS if flag in named]
        if given:
            model = f"{config.load_path} is an unconditional model" if config.load_path else "this run is unconditional"
            raise UserError(f"--{given[0]} needs a class-conditional model, and {model}; drop it, or train one "
                            f"with --class_conditional")
        return
    if "data_class" in named and config.data_class != "all":
        raise UserError(f"--class_conditional trains on every class folder under --data_path; drop --data_class "
                        f"{config.data_class} (or keep only that class's folder there)")
    if config.sample_class is not None and not config.sample:
        raise UserError("--sample_class names the class that --sample draws; add --sample 16")


def class_label(config: Config, classes: tuple[str, ...]) -> int:
    """The label of ``--sample_class``, refused in one line when the model does not know it."""
    if config.sample_class not in classes:
        raise UserError(f"--sample_class {config.sample_class} is not a class of {config.load_path}, which knows "
                        f"{', '.join(classes)}; pass one of those")
    return classes.index(config.sample_class)


def fid_cache_dir(config: Config, image_set) -> Path:
    """Where the FID statistics of ``image_set`` live: beside the decoded-image cache they are computed from."""
    return image_set.cache_path.parent if image_set.cache_path is not None else Path(config.save_folder)


def cached_fid_reference(config: Config, recorded_run: dict) -> Path | None:
    """The folder holding the cached FID statistics of the images a checkpoint was trained on, if any does:
    ``--cache_dir``, the folder the checkpoint records, the usual cache folders of ``--data_path``, or the
    save folder."""
    import fid
    from dataset import cache_dir_candidates

    keys = [recorded_run.get("data_key"), *recorded_run.get("class_data_keys", {}).values()]
    folders = [config.cache_dir, recorded_run.get("fid_cache_dir"), *cache_dir_candidates(config.data_path),
               config.save_folder]
    found = [fid.find_statistics(folders, mode=config.fid_mode, image_size=config.image_size, real_key=key)
             for key in keys if key]
    return found[0] if found and len(found) == len(keys) and len(set(found)) == 1 else None


def build_evaluator(config: Config, device, image_set, run: dict, *, required: bool):
    """The FID evaluator (for a class-conditional model, ``run`` naming its classes, one that scores each class
    and all together), or None with a warning when the Inception weights cannot be had and FID is optional.

    Without ``image_set`` the statistics must be cached already (``cached_fid_reference``)."""
    import fid as fid_module

    cache_dir = fid_cache_dir(config, image_set) if image_set is not None else cached_fid_reference(config, run)
    extractor = fid_module.FeatureExtractor(mode=config.fid_mode, device=device)

    def scorer(key: str, images):
        def real_batches():
            if images is None:
                raise UserError(f"the FID statistics cached in {cache_dir} cannot be used (the warning above says "
                                f"why); pass --data_path with the training images to compute them again")
            for start in range(0, len(images), 500):
                yield images[start:start + 500]

        return fid_module.FIDEvaluator(real_key=key, image_size=config.image_size, real_batches=real_batches,
                                       mode=config.fid_mode, num_samples=config.fid_samples, device=device,
                                       cache_dir=cache_dir, extractor=extractor)

    evaluator = scorer(run["data_key"], None if image_set is None else image_set.images)
    if run.get("classes"):
        per_class = {name: scorer(run["class_data_keys"][name],
                                     None if image_set is None else image_set.of_class(label))
                     for label, name in enumerate(run["classes"])}
        evaluator = fid_module.ClassFIDEvaluator(evaluator, per_class, run["class_sizes"])
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
        download.ensure_dataset(config.data_path, config.data_selection, download=config.download,
                                source=config.dataset_source)
    for turn in ("main", "others"):  # the other ranks read the cache rank 0 has just written
        if (turn == "main") == ctx.is_main:
            batches, image_set = dataset.make_batches(
                config.data_path, config.data_selection, config.image_size, config.batch_size, device=device,
                flip=config.flip, seed=config.seed, rank=ctx.rank, world_size=ctx.world_size,
                cache_dir=config.cache_dir, progress=ctx.is_main, labelled=config.class_conditional)
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
    batches, image_set = load_data_for(config, device, ctx) if needs_data(config, recorded_run) else (None, None)
    classes = model_classes(config, batches, recorded_run, config.load_path)
    if config.sample_class is not None:
        class_label(config, classes)  # an unknown class fails before any work
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    diffusion = build_diffusion(config, len(classes))
    trainer = Trainer(diffusion, batches, config=config, device=device, dist_ctx=ctx,
                      run_info=run_info(config, device, ctx, image_set, batches, classes, recorded_run))
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
                print(f"wrote {write_samples(config, trainer)}")
            if config.evaluate:
                evaluate_checkpoint(config, device, trainer, image_set)
            return 0
        if config.fid and ctx.is_main:
            if image_set is None:
                raise UserError("--fid needs the dataset in memory, but it is too large here; lower --image_size")
            trainer.evaluator = build_evaluator(config, device, image_set, trainer.run_info, required=False)
        trainer.train()
        if ctx.is_main:
            print(f"done: {Path(config.save_folder) / 'model.pt'} at step {trainer.step}")
        return 0
    finally:
        if trainer.logger is not None:
            trainer.logger.close()


def write_samples(config: Config, trainer) -> Path:
    """The --sample grid: --sample images, of --sample_class or of every class (a row each) for a
    class-conditional model."""
    import torch

    from visualize import save_grid

    name, labels, per_row = f"samples-{trainer.step}-{config.sampler}", None, None
    if trainer.classes:
        if config.sample_class is not None:
            labels = torch.full((config.sample,), class_label(config, trainer.classes))
        else:
            labels, per_row = trainer.class_rows(config.sample), config.sample
        name += f"-{config.sample_class or 'all'}-w{config.guidance:g}"
    images = trainer.sample(config.sample if labels is None else len(labels), classes=labels)
    return save_grid(images, Path(config.save_folder) / f"{name}.png", nrow=per_row)


def evaluate_checkpoint(config: Config, device, trainer, image_set) -> None:
    """Score the loaded EMA model once with FID and KID (a class-conditional model's per class too) and print
    the result; no training."""
    if image_set is None and cached_fid_reference(config, trainer.run_info) is None:
        raise UserError("--evaluate needs the dataset in memory, but it is too large here; lower --image_size")
    evaluator = build_evaluator(config, device, image_set, trainer.run_info, required=True)
    result = evaluator.evaluate(trainer.fid_sample_fn())
    sampler = config.sampler + (f" ({config.sample_steps} steps)" if config.sampler == "ddim" else "")
    guided = f", guidance {config.guidance:g}" if trainer.classes else ""
    print(f"FID {result['fid']:.2f}  KID {result['kid']:.5f}  ({result['fid_samples']} samples, {sampler} "
          f"sampler{guided}, clean-fid mode {config.fid_mode}, step {trainer.step}, {result['seconds']:.0f} s)")
    for name in trainer.classes:
        print(f"  {name}: FID {result[f'fid/{name}']:.2f}  KID {result[f'kid/{name}']:.5f}  "
              f"({result[f'fid_samples/{name}']} samples)")


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
        check_class_flags(config, named)
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
