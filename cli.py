"""The command-line flags of ``main.py``: the assignment's Table 1 first, then this package's own.

The assignment's flags default to its recommended command (32 x 32 images, batch 32, T = 50, unet_dim 16,
learning rate 1e-3, 10,000 steps). The package's own flags default to the settings that scored best at that
command (BENCHMARKS.md): two batches of 32 per step as the handout trainer takes (``--grad_accum 2``), a
self-conditioned U-Net (``--self_condition``) and AdamW's weight decay 0.1 (``--weight_decay 0.1``); every
other choice stays off unless asked for. Boolean flags take both forms: ``--fid`` and ``--fid True/False``;
``--cuda_graph`` and ``--one_pass`` also take ``auto``.
"""
from __future__ import annotations

import argparse
import math

from dataset import CLASSES
from precision import PRECISIONS
from trainer import LR_DECAYS


def str2bool(value: str) -> bool:
    lowered = str(value).strip().lower()
    if lowered in ("true", "t", "yes", "y", "1", "on"):
        return True
    if lowered in ("false", "f", "no", "n", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def auto_or_bool(value: str) -> str | bool:
    """``auto``, or a boolean as ``str2bool`` reads it."""
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        return str2bool(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto, True or False, got {value!r}") from None


auto_or_bool.__name__ = "auto, True or False"  # argparse names the type in its messages


def _number(kind, *, minimum=None, exclusive=False, maximum=None, exclusive_max=False, what="a number"):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if minimum is not None and (value <= minimum if exclusive else value < minimum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if maximum is not None and (value >= maximum if exclusive_max else value > maximum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _number(int, minimum=1, what="a positive integer")
non_negative_int = _number(int, minimum=0, what="a non-negative integer")
non_negative_float = _number(float, minimum=0.0, what="a non-negative number")
learning_rate = _number(float, minimum=0.0, exclusive=True, maximum=1.0, what="a learning rate in (0, 1]")
fraction = _number(float, minimum=0.0, maximum=1.0, what="a number in [0, 1]")
dropout = _number(float, minimum=0.0, maximum=0.99, what="a dropout rate in [0, 0.99]")


def _flag(group, name, kind, default, help_text, **kw):
    if kind is bool:
        group.add_argument(f"--{name}", type=str2bool, nargs="?", const=True, default=default, metavar="BOOL",
                           help=help_text, **kw)
    elif kind is auto_or_bool:
        group.add_argument(f"--{name}", type=auto_or_bool, nargs="?", const=True, default=default,
                           metavar="{auto,True,False}", help=help_text, **kw)
    else:
        group.add_argument(f"--{name}", type=kind, default=default, help=help_text, **kw)


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (what is wrong, and where to look) instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (python main.py --help lists every flag)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="main.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train a DDPM on AFHQ cats, visualize its diffusion processes, sample it and score it with FID.")

    a = p.add_argument_group("the assignment's flags (Table 1)")
    _flag(a, "image_size", positive_int, 32, "side of the square training images, in pixels")
    _flag(a, "batch_size", positive_int, 32, "images per batch (per process); each step takes --grad_accum batches")
    _flag(a, "data_class", str, "cat", "AFHQ domain to train on ('all' = every class folder)", choices=CLASSES + ("all",))
    _flag(a, "save_folder", str, "./results/", "where checkpoints, samples, metrics and figures go")
    _flag(a, "load_path", str, None, "checkpoint to resume training from, or to visualize / sample / score")
    _flag(a, "data_path", str, "./data/train/", "folder holding one sub-folder of images per class")
    _flag(a, "train_steps", positive_int, 10000, "total optimizer steps (a resumed run counts its earlier steps)")
    _flag(a, "time_steps", _number(int, minimum=2, what="an integer of at least 2"), 50,
          "number of diffusion steps T")
    _flag(a, "unet_dim", positive_int, 16, "channels of the first U-Net level (a multiple of 8)")
    _flag(a, "learning_rate", learning_rate, 1e-3, "Adam learning rate")
    _flag(a, "save_and_sample_every", positive_int, 1000, "steps between checkpoints, sample grids and FID")
    _flag(a, "fid", bool, False, "score FID (and KID) every --save_and_sample_every steps")
    _flag(a, "visualize", bool, False, "with --load_path: draw the forward and backward processes, then exit")

    m = p.add_argument_group("model")
    m.add_argument("--dim_mults", type=positive_int, nargs="+", default=[1, 2, 4, 8],
                   help="channel multiplier of each U-Net level, highest resolution first")
    _flag(m, "num_res_blocks", positive_int, 2, "residual blocks per U-Net level")
    m.add_argument("--attention_levels", type=non_negative_int, nargs="*", default=None,
                   help="U-Net levels (0 = highest resolution) with self-attention; default: the lowest only")
    _flag(m, "dropout", dropout, 0.0, "dropout inside the residual blocks")
    _flag(m, "self_condition", bool, True, "self-conditioning (Chen et al. 2023): the U-Net also takes an x_0 "
          "estimate (its own, from a first pass or the previous sampling step)")
    _flag(m, "loss", str, "l1", "loss on the predicted noise (the assignment's is L1)", choices=("l1", "l2", "huber"))

    t = p.add_argument_group("training")
    _flag(t, "grad_accum", positive_int, 2, "batches per optimizer step (2, as the handout trainer takes)")
    _flag(t, "one_pass", auto_or_bool, "auto", "run a step's --grad_accum batches as one forward and backward pass "
          "(False: a pass per batch, less memory); auto = one pass on the CPU")
    _flag(t, "grad_clip", non_negative_float, 1.0, "clip the gradient norm to this (0 = off)")
    _flag(t, "weight_decay", fraction, 0.1,
          "decoupled weight decay (AdamW) of the convolution and linear kernels; 0 = off")
    _flag(t, "lr_warmup", non_negative_int, 0, "steps of linear learning-rate warm-up")
    _flag(t, "lr_decay", str, "none", "learning-rate decay after the warm-up: cosine down to 0 at --train_steps",
          choices=LR_DECAYS)
    _flag(t, "ema_decay", fraction, 0.999, "the largest decay of the exponential moving average of the weights")
    _flag(t, "ema_sigma_rel", _number(float, minimum=0.0, exclusive=True, maximum=0.28, what="a number in (0, 0.28]"),
          0.05, "relative width of the EMA until --ema_decay caps it (Karras et al. 2024): "
          "0.05 averages about the last twentieth of the run")
    _flag(t, "precision", str, "auto", "mixed precision: auto = bf16 on Ampere+ GPUs and CPUs with bf16 "
          "instructions, fp16 on older GPUs, fp32 elsewhere", choices=PRECISIONS)
    _flag(t, "compile", bool, False, "compile the U-Net with torch.compile")
    _flag(t, "cuda_graph", auto_or_bool, False, "capture each training step in one CUDA graph, removing the launch "
          "overhead that bounds small models (one GPU, one process); auto = wherever it can")
    _flag(t, "device", str, "auto", "where to run: auto = CUDA, else MPS, else CPU", choices=("auto", "cpu", "cuda", "mps"))
    _flag(t, "seed", non_negative_int, 0, "random seed (data order, noise, timesteps)")
    _flag(t, "overwrite", bool, False, "let a new run replace the model.pt already in --save_folder")
    _flag(t, "log_every", positive_int, 10, "steps between loss records (the loss is averaged over them)")

    d = p.add_argument_group("data")
    _flag(d, "flip", bool, True, "random horizontal flips")
    _flag(d, "cache_dir", str, None, "where the decoded-image cache and FID statistics go (default: beside the data)")
    _flag(d, "download", str, "auto", "download AFHQ: auto = when the data folder is missing", choices=("auto", "always", "never"))
    _flag(d, "dataset_source", str, "v2", "which AFHQ archive to download", choices=("v2", "v1", "cmu"))

    s = p.add_argument_group("sampling, FID and figures")
    _flag(s, "num_samples", positive_int, 16, "images in each periodic sample grid")
    _flag(s, "sampler", str, "ddpm", "sampler of the grids, FID and --sample: the full DDPM chain, or DDIM",
          choices=("ddpm", "ddim"))
    _flag(s, "sample_steps", positive_int, 50, "DDIM steps (with --sampler ddim)")
    _flag(s, "sample", non_negative_int, 0, "with --load_path: write a grid of this many samples, then exit")
    _flag(s, "num_vis", positive_int, 8, "images (rows) in the --visualize figures")
    _flag(s, "evaluate", bool, False, "with --load_path: print the model's FID and KID, then exit")
    _flag(s, "fid_samples", positive_int, 1000, "generated images per FID evaluation")
    _flag(s, "fid_mode", str, "clean", "clean-fid mode", choices=("clean", "legacy_pytorch", "legacy_tensorflow"))

    w = p.add_argument_group("logging")
    _flag(w, "wandb", str, "auto", "auto = online with a wandb login, offline without", choices=("auto", "online", "offline", "disabled"))
    _flag(w, "wandb_project", str, "ddpm-afhq", "wandb project name")
    _flag(w, "run_name", str, None, "wandb run name")
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks that involve several flags; each failure is one line and exit code 2 (argparse's error)."""
    for mode in ("visualize", "sample", "evaluate"):
        if getattr(args, mode) and not args.load_path:
            parser.error(f"--{mode} needs a trained model: add --load_path results/model.pt "
                         f"(the model.pt that training wrote)")
    levels = args.attention_levels or []
    if any(level >= len(args.dim_mults) for level in levels):
        parser.error(f"--attention_levels {levels} must be below the number of --dim_mults ({len(args.dim_mults)})")
    if args.sampler == "ddim" and args.sample_steps > args.time_steps:
        parser.error(f"--sample_steps {args.sample_steps} is more than --time_steps {args.time_steps}; lower it")


def named_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The flags (their ``dest`` names) that ``argv`` itself names, whatever their values, defaults aside."""
    defaults = {action: action.default for action in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        named, _ = parser.parse_known_args(argv)
    finally:
        for action, default in defaults.items():
            action.default = default
    return set(vars(named))


def flags_markdown(parser: argparse.ArgumentParser | None = None) -> str:
    """The table of every flag (name, default, meaning) that README.md embeds; a test keeps them equal."""
    parser = parser or build_parser()
    lines = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        lines += ["", f"**{group.title}**", "", "| flag | default | meaning |", "| --- | --- | --- |"]
        for action in actions:
            default = action.default
            if isinstance(default, list):
                default = " ".join(map(str, default))
            choices = f" (one of: {', '.join(map(str, action.choices))})" if action.choices else ""
            lines.append(f"| `{action.option_strings[0]}` | `{default}` | {action.help}{choices} |")
    return "\n".join(lines).strip() + "\n"


if __name__ == "__main__":
    print(flags_markdown(), end="")
