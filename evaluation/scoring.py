"""FID of a run: the evaluator its settings and data call for, and where the reference statistics live.

An unconditional model is scored with one ``evaluation.fid.FIDEvaluator`` against all its training images. A
class-conditional model is scored per class and over all classes (``ClassFIDEvaluator``). The statistics are
cached beside the decoded-image cache they are computed from; the run record names that folder, so that a
checkpoint can be scored later without its images (``cached_reference``).
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from evaluation import fid as fid_module
from evaluation.fid import FIDEvaluator, ReferenceStats, WarnsWithoutInception
from runtime.errors import UserError
from settings.record import RunRecord


def statistics_dir(config, image_set) -> Path:
    """Where the FID statistics of ``image_set`` live: beside the decoded-image cache they are computed from."""
    return image_set.cache_path.parent if image_set.cache_path is not None else Path(config.save_folder)


def cached_reference(config, run: RunRecord) -> Path | None:
    """The folder holding the cached FID statistics of the images a checkpoint was trained on, if any does:
    ``--cache_dir``, the folder the checkpoint records, the usual cache folders of ``--data_path``, or the
    save folder."""
    from imagedata.dataset import cache_dir_candidates

    keys = [run.data_key, *run.class_data_keys.values()]
    folders = [config.cache_dir, run.fid_cache_dir, *cache_dir_candidates(config.data_path), config.save_folder]
    found = [fid_module.find_statistics(folders, mode=config.fid_mode, image_size=config.image_size, real_key=key)
             for key in keys if key]
    return found[0] if found and len(found) == len(keys) and len(set(found)) == 1 else None


def build_evaluator(config, device, image_set, run: RunRecord, *, required: bool,
                    extractor: fid_module.FeatureExtractor | None = None):
    """The FID evaluator (for a class-conditional model, one that scores each class and all together), or None
    with a warning when the Inception weights cannot be had and FID is optional. ``extractor`` defaults to
    clean-fid's Inception for ``--fid_mode``; a stand-in network goes in through it.

    Without ``image_set`` the statistics must be cached already (``cached_reference``).
    """
    cache_dir = statistics_dir(config, image_set) if image_set is not None else cached_reference(config, run)
    extractor = extractor or fid_module.FeatureExtractor(mode=config.fid_mode, device=device)

    def scorer(key: str, images):
        def real_batches():
            if images is None:
                raise UserError(f"the FID statistics cached in {cache_dir} cannot be used (the warning above says "
                                f"why); pass --data_path with the training images to compute them again")
            for start in range(0, len(images), 500):
                yield images[start:start + 500]

        return FIDEvaluator(real_key=key, image_size=config.image_size, real_batches=real_batches,
                            mode=config.fid_mode, num_samples=config.fid_samples, device=device,
                            cache_dir=cache_dir, extractor=extractor)

    evaluator = scorer(run.data_key, None if image_set is None else image_set.images)
    if run.classes:
        per_class = {name: scorer(run.class_data_keys[name], None if image_set is None else image_set.of_class(label))
                     for label, name in enumerate(run.classes)}
        evaluator = ClassFIDEvaluator(evaluator, per_class, list(run.class_sizes))
    try:
        evaluator.reference()
    except fid_module.InceptionUnavailable as e:
        if required:
            raise
        warnings.warn(f"FID is skipped and training goes on: {e}")
        return None
    return evaluator


def class_counts(total: int, sizes: list[int]) -> list[int]:
    """``total`` split over classes in proportion to their ``sizes`` (largest remainders), each given at least 2
    (the fewest FID can score)."""
    shares = [total * size / sum(sizes) for size in sizes]
    counts = [max(2, int(share)) for share in shares]
    by_remainder = sorted(range(len(sizes)), key=lambda i: shares[i] - int(shares[i]), reverse=True)
    for i in by_remainder[: max(0, total - sum(counts))]:
        counts[i] += 1
    return counts


class ClassFIDEvaluator(WarnsWithoutInception):
    """FID and KID of a class-conditional model: of each class's samples against that class's own reference
    statistics (``per_class``, in label order), and of all samples together against the whole data's
    (``overall``). The ``overall.num_samples`` samples are split over the classes in proportion to ``sizes``, the
    classes' image counts, so that the pooled samples mix the classes as the data does; a class's score is
    therefore over fewer samples, and comparable only with scores over as many (its ``fid_samples/<class>``).
    """

    def __init__(self, overall: FIDEvaluator, per_class: dict[str, FIDEvaluator], sizes: list[int]):
        if len(per_class) != len(sizes):
            raise ValueError(f"{len(per_class)} classes but {len(sizes)} sizes")
        self.overall, self.per_class = overall, per_class
        self.counts = class_counts(overall.num_samples, sizes)

    @property
    def num_samples(self) -> int:
        """The images one evaluation draws, over all classes."""
        return sum(self.counts)

    def reference(self) -> ReferenceStats:
        """Each class's statistics, then all classes' from the classes' features (the same images: Inception runs
        once over each image)."""
        pooled = [evaluator.reference().features for evaluator in self.per_class.values()]
        return self.overall.reference(lambda: np.concatenate(pooled))

    def evaluate(self, sample_fn: Callable[[int, torch.Tensor], torch.Tensor]) -> dict:
        """Scores of samples from ``sample_fn(n, labels)`` (n float images in [0, 1] of the classes ``labels``):
        ``{"fid", "kid", "fid_samples", "seconds"}`` over all classes, and ``fid/<class>``, ``kid/<class>``,
        ``fid_samples/<class>`` for each."""
        start = time.perf_counter()
        self.reference()
        result, pooled = {}, []
        for label, ((name, evaluator), count) in enumerate(zip(self.per_class.items(), self.counts)):
            features = self.overall.sample_features(sample_fn, count, label)
            pooled.append(features)
            result[f"fid/{name}"], result[f"kid/{name}"] = evaluator.score(features)
            result[f"fid_samples/{name}"] = count
        fid, kid = self.overall.score(np.concatenate(pooled))
        return {"fid": fid, "kid": kid, "fid_samples": sum(self.counts), **result,
                "seconds": time.perf_counter() - start}
