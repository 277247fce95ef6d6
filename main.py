"""Entry point: parse the flags, take a checkpoint's settings, then train or use the trained model.

    python main.py --train_steps 10000                                   # train (AFHQ cats downloaded if missing)
    python main.py --train_steps 1000 --save_and_sample_every 100 --fid  # FID curve
    python main.py --load_path results/model.pt --visualize              # forward and backward figures

Every flag of the assignment's Table 1 keeps its name, meaning and recommended value as its default. With
``--load_path``, the flags the command line does not name that shape the network (and, when training resumes,
that say how it was trained) take the checkpoint's values, and its images are read from the folder it records
unless ``--data_path`` names another; a resumed run writes to the checkpoint's folder unless ``--save_folder`` is
named. Training is ``training/launch.py``'s; the commands over a trained model
(``--visualize``, ``--sample``, ``--evaluate``, ``--inpaint``, ``--img2img``) are ``sampling/commands.py``'s, on
the model ``sampling/model.py`` loads, without a trainer. A checkpoint is all that ``--sample`` needs; ``--evaluate``
needs the training images only until their FID statistics are cached, ``--visualize`` only for more figure rows
than the checkpoint keeps (``imagedata/loading.py``).
Mistakes in the input end with one line on stderr and exit code 2 (see ``runtime.errors.UserError``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from runtime.errors import UserError
from settings.cli import build_parser, checked, parse
from settings.config import CLASS_FLAGS, COMMANDS, EVERY_TIMESTEP, SAMPLERS, Config, comparable, recorded, show


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


def check_sampler_flags(config: Config, named: set[str]) -> None:
    """Refuse, in one line, a --sample_steps that the sampler cannot take: DDPM visits every timestep."""
    if "sample_steps" in named and config.sampler in EVERY_TIMESTEP and config.sample_steps != config.time_steps:
        raise UserError(f"--sampler {config.sampler} visits every one of the --time_steps {config.time_steps} "
                        f"timesteps, so it cannot take --sample_steps {config.sample_steps}; drop --sample_steps, or "
                        f"pass a sampler that takes fewer steps: "
                        f"{', '.join(s for s in SAMPLERS if s not in EVERY_TIMESTEP)}")


def check_save_folder(folder: str) -> None:
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--save_folder {folder} cannot be written ({e.strerror or e}); pass a folder you can write to") from None


def run(config: Config, ctx, saved, *, extractor=None) -> None:
    """Train (``training.launch``), or run the commands over the trained model (``sampling.commands``); ``saved`` is
    the loaded checkpoint's ``RunRecord`` (an empty one without a checkpoint), ``extractor`` the FID feature network
    (default: clean-fid's Inception)."""
    if not config.trains and ctx.enabled:
        raise UserError(f"{', '.join(f'--{c}' for c in COMMANDS)} run in one process; start them without torchrun")
    if ctx.is_main:
        check_save_folder(config.save_folder)
    if config.trains:
        from training.launch import train

        train(config, ctx, saved, extractor=extractor)
    else:
        from sampling.commands import run_commands

        run_commands(config, saved, extractor=extractor)


def adopt_checkpoint_settings(config: Config, named: set[str], parser):
    """Give ``config`` the checkpoint's value of every network setting (and, when training resumes, of every
    training setting) that the command line does not name, and the checkpoint's data (``data_location``) unless
    ``--data_path`` is named; a resumed run writes to the checkpoint's folder unless ``--save_folder`` is named.
    Returns the new config, the settings that changed, and the checkpoint's ``RunRecord``. A named flag that
    contradicts the network is refused here, before any data is read."""
    from runtime import checkpoint as ckpt_io
    from settings.record import RunRecord

    # mapped, not read: only the recorded settings are needed here; the tensors are loaded by whoever uses them
    ckpt = ckpt_io.load_checkpoint(config.load_path, mmap=True)
    run = RunRecord.from_dict(ckpt.get("run"))
    saved = {**recorded(ckpt["config"], training=config.trains), **data_location(ckpt["config"], run, named)}
    folder = Path(config.load_path).parent
    if config.trains and "save_folder" not in named and folder.resolve() != Path(config.save_folder).resolve():
        saved["save_folder"] = str(folder)  # a resumed run goes on in its own folder
    adopted = {k: v for k, v in saved.items() if k not in named and comparable(getattr(config, k)) != v}
    config = checked(parser, config, **adopted)
    ckpt_io.check_architecture(ckpt["config"], config, config.load_path)  # before any data is read
    if ckpt_io.grows_mask_conditioning(ckpt["config"], config) and Path(config.save_folder).resolve() == folder.resolve():
        raise UserError(f"--mask_conditional True grows {config.load_path} into a new model; name a --save_folder "
                        f"other than {folder}, so that the model there stays as it is")
    return config, adopted, run


def data_location(saved_config: dict, run, named: set[str]) -> dict:
    """Where the checkpoint's images are, as settings: its ``--data_path`` (the folder as given, or as the run
    resolved it when the given path does not lead there from here), ``--data_class`` and ``--cache_dir``; nothing
    when the command line names ``--data_path`` (the images are another folder's, and so is their layout)."""
    if "data_path" in named:
        return {}
    location = {k: saved_config[k] for k in ("data_path", "data_class", "cache_dir") if k in saved_config}
    resolved = run.data.get("path")
    if resolved and not Path(location.get("data_path", "")).expanduser().is_dir() and Path(resolved).is_dir():
        location["data_path"] = resolved
    return location


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None, *, extractor=None) -> int:
    """Run ``argv``'s command; returns the exit code. ``extractor`` (an ``evaluation.fid.FeatureExtractor``)
    replaces clean-fid's Inception for FID, as a small stand-in network does in the tests."""
    import warnings

    warnings.formatwarning = _one_line_warning
    if hasattr(sys.stdout, "reconfigure"):  # progress lines appear at once under nohup, pipes and notebooks
        sys.stdout.reconfigure(line_buffering=True)
    parser = build_parser()
    config, named = parse(argv, parser)
    from imagedata.loading import resolve_data_class
    from runtime import distributed
    from settings.record import RunRecord
    from training.interrupt import TrainingInterrupted

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
        check_sampler_flags(config, named)
        config = resolve_data_class(config, named | set(adopted if config.load_path else ()))
        run(config, ctx, saved, extractor=extractor)
        # every rank reaches the teardown together: gloo aborts a rank whose peer has already closed its connections
        distributed.barrier(ctx)
        return 0
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
