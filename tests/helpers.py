"""Small builders shared by the tests: a tiny U-Net, fake batches, a stand-in for Inception, and image folders
made with PIL."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusion import Diffusion
from imagedata.batches import Batch
from unet import Unet

ROOT = Path(__file__).resolve().parents[1]

# main.py flags of a tiny run: 16-pixel images, a 2-level U-Net of width 8, T = 10, batches of 4, on the CPU
TINY_FLAGS = ["--image_size", "16", "--unet_dim", "8", "--dim_mults", "1", "2", "--num_res_blocks", "1",
              "--time_steps", "10", "--batch_size", "4", "--num_samples", "4", "--wandb", "disabled", "--device", "cpu"]


def tiny_run(root: Path, steps: int, *flags: str) -> tuple[Path, Path, Path]:
    """Train a tiny run of ``steps`` steps through main.py on 12 made-up 24-pixel images, saving at the end;
    returns (data folder, cache folder, save folder)."""
    import main

    data, cache, save = make_image_folder(root / "afhq", count=12, size=24), root / "cache", root / "run"
    assert main.main([*TINY_FLAGS, "--data_path", str(data), "--save_folder", str(save), "--cache_dir", str(cache),
                      "--train_steps", str(steps), "--save_and_sample_every", str(steps), *flags]) == 0
    return data, cache, save


def tiny_diffusion(*, size: int = 16, T: int = 10, dim: int = 8, dropout: float = 0.0,
                   self_condition: bool = False) -> Diffusion:
    net = Unet(dim, (1, 2), num_res_blocks=1, image_size=size, dropout=dropout, self_condition=self_condition)
    return Diffusion(net, image_size=size, timesteps=T)


class FakeBatches:
    """An infinite, resumable stream of random unlabelled batches in [-1, 1], like batches.DeviceBatches."""

    def __init__(self, batch_size: int = 4, size: int = 16, *, seed: int = 0):
        self.batch_size, self.size, self.seed, self.world_size = batch_size, size, seed, 1
        self.position = 0

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.position)
            self.position += 1
            yield Batch(torch.rand(self.batch_size, 3, self.size, self.size, generator=g) * 2 - 1)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


class TinyFeatures(torch.nn.Module):
    """Stands in for Inception (FeatureExtractor's custom-model convention): float [B, 3, 299, 299] in [0, 255] -> [B, 16] features."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 9, stride=8)
        g = torch.Generator().manual_seed(123)  # the same features in every test, without touching the global seed
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) / 15)
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=g) / 15)

    def forward(self, x):
        return self.conv(x / 255).mean(dim=(2, 3))


def make_image_folder(root: Path, *, count: int = 12, size: int = 40, cls: str = "cat") -> Path:
    """``root/train/<cls>/`` with ``count`` random-coloured JPEGs; returns ``root/train``."""
    folder = root / "train" / cls
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        base = rng.integers(0, 256, size=3)
        array = np.clip(base + rng.integers(-40, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(array).save(folder / f"img_{i:03d}.jpg", quality=95)
    return root / "train"


def lit_channel(images: torch.Tensor) -> torch.Tensor:
    """The simple rule that reads a colour image's class: the channel with the largest mean (0 red, 1 green, 2 blue)."""
    return images.mean(dim=(2, 3)).argmax(dim=1)


def colour_set(per_class: int = 32, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [3 * per_class, 3, S, S] and labels: 0 red, 1 green, 2 blue, the lit channel being the label."""
    rng = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(per_class)
    colours = torch.eye(3)[labels] * 1.4 - 0.7
    x = colours[:, :, None, None] + 0.3 * torch.randn(len(labels), 3, size, size, generator=rng)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), labels


def train_colours(folder: Path, *, conditional: bool, size: int = 16, steps: int = 200, **settings):
    """The EMA sampler of a tiny model trained ``steps`` steps on ``colour_set`` (its classes red, green and blue
    when ``conditional``); ``settings`` as in ``train_tiny``."""
    images, labels = colour_set(size=size)
    return train_tiny(folder, images, labels if conditional else None, ("red", "green", "blue") if conditional else (),
                      steps=steps, **settings)


def bar_set(count: int = 96, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 16-pixel images [count, 3, 16, 16] of one bar each, of a random bright colour on a dark ground, and
    their labels: 0 a horizontal bar (rows 6 to 9), 1 a vertical one (columns 6 to 9); half of each."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(2).repeat_interleave(count // 2)
    x = torch.full((count, 3, 16, 16), -0.8)
    colours = torch.rand(count, 3, 1, 1, generator=g) * 1.2 - 0.2
    horizontal = labels == 0
    x[horizontal, :, 6:10, :] = colours[horizontal]
    x[~horizontal, :, :, 6:10] = colours[~horizontal]
    x = x + 0.1 * torch.randn(x.shape, generator=g)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), labels


def bar_kind(images: torch.Tensor) -> torch.Tensor:
    """The rule that reads ``bar_set``'s class: 1 where the band of columns 6 to 9 is brighter, away from the
    crossing, than the band of rows 6 to 9."""
    rows, cols = images[:, :, 6:10, :].mean(dim=(1, 2)), images[:, :, :, 6:10].mean(dim=(1, 3))
    outside = torch.cat([torch.arange(6), torch.arange(10, 16)])
    return (cols[:, outside].mean(1) > rows[:, outside].mean(1)).long()


def train_tiny(folder: Path, images: torch.Tensor, labels: torch.Tensor | None, classes: tuple[str, ...], *,
               steps: int = 200, **settings):
    """The EMA sampler of a tiny model (16 px, ``--unet_dim 8``, T = 20) trained ``steps`` steps through the
    package's Trainer on ``images`` (uint8), class-conditional on ``labels`` when ``classes`` are given; ``settings``
    change the run's ``Config``."""
    from imagedata.batches import DeviceBatches
    from sampling.model import build_diffusion
    from settings.config import Config
    from settings.record import RunRecord
    from trainer import Trainer

    config = Config(image_size=images.shape[-1], time_steps=20, unet_dim=8, dim_mults=(1, 2), num_res_blocks=1,
                    grad_accum=1, batch_size=16, train_steps=steps, learning_rate=5e-3, save_and_sample_every=10**6,
                    log_every=10**6, self_condition=False, precision="fp32", save_folder=str(folder),
                    class_conditional=bool(classes), **settings)
    torch.manual_seed(0)
    batches = DeviceBatches(images, 16, device="cpu", labels=labels if classes else None)
    trainer = Trainer(build_diffusion(config, classes), batches, config=config, device="cpu",
                      run=RunRecord(classes=classes))
    trainer.train()
    return trainer.sampler


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_page(load_path: Path, save: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """``python main.py --serve`` on a free port; returns the process and the page's address once it answers."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "main.py", "--load_path", str(load_path), "--serve", "--port",
                                str(port), "--save_folder", str(save), "--wandb", "disabled", *flags],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line)
        if line.startswith("page: http"):
            threading.Thread(target=process.stdout.read, daemon=True).start()  # keep the pipe drained
            return process, f"http://127.0.0.1:{port}/"
    process.kill()
    raise AssertionError("the page did not start:\n" + "".join(lines[-30:]))
