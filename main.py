"""Entry point: parse flags, build the pieces, then train, visualize, sample or score.

    python main.py --train_steps 10000                                   # train (AFHQ cats downloaded if missing)
    python main.py --train_steps 1000 --save_and_sample_every 100 --fid  # FID curve
    python main.py --load_path results/model.pt --visualize              # forward and backward figures

Every flag of the assignment's Table 1 keeps its name, meaning and recommended value as its default.
Mistakes in the input end with one line on stderr and exit code 2 (see ``errors.UserError``).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from cli import build_parser, check_args
from errors import UserError


def pick_device(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; pass --device auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps was asked for but Apple's MPS backend is not available; pass --device auto or cpu")
    return torch.device(name)


def build_diffusion(args):
    from diffusion import Diffusion
    from unet import Unet

    try:
        net = Unet(args.unet_dim, tuple(args.dim_mults), channels=3, num_res_blocks=args.num_res_blocks,
                   attention_levels=tuple(args.attention_levels) if args.attention_levels else None,
                   dropout=args.dropout, image_size=args.image_size)
        return Diffusion(net, image_size=args.image_size, channels=3, timesteps=args.time_steps, loss_type=args.loss)
    except ValueError as e:
        raise UserError(f"{e} (check --image_size, --unet_dim and --dim_mults)") from None


def run_config(args, device) -> dict:
    config = {k: v for k, v in vars(args).items()}
    config["channels"] = 3
    config["device"] = str(device)
    config["effective_batch_size"] = args.batch_size * args.grad_accum
    return config


def build_trainer(args, device, diffusion, batches):
    from trainer import TrainConfig, Trainer

    train_config = TrainConfig(
        train_steps=args.train_steps, learning_rate=args.learning_rate,
        save_and_sample_every=args.save_and_sample_every, grad_accum=args.grad_accum, grad_clip=args.grad_clip,
        lr_warmup=args.lr_warmup, ema_decay=args.ema_decay, ema_warmup=args.ema_warmup, precision=args.precision,
        compile=args.compile, num_samples=args.num_samples, sampler=args.sampler, sample_steps=args.sample_steps,
        fid_sampler=args.fid_sampler, fid_sample_steps=args.fid_sample_steps, log_every=args.log_every,
        seed=args.seed)
    return Trainer(diffusion, batches, config=train_config, device=device, save_folder=args.save_folder,
                   run_config=run_config(args, device))


def build_evaluator(args, device, image_set, *, required: bool):
    """The FID evaluator, or None with a warning when the Inception weights cannot be had and FID is optional."""
    import fid as fid_module

    def real_batches():
        for start in range(0, len(image_set.images), 500):
            yield image_set.images[start:start + 500]

    # the statistics live beside the decoded-image cache they are computed from
    cache_dir = image_set.cache_path.parent if image_set.cache_path is not None else Path(args.save_folder)
    evaluator = fid_module.FIDEvaluator(real_key=image_set.key, image_size=args.image_size, real_batches=real_batches,
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


def run(args) -> int:
    import torch

    import dataset
    import download

    check_save_folder(args.save_folder)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    diffusion = build_diffusion(args)
    download.ensure_dataset(args.data_path, args.data_class, download=args.download, source=args.dataset_source)
    batches, image_set = dataset.make_batches(
        args.data_path, args.data_class, args.image_size, args.batch_size, device=device, flip=args.flip,
        seed=args.seed, cache_dir=args.cache_dir, progress=True)
    trainer = build_trainer(args, device, diffusion, batches)
    if args.load_path:
        trainer.load(args.load_path, resume=not (args.visualize or args.sample or args.evaluate))
    config = trainer.run_config
    width = max(map(len, config))
    print("\n".join(f"{k:>{width}}: {config[k]}" for k in sorted(config)))
    print(f"device {device}, precision {trainer.precision}, "
          f"{sum(p.numel() for p in diffusion.model.parameters()):,} parameters, "
          f"effective batch size {config['effective_batch_size']}, learning rate {args.learning_rate:g}")
    (Path(args.save_folder) / "config.json").write_text(json.dumps(config, indent=1, default=str) + "\n")

    from metrics import MetricsLogger

    trainer.logger = MetricsLogger(args.save_folder, config=config, wandb_mode=args.wandb,
                                   project=args.wandb_project, run_name=args.run_name, history=trainer.history,
                                   resume_step=trainer.step, wandb_run_id=_saved_wandb_id(args))
    try:
        if args.visualize:
            first = image_set.images[: args.num_vis] if image_set is not None else next(iter(batches))[: args.num_vis]
            first = first.float().div(127.5).sub(1) if first.dtype == torch.uint8 else first
            for path in trainer.visualize(first):
                print(f"wrote {path}")
            return 0
        if args.sample:
            from torchvision.utils import save_image

            images = trainer.sample(args.sample)
            out = Path(args.save_folder) / f"samples-{trainer.step}-{args.sampler}.png"
            save_image(images, out, nrow=max(1, int(args.sample ** 0.5)))
            print(f"wrote {out}")
            return 0
        if args.evaluate:
            return evaluate_checkpoint(args, device, trainer, image_set)
        if args.fid:
            if image_set is None:
                raise UserError("--fid needs the dataset in memory, but it is too large here; lower --image_size")
            trainer.evaluator = build_evaluator(args, device, image_set, required=False)
        trainer.train()
        print(f"done: {Path(args.save_folder) / 'model.pt'} at step {trainer.step}")
        return 0
    finally:
        trainer.logger.close()


def evaluate_checkpoint(args, device, trainer, image_set) -> int:
    """Score the loaded EMA model once with FID and KID and print the result; no training."""
    if image_set is None:
        raise UserError("--evaluate needs the dataset in memory, but it is too large here; lower --image_size")
    evaluator = build_evaluator(args, device, image_set, required=True)
    result = evaluator.evaluate(trainer.fid_sample_fn())
    sampler = args.fid_sampler + (f" ({args.fid_sample_steps} steps)" if args.fid_sampler == "ddim" else "")
    print(f"FID {result['fid']:.2f}  KID {result['kid']:.5f}  ({result['fid_samples']} samples, {sampler} "
          f"sampler, clean-fid mode {args.fid_mode}, step {trainer.step}, {result['seconds']:.0f} s)")
    return 0


def _saved_wandb_id(args):
    if not args.load_path or args.visualize or args.sample or args.evaluate:
        return None
    from checkpoint import load_checkpoint

    return load_checkpoint(args.load_path).get("wandb_run_id")


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.formatwarning = _one_line_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    from trainer import TrainingInterrupted

    try:
        return run(args)
    except TrainingInterrupted as e:
        print(f"\ninterrupted: {e}", file=sys.stderr)
        return 130
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
