"""Every setting of a run, declared once: ``Config``'s fields.

Each field carries its name, type, default, help, flag group, validation and its role:

- ``network``: decides the network's shape or the meaning of its timesteps. A checkpoint records it, and
  loading one adopts it unless the command line names the flag.
- ``training``: says how the weights are trained. A resumed run adopts the checkpoint's value unless the
  command line names the flag, so that it goes on as it started.
- ``run``: only how this run behaves (where files go, what to print, how fast to run).

``settings/cli.py``'s parser, the trainer's config and its defaults, what checkpoints record and adopt, the flag
table and the checks of every value all come from these fields; adding a setting means adding a field here
and the code that uses it. The assignment's flags (Table 1) come first, with its recommended command as their
defaults. Boolean flags take both forms: ``--fid`` and ``--fid True/False``; ``--cuda_graph`` and
``--one_pass`` also take ``auto``.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable

ROLES = ("network", "training", "run")
# The choices of the settings are declared here, and the modules that act on them read them from here, so that
# the command line (and --help) is built without importing torch or anything else of the package. The
# mathematics imports no settings: it owns its own tables (``diffusion.LOSSES``, ``sampling.samplers.SAMPLERS``),
# and these two name the same entries (tests/test_commands.py keeps them equal).
LOSSES = ("l1", "l2", "huber")
SAMPLERS = ("ancestral", "ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde")
EVERY_TIMESTEP = ("ddpm",)  # the samplers that visit every timestep, whatever --sample_steps says
SAMPLE_STEPS = 10  # ``sampling.samplers.DEFAULT_STEPS``: the other samplers' steps unless --sample_steps names them
DOWNLOAD_MODES = ("auto", "always", "never")
DOWNLOAD_SOURCES = ("v2", "v1", "cmu")  # the AFHQ archives of ``imagedata.download.AFHQ_URLS``
WANDB_MODES = ("auto", "online", "offline", "disabled")
FID_MODES = ("clean", "legacy_pytorch", "legacy_tensorflow")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
LR_DECAYS = ("none", "cosine")
DEVICES = ("auto", "cpu", "cuda", "mps")
# The network each image size gets unless --dim_mults names one: (channel multipliers, attention levels). 32 px
# is the assignment's network. 64 px keeps its widths at each resolution and adds a 4 x 4 level without
# attention: among the candidates of docs/quality.md it has the best FID at equal training time (attention at
# 16 x 16 as well scores better at equal steps, but is slower and draws strong colour casts). 128 px follows
# the same pattern (the same widths at each resolution, a narrow level at 128 x 128, attention at 8 x 8 only): it
# scores far better at equal steps than the narrower network with attention at 8 x 8 and 4 x 4 that it replaced,
# for a step a little slower. A size between two of these takes the larger's.
SIZE_NETWORKS = {32: ((1, 2, 4, 8), (3,)), 64: ((1, 2, 4, 8, 8), (3,)), 128: ((1, 1, 2, 4, 8, 8), (4,))}


def _by_size(describe) -> str:
    """``SIZE_NETWORKS`` as help text: each size with ``describe(size, dim_mults, attention_levels)``."""
    return ", ".join(f"{size} px: {describe(size, *net)}" for size, net in sorted(SIZE_NETWORKS.items()))


def size_network(image_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (dim_mults, attention_levels) of ``SIZE_NETWORKS`` that ``image_size`` takes."""
    return SIZE_NETWORKS[next((s for s in sorted(SIZE_NETWORKS) if image_size <= s), max(SIZE_NETWORKS))]


def network_shape(image_size: int, dim_mults, attention_levels) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The dim_mults and attention levels a network gets: by size where ``dim_mults`` is None; the lowest level's
    attention only where ``dim_mults`` is given without ``attention_levels`` (and in checkpoints of earlier
    versions, which record None)."""
    if dim_mults is None:
        mults, levels = size_network(image_size)
        return mults, tuple(levels if attention_levels is None else attention_levels)
    mults = tuple(dim_mults)
    return mults, (len(mults) - 1,) if attention_levels is None else tuple(attention_levels)


class Kind:
    """A flag's value type: parses the command line's text and checks a value however it was given."""

    def __init__(self, convert: Callable[[str], Any], what: str, test: Callable[[Any], bool] = lambda v: True,
                 metavar: str | None = None):
        self.convert, self.what, self.test, self.metavar = convert, what, test, metavar
        self.__name__ = what  # argparse names the type in its messages

    def __call__(self, text: str):
        try:
            value = self.convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.what}, got {text!r}") from None
        if not self.valid(value):
            raise argparse.ArgumentTypeError(f"expected {self.what}, got {text!r}")
        return value

    def valid(self, value) -> bool:
        try:
            return self.test(value)
        except TypeError:
            return False


def _bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("true", "t", "yes", "y", "1", "on"):
        return True
    if lowered in ("false", "f", "no", "n", "0", "off"):
        return False
    raise ValueError(text)


def _auto_or_bool(text: str) -> str | bool:
    return "auto" if str(text).strip().lower() == "auto" else _bool(text)


def _number(kind: type, what: str, low: float | None = None, high: float | None = None, *,
            open_low: bool = False, open_high: bool = False) -> Kind:
    def test(value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            return False
        if not math.isfinite(value):
            return False
        if low is not None and (value <= low if open_low else value < low):
            return False
        return high is None or (value < high if open_high else value <= high)

    return Kind(kind, what, test)


BOOL = Kind(_bool, "True or False", lambda v: isinstance(v, bool), metavar="BOOL")
AUTO_OR_BOOL = Kind(_auto_or_bool, "auto, True or False", lambda v: v == "auto" or isinstance(v, bool),
                    metavar="{auto,True,False}")
TEXT = Kind(str, "a text", lambda v: isinstance(v, str))
POSITIVE_INT = _number(int, "a positive integer", 1)
NON_NEGATIVE_INT = _number(int, "a non-negative integer", 0)
NON_NEGATIVE = _number(float, "a non-negative number", 0.0)
FRACTION = _number(float, "a number in [0, 1]", 0.0, 1.0)
MAX_CANDIDATES = 64  # one chain batch of fills per image
_UP_TO_CANDIDATES = _number(int, "", 1, MAX_CANDIDATES)
CANDIDATES = Kind(int, f"1, or 3 to {MAX_CANDIDATES} (two fills have no majority)",
                  lambda v: _UP_TO_CANDIDATES.test(v) and v != 2)


def setting(default, help: str, *, group: str, role: str = "run", kind: Kind = TEXT, choices: tuple = (),
            nargs: str | None = None, optional: bool = False):
    """One ``Config`` field with everything the parser, the checks and the checkpoints need to know of it.
    ``nargs`` ("+" or "*") makes a list flag, kept as a tuple; ``optional`` lets the value be None."""
    assert role in ROLES
    meta = dict(help=help, group=group, role=role, kind=kind, choices=choices, nargs=nargs, optional=optional)
    return field(default=default, metadata=meta)


ASSIGNMENT, MODEL, TRAINING, DATA, SAMPLING, EDITING, PAGE, CLASSES_GROUP, LOGGING = (
    "the assignment's flags (Table 1)", "model", "training", "data", "sampling, FID and figures",
    "editing images with a trained model", "the page (--serve)", "classes and classifier-free guidance", "logging")
PAGE_EXTRA = "pip install -r requirements-page.txt"  # what --serve needs beyond requirements.txt
COMMANDS = ("visualize", "sample", "evaluate", "inpaint", "img2img", "serve")  # the commands over a trained model
MASKS = ("centre", "left", "right", "top", "bottom", "strokes")  # the named regions --inpaint fills
CLASS_FLAGS = ("class_dropout", "guidance", "sample_class")  # what only a class-conditional model takes


@dataclass(frozen=True)
class Config:
    """One run's settings. Build it with keywords (``Config(grad_accum=1)``) or from the command line
    (``parse``); every value is checked at construction, and a bad one raises ValueError naming its flag."""

    # the assignment's Table 1
    image_size: int = setting(32, "side of the square training images, in pixels", group=ASSIGNMENT,
                              role="network", kind=POSITIVE_INT)
    batch_size: int = setting(32, "images per batch (per process); each step takes --grad_accum batches",
                              group=ASSIGNMENT, role="training", kind=POSITIVE_INT)
    data_class: str = setting("cat", "the sub-folder of --data_path to train on (AFHQ's cat, dog, wild, or any "
                              "folder's name); all = every image under --data_path. Not given, and no cat/ there: "
                              "every image under --data_path", group=ASSIGNMENT)
    save_folder: str = setting("./results/", "where checkpoints, samples, metrics and figures go", group=ASSIGNMENT)
    load_path: str | None = setting(None, "a checkpoint to resume training from, or to use (--visualize, --sample, "
                                    "--evaluate, --inpaint, --img2img)", group=ASSIGNMENT, optional=True)
    data_path: str = setting("./data/train/", "folder of the training images: any layout (flat or in sub-folders), "
                             "or one sub-folder per class", group=ASSIGNMENT)
    train_steps: int = setting(10000, "total optimizer steps (a resumed run counts its earlier steps)",
                               group=ASSIGNMENT, kind=POSITIVE_INT)
    time_steps: int = setting(50, "number of diffusion steps T", group=ASSIGNMENT, role="network",
                              kind=_number(int, "an integer of at least 2", 2))
    unet_dim: int = setting(16, "channels of the first U-Net level (a multiple of 8)", group=ASSIGNMENT,
                            role="network", kind=POSITIVE_INT)
    learning_rate: float = setting(1e-3, "Adam learning rate", group=ASSIGNMENT, role="training",
                                   kind=_number(float, "a learning rate in (0, 1]", 0.0, 1.0, open_low=True))
    save_and_sample_every: int = setting(1000, "steps between checkpoints, sample grids and FID", group=ASSIGNMENT,
                                         kind=POSITIVE_INT)
    fid: bool = setting(False, "score FID (and KID) every --save_and_sample_every steps", group=ASSIGNMENT, kind=BOOL)
    visualize: bool = setting(False, "with --load_path: draw the forward and backward processes, then exit",
                              group=ASSIGNMENT, kind=BOOL)

    # the network
    dim_mults: tuple[int, ...] | None = setting(
        None, "channel multiplier of each U-Net level, highest resolution first; default: by --image_size ("
        + _by_size(lambda size, mults, levels: " ".join(map(str, mults))) + ")", group=MODEL, role="network",
        kind=POSITIVE_INT, nargs="+", optional=True)
    num_res_blocks: int = setting(2, "residual blocks per U-Net level", group=MODEL, role="network", kind=POSITIVE_INT)
    attention_levels: tuple[int, ...] | None = setting(
        None, "U-Net levels (0 = highest resolution) with self-attention; default: by --image_size (the levels at "
        + _by_size(lambda size, mults, levels: " and ".join(f"{size // 2 ** i} x {size // 2 ** i}" for i in levels))
        + "), the lowest only with --dim_mults given", group=MODEL,
        role="network", kind=NON_NEGATIVE_INT, nargs="*", optional=True)
    dropout: float = setting(0.0, "dropout inside the residual blocks", group=MODEL, role="training",
                             kind=_number(float, "a dropout rate in [0, 0.99]", 0.0, 0.99))
    self_condition: bool = setting(True, "self-conditioning (Chen et al. 2023): the U-Net also takes an x_0 estimate "
                                   "(its own, from a first pass or the previous sampling step)", group=MODEL,
                                   role="network", kind=BOOL)
    loss: str = setting("l1", "loss on the predicted noise (the assignment's is L1; L1 learns a median, which thins "
                        "strokes, and l2 draws each class nearer its share of the data)", group=MODEL,
                        role="training", choices=LOSSES)

    # how the weights are trained, and how fast
    grad_accum: int = setting(2, "batches per optimizer step (2, as the handout trainer takes)", group=TRAINING,
                              role="training", kind=POSITIVE_INT)
    one_pass: str | bool = setting("auto", "a step's --grad_accum batches as one pass (False: a pass per batch, less "
                                   "memory); auto = one pass on a CPU or CUDA GPU where it fits a quarter of the free "
                                   "memory", group=TRAINING, kind=AUTO_OR_BOOL)
    grad_clip: float = setting(1.0, "clip the gradient norm to this (0 = off)", group=TRAINING, role="training",
                               kind=NON_NEGATIVE)
    weight_decay: float = setting(0.1, "decoupled weight decay (AdamW) of the convolution and linear kernels; 0 = off",
                                  group=TRAINING, role="training", kind=FRACTION)
    lr_warmup: int = setting(0, "steps of linear learning-rate warm-up", group=TRAINING, role="training",
                             kind=NON_NEGATIVE_INT)
    lr_decay: str = setting("none", "learning-rate decay after the warm-up: cosine down to 0 at --train_steps",
                            group=TRAINING, role="training", choices=LR_DECAYS)
    ema_decay: float = setting(0.999, "the largest decay of the exponential moving average of the weights",
                               group=TRAINING, role="training", kind=FRACTION)
    ema_sigma_rel: float = setting(0.05, "relative width of the EMA until --ema_decay caps it (Karras et al. 2024): "
                                   "0.05 averages about the last twentieth of the run", group=TRAINING,
                                   role="training", kind=_number(float, "a number in (0, 0.28]", 0.0, 0.28,
                                                                 open_low=True))
    precision: str = setting("auto", "mixed precision: auto = bf16 on Ampere+ GPUs and CPUs with bf16 instructions, "
                             "fp16 on older GPUs, fp32 elsewhere", group=TRAINING, choices=PRECISIONS)
    compile: bool = setting(False, "compile the U-Net with torch.compile", group=TRAINING, kind=BOOL)
    cuda_graph: str | bool = setting(False, "capture the training step and the sampling step each in a CUDA "
                                     "graph, removing the launch overhead that bounds small models (training: one "
                                     "GPU, one process, no --compile); auto = wherever it can", group=TRAINING,
                                     kind=AUTO_OR_BOOL)
    device: str = setting("auto", "where to run: auto = CUDA, else MPS, else CPU", group=TRAINING, choices=DEVICES)
    seed: int = setting(0, "random seed (data order, noise, timesteps)", group=TRAINING, kind=NON_NEGATIVE_INT)
    overwrite: bool = setting(False, "let a new run replace the model.pt already in --save_folder", group=TRAINING,
                              kind=BOOL)
    log_every: int = setting(10, "steps between loss records (the loss is averaged over them)", group=TRAINING,
                             kind=POSITIVE_INT)

    # the data
    channels: int = setting(3, "image channels: 3 (colour) or 1 (grayscale: a 1-channel network, grey samples)",
                            group=DATA, role="network", kind=POSITIVE_INT, choices=(1, 3))
    flip: bool = setting(True, "random horizontal flips", group=DATA, role="training", kind=BOOL)
    cache_dir: str | None = setting(None, "where the decoded-image cache and FID statistics go (default: beside the "
                                    "data)", group=DATA, optional=True)
    download: str = setting("auto", "download AFHQ: auto = when the data folder is missing, or holds one AFHQ class "
                            "alone where every class is asked for", group=DATA, choices=DOWNLOAD_MODES)
    dataset_source: str = setting("v2", "which AFHQ archive to download", group=DATA, choices=DOWNLOAD_SOURCES)

    # sampling, FID and figures
    num_samples: int = setting(16, "images in each periodic sample grid", group=SAMPLING, kind=POSITIVE_INT)
    sampler: str = setting("ancestral", "sampler of the grids, FID and the commands over a checkpoint (edits "
                           "included): ancestral = DDPM's step over --sample_steps of the T timesteps, ddpm = the "
                           "assignment's chain over all T (--visualize always draws it)", group=SAMPLING,
                           choices=SAMPLERS)
    sample_steps: int | None = setting(None, f"steps (network evaluations) of the samplers other than ddpm, which "
                                       f"visits every timestep; default {SAMPLE_STEPS}, or T where T is fewer",
                                       group=SAMPLING, kind=POSITIVE_INT, optional=True)
    sample: int = setting(0, "with --load_path: write a grid of this many samples, then exit", group=SAMPLING,
                          kind=NON_NEGATIVE_INT)
    num_vis: int = setting(8, "images (rows) in the --visualize figures", group=SAMPLING, kind=POSITIVE_INT)
    evaluate: bool = setting(False, "with --load_path: print the model's FID and KID, then exit", group=SAMPLING,
                             kind=BOOL)
    fid_samples: int = setting(1000, "generated images per FID evaluation", group=SAMPLING, kind=POSITIVE_INT)
    fid_mode: str = setting("clean", "clean-fid mode", group=SAMPLING, choices=FID_MODES)

    # editing images with a trained model
    inpaint: str | None = setting(None, "with --load_path: fill the --mask region of this image, or of every image in "
                                  "this folder, then exit", group=EDITING, optional=True)
    mask: str = setting("centre", "what --inpaint fills: centre, left, right, top, bottom, strokes (random, one set "
                        "per result), or a mask image (white = fill)", group=EDITING)
    resample: int = setting(5, "RePaint resamplings of each --inpaint step, for a fill that agrees with what is kept "
                            "(1 = plain replacement; the cost grows with it)", group=EDITING, kind=POSITIVE_INT)
    kept_guidance: float = setting(10.0, "how hard each resampled --inpaint step is pulled towards agreeing with "
                                   "the kept pixels (diffusion posterior sampling; 0 = off, and off at --resample 1; "
                                   "on, a step costs about twice)", group=EDITING, kind=NON_NEGATIVE)
    candidates: int = setting(1, "fills of each hole --inpaint draws, keeping the one nearest the others (the "
                              "fill most of them agree on; the cost grows with it)", group=EDITING,
                              kind=CANDIDATES)
    img2img: str | None = setting(None, "with --load_path: redraw this image, or every image in this folder, from "
                                  "--strength (towards --sample_class), then exit", group=EDITING, optional=True)
    strength: float = setting(0.5, "how much of the chain --img2img runs: 0 returns the image, 1 draws a new one",
                              group=EDITING, kind=FRACTION)
    edits: int = setting(4, "results per input image of --inpaint and --img2img", group=EDITING, kind=POSITIVE_INT)
    mask_conditional: bool = setting(False, "train a model that also sees the pixels an inpainting keeps, on random "
                                     "holes, so that --inpaint fills from them even in one plain chain (--resample "
                                     "1); it samples from noise too. With --load_path of a model without it (and "
                                     "another --save_folder), training grows that model into one",
                                     group=EDITING, role="network", kind=BOOL)

    # the page
    serve: bool = setting(False, f"with --load_path: serve a page to sample, inpaint and redraw with the model, until "
                          f"stopped (needs Gradio: {PAGE_EXTRA})", group=PAGE, kind=BOOL)
    host: str = setting("127.0.0.1", "the address --serve listens on: 127.0.0.1 answers this machine only, 0.0.0.0 "
                        "every network it is on", group=PAGE)
    port: int | None = setting(None, "the port --serve listens on (default: the first free one from 7860)",
                               group=PAGE, kind=_number(int, "a port in [1, 65535]", 1, 65535), optional=True)
    share: bool = setting(False, "--serve also through a public gradio.live link: anyone with the link can use the "
                          "model (needs the internet)", group=PAGE, kind=BOOL)

    # classes and classifier-free guidance
    class_conditional: bool = setting(False, "train on every class folder under --data_path, with the folder's "
                                      "name as each image's class", group=CLASSES_GROUP,
                                      role="network", kind=BOOL)
    class_dropout: float = setting(0.1, "chance that a training image's class is replaced by \"no class\"",
                                   group=CLASSES_GROUP,
                                   role="training", kind=_number(float, "a probability in [0, 1)", 0.0, 1.0,
                                                                 open_high=True))
    guidance: float = setting(1.0, "guidance scale w of a conditional model's samples and FID: eps = (1 + w) "
                              "eps(x, class) - w eps(x, no class)",
                              group=CLASSES_GROUP, kind=NON_NEGATIVE)
    sample_class: str | None = setting(None, "the class --sample draws (default: every class, a row each), or "
                                       "--img2img turns images into", group=CLASSES_GROUP, optional=True)

    # logging
    wandb: str = setting("auto", "auto = online with a wandb login, offline without", group=LOGGING,
                         choices=WANDB_MODES)
    wandb_project: str = setting("ddpm-afhq", "wandb project name", group=LOGGING)
    run_name: str | None = setting(None, "wandb run name", group=LOGGING, optional=True)

    def __post_init__(self):
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if meta["nargs"] and isinstance(value, list):
                object.__setattr__(self, f.name, value := tuple(value))
            if value is None and meta["optional"]:
                continue
            items = value if meta["nargs"] and isinstance(value, tuple) else (value,)
            if (meta["nargs"] and not isinstance(value, tuple)) or (meta["nargs"] == "+" and not items) or not all(
                    meta["kind"].valid(v) and (not meta["choices"] or v in meta["choices"]) for v in items):
                expected = f"one of {', '.join(map(str, meta['choices']))}" if meta["choices"] else meta["kind"].what
                raise ValueError(f"--{f.name} {show(value)} is not valid: expected {expected}")
        for mode in COMMANDS:
            if getattr(self, mode) and not self.load_path:
                raise ValueError(f"--{mode} needs a trained model: add --load_path results/model.pt "
                                 f"(the model.pt that training wrote)")
        if not self.data_class.strip():
            raise ValueError("--data_class is empty; pass a sub-folder's name, or all")
        mults, levels = network_shape(self.image_size, self.dim_mults, self.attention_levels)
        object.__setattr__(self, "dim_mults", mults)
        object.__setattr__(self, "attention_levels", levels)
        factor = 2 ** (len(self.dim_mults) - 1)
        if self.image_size % factor:
            nearest = [s for s in (self.image_size // factor * factor, (self.image_size // factor + 1) * factor) if s]
            raise ValueError(f"--image_size {self.image_size} does not fit a U-Net of {len(self.dim_mults)} levels "
                             f"(--dim_mults {show(self.dim_mults)}), which takes multiples of {factor}; the nearest "
                             f"are {' and '.join(map(str, nearest))}")
        if any(level >= len(self.dim_mults) for level in levels):
            raise ValueError(f"--attention_levels {show(levels)} must be below the number of --dim_mults "
                             f"({len(self.dim_mults)})")
        if self.sampler not in EVERY_TIMESTEP and (self.sample_steps or 0) > self.time_steps:
            raise ValueError(f"--sample_steps {self.sample_steps} is more than --time_steps {self.time_steps}; lower it")

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def data_selection(self) -> str:
        """The class folders the data is read from (``--data_class``): every one for a class-conditional model."""
        return "all" if self.class_conditional else self.data_class

    @property
    def chain_length(self) -> int:
        """The steps (network evaluations) of one reverse chain of ``--sampler``: T for DDPM, else ``--sample_steps``
        (default ``SAMPLE_STEPS``, or T where T is fewer)."""
        if self.sampler in EVERY_TIMESTEP:
            return self.time_steps
        return self.sample_steps if self.sample_steps is not None else min(SAMPLE_STEPS, self.time_steps)

    @property
    def sampler_name(self) -> str:
        """The sampler as figures and reports name it: ``ddpm``, or ``ancestral, 10 steps``."""
        return self.sampler if self.sampler in EVERY_TIMESTEP else f"{self.sampler}, {self.chain_length} steps"

    @property
    def trains(self) -> bool:
        """Whether the command trains (rather than visualizing, sampling or scoring a checkpoint)."""
        return not any(getattr(self, command) for command in COMMANDS)


def names(*roles: str) -> tuple[str, ...]:
    """The settings of the given roles, in declaration order."""
    return tuple(f.name for f in fields(Config) if f.metadata["role"] in roles)


def recorded(saved: dict, *, training: bool) -> dict:
    """The settings a checkpoint's recorded config hands on: its network's, and with ``training`` also how it
    was trained."""
    wanted = names("network", "training") if training else names("network")
    out = {k: comparable(saved[k]) for k in wanted if k in saved}
    if "dim_mults" in out:  # as the network was built (earlier versions record None for the default attention)
        out["dim_mults"], out["attention_levels"] = network_shape(saved.get("image_size", 32), out["dim_mults"],
                                                                  out.get("attention_levels"))
    return out


def comparable(value):
    """A setting's value in a form that compares equal whether it came from JSON (lists) or from code (tuples)."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def show(value) -> str:
    """A setting's value as it is written on the command line (``1 2 4 8`` for a list)."""
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)
