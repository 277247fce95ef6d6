"""FID and KID of generated images against the training images, with cached reference statistics.

Generated images (floats in [0, 1], [N, 3, H, W]) are quantized to uint8 exactly as a PNG from
``torchvision.utils.save_image`` would hold them and scored in memory, never on disk. Real images (uint8,
at the training resolution, preprocessed as training sees them) are scored once per (mode, image size,
dataset); their features, mean and covariance are cached in ``fid_ref_{mode}_{image_size}px_{real_key}.npz``.
Features come from clean-fid's Inception for a mode (``clean``, ``legacy_pytorch``, ``legacy_tensorflow``)
after clean-fid's own resize to 299 x 299, so scores equal ``cleanfid.fid.compute_fid`` on PNG folders of
the same images. FID at small N is biased upward (Chong & Forsyth 2020, "Effectively Unbiased FID"): compare
scores only at equal N, which every result carries as ``fid_samples``; KID (Binkowski et al. 2018) is
unbiased and comes with it. docs/fid.md explains the default N = 1000 against the assignment's N = 512.
"""
from __future__ import annotations

import http.client
import json
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evaluation.distances import frechet_distance, kernel_inception_distance, sqrt_psd
from runtime.atomic import atomic_write
from runtime.errors import UserError
from settings.config import FID_MODES as MODES


class InceptionUnavailable(UserError):
    """clean-fid's Inception weights are neither on disk nor downloadable (no internet, or a corrupt file)."""


def quantize_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1], [N, C, H, W] (C = 3, or 1 grey) -> uint8 on the CPU, the values a PNG holds.

    Same arithmetic as ``save_image``: multiply by 255, add 0.5, clamp to [0, 255], truncate. Computed in
    float32 whatever the input precision; NaNs become 0.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3) or not images.is_floating_point():
        raise ValueError(f"expected float images [N, 3 or 1, H, W], got {images.dtype} {tuple(images.shape)}")
    x = torch.nan_to_num(images.detach().to("cpu", torch.float32), nan=0.0)
    return x.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


def weights_location(mode: str) -> tuple[str, str]:
    """Where clean-fid keeps the Inception weights of ``mode`` on disk, and the URL it downloads them from."""
    if mode == "legacy_pytorch":
        from cleanfid.inception_pytorch import FID_WEIGHTS_URL
        return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(FID_WEIGHTS_URL)), FID_WEIGHTS_URL
    from cleanfid.downloads_helper import inception_url
    folder = "./" if platform.system() == "Windows" else "/tmp"  # as cleanfid.features.feature_extractor
    return os.path.join(folder, os.path.basename(inception_url)), inception_url


def _build_inception(mode: str, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """clean-fid's feature network for ``mode``; raises ``InceptionUnavailable`` when its weights cannot be had."""
    from cleanfid.features import build_feature_extractor
    path, url = weights_location(mode)
    existed = os.path.exists(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            return build_feature_extractor(mode, device=device, use_dataparallel=False)
    except (OSError, http.client.HTTPException, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not os.path.exists(path):
            raise  # not about the weights file
        if not existed and os.path.exists(path):
            os.remove(path)  # a partial download of ours; clean-fid would take it for the weights next time
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        if existed:
            raise InceptionUnavailable(f"FID's Inception network weights in {path} could not be loaded ({reason}); "
                                       f"delete that file to download them again, or fetch {url} by hand to that "
                                       f"path, or leave off --fid") from e
        raise InceptionUnavailable(f"FID's Inception network weights could not be downloaded ({reason}); fetch "
                                   f"{url} by hand and save it as {path}, or leave off --fid") from e


class FeatureExtractor:
    """clean-fid's feature network for a mode, built on first use, applied to uint8 images in memory.

    ``model`` stands in for Inception (clean-fid's custom feature extractor convention): a callable taking
    float32 [B, 3, 299, 299] with values in [0, 255] (native size in ``legacy_tensorflow`` mode, whose
    network resizes inside) and returning [B, D] features.
    """

    def __init__(self, *, mode: str = "clean", device: str | torch.device = "cpu", batch_size: int = 100,
                 model: Callable[[torch.Tensor], torch.Tensor] | None = None, num_threads: int | None = None):
        if mode not in MODES:
            raise UserError(f"--fid_mode {mode!r} is not one of {', '.join(MODES)}; pick one of those")
        self.mode, self.device, self.batch_size = mode, torch.device(device), batch_size
        self.name = "inception_v3" if model is None else f"custom:{type(model).__name__}"
        self.num_threads = num_threads or min(8, os.cpu_count() or 1)
        self._model, self._resize = model, None

    def load(self) -> None:
        """Build the resizer and the network now (downloading clean-fid's weights if needed)."""
        if self._resize is None:
            from cleanfid.resize import build_resizer
            with warnings.catch_warnings():  # clean-fid's PyTorch resizer silences all warnings process-wide
                self._resize = build_resizer(self.mode)
        if self._model is None:
            self._model = _build_inception(self.mode, self.device)
        elif isinstance(self._model, torch.nn.Module):
            self._model.to(self.device).eval()

    def _preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> float32 [B, 3, 299, 299] in [0, 255], as clean-fid's ``ResizeDataset`` does."""
        arrays = list(images.permute(0, 2, 3, 1).numpy())  # [H, W, 3] each
        with ThreadPoolExecutor(self.num_threads) as pool:  # PIL resizes outside the GIL
            resized = list(pool.map(self._resize, arrays))
        tensors = [torch.from_numpy(np.ascontiguousarray(r.transpose(2, 0, 1))) for r in resized]
        # ToTensor() scales uint8 to [0, 1] and clean-fid multiplies by 255 again; float32 passes through
        return torch.stack([t.float().div(255) * 255 if t.dtype == torch.uint8 else t for t in tensors])

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """Features of uint8 images [N, 3, H, W] (CPU): float64 [N, D], computed in batches on ``device``. Grey
        images [N, 1, H, W] go in as their channel three times, the RGB image of the same grey."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 images [N, 3 or 1, H, W], got {images.dtype} {tuple(images.shape)}")
        images = images.expand(-1, 3, -1, -1)
        self.load()
        feats = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                batch = self._preprocess(images[start:start + self.batch_size].cpu()).to(self.device)
                if self.device.type == "cpu":  # oneDNN convolves channels-last images faster on a CPU
                    batch = batch.contiguous(memory_format=torch.channels_last)
                feats.append(self._model(batch).detach().to("cpu", torch.float64).reshape(len(batch), -1))
        return torch.cat(feats).numpy() if feats else np.zeros((0, 0))


def statistics_file(mode: str, image_size: int, real_key: str) -> str:
    """The name of the cached reference statistics of the images ``real_key`` names, at one size and mode."""
    return f"fid_ref_{mode}_{image_size}px_{real_key}.npz"


def find_statistics(folders: Iterable[str | os.PathLike | None], *, mode: str, image_size: int,
                    real_key: str) -> Path | None:
    """The first of ``folders`` (None entries skipped) that holds cached reference statistics of those images."""
    name = statistics_file(mode, image_size, real_key)
    return next((Path(f) for f in folders if f and (Path(f) / name).is_file()), None)


class WarnsWithoutInception:
    """``evaluate_or_warn``: ``evaluate``, except that a missing Inception warns once and gives None from then on
    (training goes on)."""

    _unavailable = False

    def evaluate_or_warn(self, sample_fn) -> dict | None:
        if self._unavailable:
            return None
        try:
            return self.evaluate(sample_fn)
        except InceptionUnavailable as e:
            self._unavailable = True
            warnings.warn(f"FID is skipped and training goes on: {e}", RuntimeWarning, stacklevel=2)
            return None


@dataclass(frozen=True)
class ReferenceStats:
    """The real images' features [M, D] (float32), their mean [D] and covariance [D, D] (float64)."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray


class FIDEvaluator(WarnsWithoutInception):
    """Scores a sampler against the real images: FID and KID over ``num_samples`` generated images.

    ``real_batches()`` yields the real images as uint8 [B, 3, image_size, image_size]; ``real_key`` names
    that data (a fingerprint of the files and preprocessing) in the cache file's name, so other data or
    another size gets its own statistics. Only ``reference()`` touches the file system.
    """

    def __init__(self, *, real_key: str, image_size: int, real_batches: Callable[[], Iterable[torch.Tensor]],
                 mode: str = "clean", num_samples: int = 1000, device: str | torch.device = "cpu",
                 cache_dir: str | Path, extractor: FeatureExtractor | None = None, batch_size: int = 250):
        if num_samples < 2:
            raise UserError(f"--fid_samples {num_samples} is too small; FID needs at least 2 (1000 is the default)")
        if not real_key or any(not (c.isalnum() or c in "-_.") for c in real_key):
            raise ValueError(f"real_key {real_key!r} must be letters, digits, '-', '_' or '.'")
        self.extractor = extractor or FeatureExtractor(mode=mode, device=device)
        if self.extractor.mode != mode:
            raise ValueError(f"extractor mode {self.extractor.mode!r} differs from mode {mode!r}")
        self.real_key, self.image_size, self.real_batches, self.mode = real_key, image_size, real_batches, mode
        self.num_samples, self.device, self.batch_size = num_samples, torch.device(device), batch_size
        self.cache_path = Path(cache_dir) / statistics_file(mode, image_size, real_key)
        self._reference, self._sqrt_sigma = None, None  # set by reference()

    def _meta(self) -> str:
        return json.dumps({"version": 1, "mode": self.mode, "image_size": self.image_size,
                           "real_key": self.real_key, "extractor": self.extractor.name}, sort_keys=True)

    def _check(self, images: torch.Tensor, count: int | None, what: str) -> None:
        """Real batches (``count`` None) must be uint8 [B, C, S, S]; samples float [count, C, S, S] (C 3, or 1)."""
        dtype_ok = images.dtype == torch.uint8 if count is None else images.is_floating_point()
        if not dtype_ok or images.shape[1] not in (1, 3) or images.shape[2:] != (self.image_size, self.image_size) or \
                (count is not None and len(images) != count):
            kind = "uint8" if count is None else "float"
            raise ValueError(f"{what} gave {images.dtype} {tuple(images.shape)}; expected {kind} "
                             f"[{count or 'B'}, 3, {self.image_size}, {self.image_size}]")

    def _load_cache(self) -> ReferenceStats | None:
        """The cached statistics, or None (with a warning when a file exists but is unusable)."""
        if not self.cache_path.exists():
            return None
        try:
            with np.load(self.cache_path, allow_pickle=False) as f:
                meta, stats = str(f["meta"]), ReferenceStats(f["mu"], f["sigma"], f["features"])
            if meta != self._meta():
                raise ValueError(f"it was made for {meta}")
            if stats.sigma.shape != stats.mu.shape * 2 or stats.features.shape[1:] != stats.mu.shape:
                raise ValueError("its arrays have inconsistent shapes")
            return stats
        except Exception as e:  # truncated, not an npz, missing arrays, other settings: all mean rebuild
            warnings.warn(f"FID reference cache {self.cache_path} is unusable ({type(e).__name__}: {e}); "
                          f"rebuilding it", RuntimeWarning, stacklevel=3)
            return None

    def _save_cache(self, stats: ReferenceStats) -> None:
        """Write the statistics atomically; warn and go on if the folder is read-only."""
        try:
            atomic_write(self.cache_path, lambda f: np.savez(f, meta=np.array(self._meta()), mu=stats.mu,
                                                             sigma=stats.sigma, features=stats.features))
        except OSError as e:
            warnings.warn(f"could not cache FID reference statistics in {self.cache_path} ({e}); they will be "
                          f"recomputed next run (pass a writable --cache_dir)", RuntimeWarning, stacklevel=3)

    def reference(self, features: Callable[[], np.ndarray] | None = None) -> ReferenceStats:
        """The real images' statistics: from memory, else from the cache, else computed and cached.

        ``features()``, if given, supplies the real images' features in place of ``real_batches`` (features
        already computed for the same images). Also loads the feature network, so that a missing Inception
        raises ``InceptionUnavailable`` here.
        """
        self.extractor.load()
        if self._reference is None:
            stats = self._load_cache()
            if stats is None:
                real = (features or self._real_features)().astype(np.float32)
                if len(real) < 2:
                    raise ValueError(f"FID needs at least 2 real images, real_batches gave {len(real)}")
                stats = ReferenceStats(real.mean(0, dtype=np.float64), np.cov(real.astype(np.float64), rowvar=False),
                                       real)
                self._save_cache(stats)
            self._reference, self._sqrt_sigma = stats, sqrt_psd(stats.sigma)
        return self._reference

    def _real_features(self) -> np.ndarray:
        from tqdm.auto import tqdm

        feats = []
        with tqdm(desc="FID reference statistics (once; cached for later runs)", unit="img", dynamic_ncols=True,
                  leave=False) as bar:
            for batch in self.real_batches():
                self._check(batch, None, "real_batches")
                feats.append(self.extractor(batch))
                bar.update(len(batch))
        return np.concatenate(feats or [np.zeros((0, 0))])

    def evaluate(self, sample_fn: Callable[[int, torch.Tensor | None], torch.Tensor]) -> dict:
        """FID and KID of ``num_samples`` images from ``sample_fn(n, None)`` (n float images in [0, 1], of no
        particular class).

        Returns ``{"fid", "kid", "fid_samples", "seconds"}``; ``seconds`` includes the reference statistics
        when this call had to compute them.
        """
        start = time.perf_counter()
        self.reference()
        fid, kid = self.score(self.sample_features(sample_fn))
        return {"fid": fid, "kid": kid, "fid_samples": self.num_samples, "seconds": time.perf_counter() - start}

    def sample_features(self, sample_fn: Callable[[int, torch.Tensor | None], torch.Tensor], count: int | None = None,
                        label: int | None = None) -> np.ndarray:
        """Features [count, D] of ``count`` (default ``num_samples``) images from ``sample_fn(n, labels)``: of the
        class ``label`` (labels all ``label``), or of none (labels None).

        Draws them in chunks of ``batch_size``, quantizes each chunk like a PNG and extracts its features
        in memory.
        """
        count = self.num_samples if count is None else count
        feats = []
        from tqdm.auto import tqdm

        with torch.no_grad(), tqdm(total=count, desc="FID: sampling and scoring", unit="img",
                                   dynamic_ncols=True, leave=False) as bar:
            for first in range(0, count, self.batch_size):
                n = min(self.batch_size, count - first)
                images = sample_fn(n, None if label is None else torch.full((n,), label, dtype=torch.long))
                self._check(images, n, "sample_fn")
                feats.append(self.extractor(quantize_uint8(images)))
                bar.update(n)
        return np.concatenate(feats)

    def score(self, gen: np.ndarray) -> tuple[float, float]:
        """FID and KID of generated features [N, D] against the reference statistics."""
        ref = self.reference()
        fid = frechet_distance(gen.mean(0), np.cov(gen, rowvar=False), ref.mu, ref.sigma, sqrt_sigma2=self._sqrt_sigma)
        return fid, kernel_inception_distance(gen, ref.features, device=self.device)
