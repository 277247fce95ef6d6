"""What a run records of itself (``settings.record.RunRecord``): the plain dict a checkpoint keeps, read back, and the
record of a run built from its data or from a checkpoint's record."""
import pytest
import torch

from imagedata.dataset import ImageSet, TrainingData
from runtime.errors import UserError
from settings.config import Config
from settings.record import RunRecord

CONDITIONAL = RunRecord(device="cpu", world_size=2, effective_batch_size=128, data_key="a" * 16, fid_cache_dir="/c",
                        classes=("cat", "dog"), class_sizes=(3, 5), class_data_keys={"cat": "b" * 16, "dog": "c" * 16})


def test_a_record_survives_the_checkpoints_plain_dict():
    assert RunRecord.from_dict(CONDITIONAL.to_dict()) == CONDITIONAL
    plain = RunRecord(device="cuda:0", effective_batch_size=64, data_key="d" * 16)
    assert set(plain.to_dict()) == {"device", "world_size", "effective_batch_size", "data_key"}  # no class fields
    assert RunRecord.from_dict(plain.to_dict()) == plain


def test_a_record_reads_what_any_checkpoint_holds():
    """Lists as JSON and torch.load give them, keys it does not know, and nothing at all."""
    saved = {**CONDITIONAL.to_dict(), "classes": ["cat", "dog"], "class_sizes": [3, 5], "something_else": 1}
    assert RunRecord.from_dict(saved) == CONDITIONAL
    assert RunRecord.from_dict(None) == RunRecord() and RunRecord().num_classes == 0
    with pytest.raises(ValueError, match="2 classes but 1 class sizes"):
        RunRecord(classes=("cat", "dog"), class_sizes=(3,))


def images_of(classes: tuple[str, ...]) -> TrainingData:
    images = torch.arange(4 * 3 * 2 * 2, dtype=torch.uint8).reshape(4, 3, 2, 2)
    labels = torch.tensor([0, 0, 1, 1]) if classes else None
    image_set = ImageSet(images, "k" * 16, [], 0, classes=classes, labels=labels)
    return TrainingData(None, image_set, classes, (2, 2) if classes else ())


def test_a_run_with_its_data_records_the_data_and_its_classes():
    config = Config(class_conditional=True, batch_size=4, grad_accum=2)
    data = images_of(("cat", "dog"))
    run = RunRecord.of_run(config, device="cpu", world_size=2, data=data, fid_cache_dir="/stats")
    assert (run.classes, run.class_sizes, run.effective_batch_size) == (("cat", "dog"), (2, 2), 16)
    assert run.data_key == data.image_set.pixels_key and run.fid_cache_dir == "/stats"
    assert run.class_data_keys == data.image_set.class_keys() and len(set(run.class_data_keys.values())) == 2
    plain = RunRecord.of_run(Config(), device="cpu", world_size=1, data=images_of(()))
    assert plain.classes == () and plain.class_data_keys == {} and plain.data_key == data.image_set.pixels_key


def test_a_run_from_a_checkpoint_keeps_its_record_of_the_data_and_its_classes():
    config = Config(class_conditional=True, load_path="model.pt", sample=4)
    run = RunRecord.of_run(config, device="cpu", world_size=1, saved=CONDITIONAL)
    assert (run.classes, run.class_sizes, run.data_key, run.class_data_keys) == \
        (CONDITIONAL.classes, CONDITIONAL.class_sizes, CONDITIONAL.data_key, CONDITIONAL.class_data_keys)
    assert run.world_size == 1 and run.device == "cpu"  # this run's own
    with pytest.raises(UserError, match="trained on the classes cat, dog, and --data_path .* holds bird, cat"):
        RunRecord.of_run(config, device="cpu", world_size=1, data=images_of(("bird", "cat")), saved=CONDITIONAL)
    with pytest.raises(UserError, match="records no class names"):
        RunRecord.of_run(config, device="cpu", world_size=1, saved=RunRecord(data_key="x" * 16))
