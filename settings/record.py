"""What a run is, beyond its settings: ``RunRecord``, which a checkpoint keeps as ``"run"``.

The record says where the run trained (device, processes, effective batch size), which images it trained on
(the fingerprint of their decoded pixels, and the folder of their FID statistics, so that ``--evaluate`` finds
them without the images) and, for a class-conditional model, its classes: their names by label, how many images
each has and each one's fingerprint. The classes live here and nowhere else; the model's class count, its grids
and its FID all read them from the record.

A run with its images builds the record from them (``RunRecord.of_run``); a run from a checkpoint alone
(``--sample``, ``--evaluate``) keeps the checkpoint's record of its data.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from runtime.errors import UserError


@dataclass(frozen=True)
class RunRecord:
    device: str = ""
    world_size: int = 1
    effective_batch_size: int = 0
    data_key: str | None = None  # the fingerprint of the decoded training images (``ImageSet.pixels_key``)
    fid_cache_dir: str | None = None  # where the FID statistics of those images are cached
    classes: tuple[str, ...] = ()  # a class-conditional model's class names, by label
    class_sizes: tuple[int, ...] = ()  # images of each class
    class_data_keys: dict[str, str] = field(default_factory=dict)  # each class's own fingerprint, by name
    data: dict = field(default_factory=dict)  # what the data was (``imagedata.dataset.TrainingData.description``)

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "class_sizes", tuple(self.class_sizes))
        if self.class_sizes and len(self.class_sizes) != len(self.classes):
            raise ValueError(f"{len(self.classes)} classes but {len(self.class_sizes)} class sizes")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        """Plain values, as a checkpoint and ``config.json`` keep them; what an unconditional run or one without
        data does not have is left out."""
        out = {"device": self.device, "world_size": self.world_size, "effective_batch_size": self.effective_batch_size}
        out.update({k: v for k, v in (("data_key", self.data_key), ("fid_cache_dir", self.fid_cache_dir)) if v})
        if self.classes:
            out.update(classes=list(self.classes), class_sizes=list(self.class_sizes),
                       class_data_keys=dict(self.class_data_keys))
        if self.data:
            out["data"] = dict(self.data)
        return out

    @classmethod
    def from_dict(cls, saved: dict | None) -> RunRecord:
        """The record a checkpoint holds (any keys it does not know are left out; a missing one takes its default)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (saved or {}).items() if k in known and v is not None})

    @classmethod
    def of_run(cls, config, *, device, world_size: int, data=None, saved: RunRecord | None = None,
               fid_cache_dir: str | None = None) -> RunRecord:
        """The record of this run: ``data`` (``imagedata.dataset.TrainingData``) when the command reads the images,
        else the checkpoint's record of them (``saved``). A class-conditional model keeps the classes it was trained
        on: a resumed run must see the same ones."""
        saved = saved or cls()
        data_fields = dict(data_key=saved.data_key, fid_cache_dir=saved.fid_cache_dir,
                           class_sizes=saved.class_sizes, class_data_keys=saved.class_data_keys, data=saved.data)
        classes: tuple[str, ...] = ()
        if config.class_conditional:
            found = data.classes if data is not None else ()
            if config.load_path and not saved.classes:
                raise UserError(f"{config.load_path} records no class names, so it cannot be a class-conditional "
                                f"model; load a checkpoint that --class_conditional training wrote")
            if saved.classes and found and saved.classes != found:
                raise UserError(f"{config.load_path} was trained on the classes {', '.join(saved.classes)}, and "
                                f"--data_path {config.data_path} holds {', '.join(found)}; pass the data it was "
                                f"trained on")
            classes = saved.classes or found
            if data is not None:
                data_fields["class_sizes"] = data.class_sizes
        if data is not None:
            data_fields["data"] = data.description(config)
            if config.load_path and config.trains:
                check_same_data(config, saved, data_fields["data"])
        if data is not None and data.image_set is not None:
            data_fields.update(data_key=data.image_set.pixels_key, fid_cache_dir=fid_cache_dir)
            data_fields["class_data_keys"] = data.image_set.class_keys() if classes else {}
        if not classes:
            data_fields.update(class_sizes=(), class_data_keys={})
        return cls(device=str(device), world_size=world_size, classes=classes,
                   effective_batch_size=config.batch_size * config.grad_accum * world_size, **data_fields)


def check_same_data(config, saved: RunRecord, now: dict) -> None:
    """A resumed run must read the images its checkpoint was trained on (``now``: their description): refuse, saying
    how they differ, when the number of images or the fingerprint of their pixels is another."""
    was = dict(saved.data)
    if saved.data_key and "key" not in was:  # checkpoints of earlier versions record the fingerprint only
        was["key"] = saved.data_key
    differ = [k for k in ("images", "key") if k in was and k in now and was[k] != now[k]]
    if not differ:
        return
    if "images" in differ:
        how = f"{was['images']:,} images, and --data_path {config.data_path} now gives {now['images']:,}"
    else:
        how = (f"{now['images']:,} images whose pixels differ from those it was trained on (fingerprint {was['key']}, "
               f"now {now['key']})")
    raise UserError(f"{config.load_path} was trained on {how}; resume it with the data it was trained on, or start "
                    f"a new run in another --save_folder")
