"""Entry point: parse flags, build the pieces, then train, visualize, sample or score.

    python main.py --train_steps 10000                                   # train (AFHQ cats downloaded if missing)
    python main.py --train_steps 1000 --save_and_sample_every 100 --fid  # FID curve
    python main.py --load_path results/model.pt --visualize              # forward and backward figures

Every flag of the assignment's Table 1 keeps its name, meaning and recommended value as its default. With
``--load_path``, the flags the command line does not name that shape the network (and, when training resumes,
that say how it was trained) take the checkpoint's values. A checkpoint is all that ``--sample`` needs;
``--evaluate`` needs the training images only until their FID statistics are cached, ``--visualize`` only for more
figure rows than the checkpoint keeps (``run_data.py``).
Mistakes in the input end with one line on stderr and exit code 2 (see ``errors.UserError``).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from runtime.atomic import atomic_write_text
from settings.cli import build_parser, checked, parse
from settings.config import CLASS_FLAGS, Config, comparable, recorded, show
from runtime.errors import UserError


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
    if config.sample_class is not None and not (config.sample or config.img2img or config.inpaint):
        raise UserError("--sample_class names the class that --sample draws or --img2img turns images into; add "
                        "--sample 16")


def class_label(config: Config, classes: tuple[str, ...]) -> int:
    """The label of ``--sample_class``, refused in one line when the model does not know it."""
    if config.sample_class not in classes:
        raise UserError(f"--sample_class {config.sample_class} is not a class of {config.load_path}, which knows "
                        f"{', '.join(classes)}; pass one of those")
    return classes.index(config.sample_class)


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


def run(config: Config, ctx, saved, *, extractor=None) -> int:
    """Build the pieces and run the command; ``saved`` is the loaded checkpoint's ``RunRecord`` (an empty one
    without a checkpoint), ``extractor`` the FID feature network (default: clean-fid's Inception)."""
    import torch

    from runtime import distributed
    from training.build import build_diffusion
    from runtime.memory import batch_memory
    from evaluation.metrics import MetricsLogger
    from settings.record import RunRecord
    from imagedata.loading import load_data_for, needs_data
    from evaluation.scoring import build_evaluator, statistics_dir
    from trainer import Trainer

    training = config.trains
    if ctx.enabled and not training:
        raise UserError("--visualize, --sample, --evaluate, --inpaint and --img2img run in one process; start them "
                        "without torchrun")
    if ctx.is_main:
        check_save_folder(config.save_folder)
        if training:
            check_not_overwriting(config)
    device = distributed.setup(ctx, config.device)
    data = load_data_for(config, device, ctx) if needs_data(config, saved) else None
    image_set = data.image_set if data is not None else None
    run_record = RunRecord.of_run(config, device=device, world_size=ctx.world_size, data=data, saved=saved,
                                  fid_cache_dir=str(statistics_dir(config, image_set).resolve()) if image_set else None)
    if config.sample_class is not None:
        class_label(config, run_record.classes)  # an unknown class fails before any work
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    trainer = Trainer(build_diffusion(config, run_record.classes), data.batches if data is not None else None,
                      config=config, device=device, dist_ctx=ctx, run=run_record)
    loaded = trainer.load(config.load_path, resume=training) if config.load_path else {}
    examples = data.examples(config) if training and data is not None else None
    if examples is not None:  # a resumed run keeps its checkpoint's examples when the images are streamed
        trainer.examples = examples
    if not loaded:
        torch.manual_seed(config.seed + ctx.rank)  # each rank draws its own timesteps and noise
    elif ctx.rank > 0:  # a checkpoint holds rank 0's RNG state; the others continue on streams of their own
        torch.manual_seed(config.seed + ctx.rank + 1_000_003 * trainer.step)
    record = {**config.to_dict(), **run_record.to_dict()}
    memory = batch_memory(trainer.diffusion, config, device) if training else None  # each rank checks its device
    if ctx.is_main:
        print_config(record, trainer, device, training=training)
        if memory:
            print(memory)
        if training:  # --visualize, --sample and --evaluate leave the training run's record alone
            atomic_write_text(Path(config.save_folder) / "config.json", json.dumps(record, indent=1, default=str) + "\n")
        trainer.logger = MetricsLogger(config.save_folder, config=record, wandb_mode=config.wandb,
                                       project=config.wandb_project, run_name=config.run_name,
                                       history=trainer.history if training else None, resume_step=trainer.step,
                                       wandb_run_id=loaded.get("wandb_run_id") if training else None)
    try:
        if not training:  # each mode asked for, in this order
            if config.visualize:
                first = (trainer.examples[: config.num_vis].float().div(127.5).sub(1) if data is None
                         else image_set.images[: config.num_vis].float().div(127.5).sub(1) if image_set is not None
                         else next(iter(data.batches)).images[: config.num_vis])
                for path in trainer.visualize(first):
                    print(f"wrote {path}")
            if config.sample:
                print(f"wrote {write_samples(config, trainer)}")
            if config.evaluate:
                evaluate_checkpoint(config, device, trainer, image_set, extractor)
            if config.inpaint or config.img2img:
                from sampling.edit_commands import run_edits

                label = class_label(config, trainer.classes) if config.sample_class is not None else None
                for path in run_edits(config, trainer, label):
                    print(f"wrote {path}")
            return 0
        if config.fid and ctx.is_main:
            if image_set is None:
                raise UserError("--fid needs the dataset in memory, but it is too large here; lower --image_size")
            trainer.evaluator = build_evaluator(config, device, image_set, run_record, required=False,
                                                extractor=extractor)
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

    from evaluation.figures import save_grid

    name, labels, per_row = f"samples-{trainer.step}-{config.sampler}", None, None
    if trainer.classes:
        if config.sample_class is not None:
            labels = torch.full((config.sample,), class_label(config, trainer.classes))
        else:
            labels, per_row = trainer.sampler.class_rows(config.sample), config.sample
        name += f"-{config.sample_class or 'all'}-w{config.guidance:g}"
    images = trainer.sampler.sample(config.sample if labels is None else len(labels), classes=labels)
    return save_grid(images, Path(config.save_folder) / f"{name}.png", nrow=per_row)


def evaluate_checkpoint(config: Config, device, trainer, image_set, extractor=None) -> None:
    """Score the loaded EMA model once with FID and KID (a class-conditional model's per class too) and print
    the result; no training."""
    from evaluation.scoring import build_evaluator, cached_reference

    if image_set is None and cached_reference(config, trainer.run) is None:
        raise UserError("--evaluate needs the dataset in memory, but it is too large here; lower --image_size")
    evaluator = build_evaluator(config, device, image_set, trainer.run, required=True, extractor=extractor)
    result = evaluator.evaluate(trainer.sampler.fid_sample_fn())
    sampler = config.sampler + (f" ({config.sample_steps} steps)" if config.sampler == "ddim" else "")
    guided = f", guidance {config.guidance:g}" if trainer.classes else ""
    print(f"FID {result['fid']:.2f}  KID {result['kid']:.5f}  ({result['fid_samples']} samples, {sampler} "
          f"sampler{guided}, clean-fid mode {config.fid_mode}, step {trainer.step}, {result['seconds']:.0f} s)")
    for name in trainer.classes:
        print(f"  {name}: FID {result[f'fid/{name}']:.2f}  KID {result[f'kid/{name}']:.5f}  "
              f"({result[f'fid_samples/{name}']} samples)")


def adopt_checkpoint_settings(config: Config, named: set[str], parser):
    """Give ``config`` the checkpoint's value of every network setting (and, when training resumes, of every
    training setting) that the command line does not name. Returns the new config, the settings that changed,
    and the checkpoint's ``RunRecord``. A named flag that contradicts the network fails in ``Trainer.load``."""
    from runtime import checkpoint as ckpt_io
    from settings.record import RunRecord

    # mapped, not read: only the recorded settings are needed here, the tensors are loaded by Trainer.load
    ckpt = ckpt_io.load_checkpoint(config.load_path, mmap=True)
    saved = recorded(ckpt["config"], training=config.trains)
    adopted = {k: v for k, v in saved.items() if k not in named and comparable(getattr(config, k)) != v}
    config = checked(parser, config, **adopted)
    ckpt_io.check_architecture(ckpt["config"], config, config.load_path)  # before any data is read
    return config, adopted, RunRecord.from_dict(ckpt.get("run"))


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None, *, extractor=None) -> int:
    """Run ``argv``'s command; returns the exit code. ``extractor`` (a ``fid.FeatureExtractor``) replaces clean-fid's
    Inception for FID, as a small stand-in network does in the tests."""
    import warnings

    warnings.formatwarning = _one_line_warning
    if hasattr(sys.stdout, "reconfigure"):  # progress lines appear at once under nohup, pipes and notebooks
        sys.stdout.reconfigure(line_buffering=True)
    parser = build_parser()
    config, named = parse(argv, parser)
    from runtime import distributed
    from settings.record import RunRecord
    from imagedata.loading import resolve_data_class
    from trainer import TrainingInterrupted

    ctx = distributed.from_environment()
    saved = RunRecord()
    try:
        check_torch_numpy()
        if config.load_path:
            config, adopted, saved = adopt_checkpoint_settings(config, named, parser)
            if adopted and ctx.is_main:
                print(f"from {config.load_path}: " + " ".join(f"--{k} {show(v)}" for k, v in adopted.items())
                      + " (name a flag to change it)")
        check_class_flags(config, named)
        config = resolve_data_class(config, named)
        code = run(config, ctx, saved, extractor=extractor)
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
