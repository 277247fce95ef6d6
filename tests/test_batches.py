"""Batch serving: range and shape, epochs, reshuffles, flips, exact resume, distributed shards, streaming."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from imagedata import dataset
from imagedata.batches import DataWarning, DeviceBatches, StreamingBatches, default_num_workers, epoch_order
from runtime.errors import UserError

S = 8


def id_images(n: int) -> torch.Tensor:
    """uint8 [n, 3, S, S]: channel 0 holds the image's id; channel 1 is 0 on the left half, 255 on the right."""
    images = torch.zeros(n, 3, S, S, dtype=torch.uint8)
    images[:, 0] = torch.arange(n, dtype=torch.uint8)[:, None, None]
    images[:, 1, :, S // 2:] = 255
    return images


def ids(x: torch.Tensor) -> list[int]:
    return ((x[:, 0, 0, 0] + 1) * 127.5).round().long().tolist()


def flipped(x: torch.Tensor) -> list[bool]:
    return (x[:, 1, 0, 0] > 0).tolist()  # the right half (255 -> +1) is now on the left


def take(batches, n: int) -> list[torch.Tensor]:
    """The images of the next ``n`` batches (unlabelled: their labels are None)."""
    served = [next(batches) for _ in range(n)]
    assert all(batch.labels is None for batch in served)
    return [batch.images for batch in served]


def test_batches_are_float_in_model_range_on_the_device():
    batches = DeviceBatches(id_images(10), 4, device="cpu")
    x, labels = next(batches)
    assert labels is None
    assert x.shape == (4, 3, S, S) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert x.min() == -1 and x.max() == 1
    assert len(batches) == 2 and batches.epoch == 0


def test_each_epoch_serves_every_image_once_and_drops_the_last_partial_batch():
    batches = DeviceBatches(id_images(20), 5, device="cpu", flip=False)
    assert len(batches) == 4
    for epoch in range(3):
        seen = sum((ids(x) for x in take(batches, 4)), [])
        assert sorted(seen) == list(range(20)) and batches.epoch == epoch
    assert len(DeviceBatches(id_images(22), 5, device="cpu")) == 4


def test_every_epoch_is_reshuffled():
    batches = DeviceBatches(id_images(20), 20, device="cpu", flip=False)
    orders = [ids(next(batches).images) for _ in range(3)]
    assert orders[0] != orders[1] != orders[2] and sorted(orders[0]) == sorted(orders[1])


def test_flips_happen_exactly_and_can_be_turned_off():
    images = id_images(16)
    on = torch.cat(take(DeviceBatches(images, 8, device="cpu"), 6))
    flags = flipped(on)
    assert 0 < sum(flags) < len(flags)
    expected = images[ids(on)].float() / 127.5 - 1
    expected[flags] = expected[flags].flip(3)
    assert torch.equal(on, expected)
    off = torch.cat(take(DeviceBatches(images, 8, device="cpu", flip=False), 6))
    assert not any(flipped(off))


def test_seed_decides_the_sequence():
    a = torch.cat(take(DeviceBatches(id_images(12), 4, device="cpu", seed=1), 5))
    b = torch.cat(take(DeviceBatches(id_images(12), 4, device="cpu", seed=1), 5))
    c = torch.cat(take(DeviceBatches(id_images(12), 4, device="cpu", seed=2), 5))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_resume_from_state_dict_is_exact():
    images = id_images(20)
    batches = DeviceBatches(images, 3, device="cpu", seed=7)  # 6 batches per epoch: crosses an epoch
    take(batches, 7)
    state = json.loads(json.dumps(batches.state_dict()))  # plain types only
    assert state["epoch"] == 1 and state["position"] == 1
    expected = take(batches, 5)
    resumed = DeviceBatches(images, 3, device="cpu", seed=7)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(take(resumed, 5), expected))


def test_resume_with_other_settings_warns():
    batches = DeviceBatches(id_images(20), 4, device="cpu")
    state = {**batches.state_dict(), "batch_size": 5}
    with pytest.warns(DataWarning, match="made with other batch_size"):
        batches.load_state_dict(state)


@pytest.mark.parametrize("n, world_size", [(20, 3), (21, 3), (8, 2)])
def test_distributed_shards_are_disjoint_and_cover_the_data(n, world_size):
    for epoch in range(2):
        shards = [set(epoch_order(n, seed=0, epoch=epoch, rank=r, world_size=world_size)[0].tolist())
                  for r in range(world_size)]
        assert set().union(*shards) == set(range(n)) and sum(map(len, shards)) == n
    served = []
    for rank in range(world_size):
        batches = DeviceBatches(id_images(n), 1, device="cpu", rank=rank, world_size=world_size)
        served.append(sum((ids(x) for x in take(batches, len(batches))), []))
    assert sorted(sum(served, [])) == list(range(n))
    assert all(not set(a) & set(b) for i, a in enumerate(served) for b in served[i + 1:])


def test_rank_and_images_are_checked():
    with pytest.raises(ValueError, match="rank 3 is not in"):
        DeviceBatches(id_images(8), 2, device="cpu", rank=3, world_size=3)
    with pytest.raises(ValueError, match="uint8"):
        DeviceBatches(id_images(8).float(), 2, device="cpu")
    with pytest.raises(ValueError, match=r"with C 1 or 3"):
        DeviceBatches(id_images(8)[:, :2].contiguous(), 2, device="cpu")


@pytest.mark.parametrize("world_size", [1, 2])
def test_fewer_images_than_a_batch_still_make_full_batches(tmp_path, world_size):
    """3 images, batches of 5: each epoch shows every image ``repeats`` times (the same count on every rank), the
    batches are full, and the files serve what the decoded tensor serves."""
    files = write_id_pngs(tmp_path, 3)
    for rank in range(world_size):
        settings = dict(device="cpu", flip=False, rank=rank, world_size=world_size, seed=1)
        cached = DeviceBatches(id_images(3), 5, **settings)
        streamed = StreamingBatches(files, S, 5, num_workers=0, **settings)
        assert cached.repeats == streamed.repeats == (2 if world_size == 1 else 4)
        served = [ids(x) for x in take(cached, 4)]
        assert served == [ids(x) for x in take(streamed, 4)]
        assert all(len(batch) == 5 for batch in served) and {i for batch in served for i in batch} == {0, 1, 2}


def test_worker_count_is_bounded():
    assert 0 <= default_num_workers() <= 8


def write_id_pngs(root, n: int):
    """<root>/cat/00.png ... as files whose decoded pixels equal id_images(n)."""
    folder = root / "cat"
    folder.mkdir(parents=True)
    for i, image in enumerate(id_images(n)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:02d}.png")
    return sorted(folder.iterdir())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_streaming_serves_the_same_batches_as_the_cache(tmp_path, num_workers):
    files = write_id_pngs(tmp_path, 10)
    image_set = dataset.load_images(tmp_path, "cat", S, progress=False)
    assert torch.equal(image_set.images, id_images(10))
    cached = DeviceBatches(image_set.images, 4, device="cpu", seed=3)
    streamed = StreamingBatches(files, S, 4, device="cpu", seed=3, num_workers=num_workers)
    for a, b in zip(take(cached, 5), take(streamed, 5)):
        assert torch.equal(a, b)
    assert streamed.epoch == cached.epoch == 2 and len(streamed) == 2


def test_streaming_resumes_exactly(tmp_path):
    files = write_id_pngs(tmp_path, 9)
    streamed = StreamingBatches(files, S, 2, device="cpu", num_workers=0)
    take(streamed, 5)
    state = streamed.state_dict()
    expected = take(streamed, 4)
    resumed = StreamingBatches(files, S, 2, device="cpu", num_workers=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(take(resumed, 4), expected))


def test_streaming_replaces_unreadable_files_and_warns_once(tmp_path):
    files = write_id_pngs(tmp_path, 6)
    files[2].write_bytes(b"broken")
    streamed = StreamingBatches(files, S, 6, device="cpu", num_workers=0, flip=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = take(streamed, 3)
    assert all(x.shape == (6, 3, S, S) for x in batches) and streamed.skipped == 3
    assert all(2 not in ids(x) and 3 in ids(x) for x in batches)
    assert [issubclass(w.category, DataWarning) for w in caught] == [True]


def test_streaming_with_nothing_readable_is_an_error(tmp_path):
    files = write_id_pngs(tmp_path, 3)
    for f in files:
        f.write_bytes(b"broken")
    with pytest.raises(UserError, match="none of the 3 images could be read"):
        next(StreamingBatches(files, S, 2, device="cpu", num_workers=0))


def test_epoch_order_is_deterministic():
    a, fa = epoch_order(50, seed=5, epoch=3)
    b, fb = epoch_order(50, seed=5, epoch=3)
    assert torch.equal(a, b) and torch.equal(fa, fb)
    assert not torch.equal(a, epoch_order(50, seed=5, epoch=4)[0])
    assert np.array_equal(np.sort(a.numpy()), np.arange(50))
