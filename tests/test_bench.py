"""The benchmark's own parts: the reference solutions' pipeline it measures against, one measured row in its
own process, a clear exit when the data is missing, and the FID comparison under three protocols.
Timings themselves are never asserted here."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from errors import UserError
from helpers import TinyFeatures, make_image_folder, tiny_diffusion, tiny_run
from trainer import choose_precision

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "bench.py"
sys.path.insert(0, str(ROOT / "bench"))

from reference_way import ReferenceFolder, ReferenceStep, reference_loader  # noqa: E402


def test_reference_folder_decodes_every_image_into_the_normalised_range(tmp_path):
    folder = make_image_folder(tmp_path, count=5, size=40) / "cat"
    data = ReferenceFolder(folder, 16)
    assert len(data) == 5
    image = data[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert -1.0 <= image.min() < image.max() <= 1.0


def test_reference_step_trains_the_same_diffusion_and_reads_the_loss_every_step(tmp_path):
    folder = make_image_folder(tmp_path, count=8, size=24) / "cat"
    batches = reference_loader(folder, 16, batch_size=4, workers=0, device=torch.device("cpu"))
    diffusion = tiny_diffusion(size=16, T=5)
    before = [p.detach().clone() for p in diffusion.parameters()]
    step = ReferenceStep(diffusion, batches, learning_rate=1e-3, device=torch.device("cpu"))
    for _ in range(3):  # more steps than one epoch of 8 images holds: the loader starts the next epoch
        step()
    assert len(step.losses) == 3 and all(isinstance(x, float) and x > 0 for x in step.losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, diffusion.parameters()))


def _row(spec: dict) -> dict:
    out = subprocess.run([sys.executable, str(BENCH), "--row", json.dumps(spec)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


TINY = {"image_size": 16, "batch_size": 4, "time_steps": 5, "unet_dim": 8, "learning_rate": 1e-3, "device": "cpu"}


def test_a_training_row_reports_throughput_and_peak_memory(tmp_path):
    row = _row({"kind": "train", "pipeline": "synthetic", "steps": 2, "warmup": 1, "workers": 0, **TINY})
    assert row["precision"] == choose_precision("auto", torch.device("cpu"))  # the package's own choice
    assert row["seconds"] > 0 and row["images_per_s"] == row["steps_per_s"] * 4
    assert row["peak_rss_mib"] > 50  # torch alone takes more than this


def test_a_training_row_can_time_the_self_conditioned_network():
    spec = {"kind": "train", "pipeline": "synthetic", "steps": 1, "warmup": 1, "workers": 0, **TINY}
    plain, self_cond = _row(spec), _row({**spec, "self_condition": True})
    # the same network but for the input convolution, which also reads the 3 channels of the x_0 estimate
    assert self_cond["parameters"] - plain["parameters"] == 3 * TINY["unet_dim"] * 3 * 3


def test_a_training_row_through_the_package_pipeline_uses_the_image_cache(tmp_path):
    data = make_image_folder(tmp_path, count=8, size=24) / "cat"
    cache = tmp_path / "cache"
    row = _row({"kind": "train", "pipeline": "package", "data": str(data.parent), "cache_dir": str(cache),
                "steps": 2, "warmup": 1, "workers": 0, **TINY})
    assert row["steps_per_s"] > 0
    assert list(cache.glob("cat_16px_*.npy")), "the package pipeline decodes once into its cache"


def test_a_sampling_row_times_the_asked_sampler():
    row = _row({"kind": "sample", "sampler": "ddim", "steps": 3, "batch": 2, **TINY})
    assert row["seconds"] > 0 and abs(row["images_per_s"] - 2 / row["seconds"]) < 1e-9
    assert row["precision"] == choose_precision("auto", torch.device("cpu"))  # the trainer samples this way


def test_missing_data_is_one_line_and_exit_2(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH), "--data_path", str(tmp_path / "nowhere"), "--quick"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "--data_path" in out.stderr


def test_fid_protocols_score_one_sample_set_three_ways(tmp_path, monkeypatch):
    import fid
    import fid_protocols

    monkeypatch.setattr(fid, "_build_inception", lambda mode, device: TinyFeatures().eval())
    data, cache, save = tiny_run(tmp_path, 2, "--fid", "--fid_samples", "4", "--network_output", "v")
    [trainer_stats] = cache.glob("fid_ref_clean_16px_*.npz")
    out = tmp_path / "protocols.json"
    assert fid_protocols.main(["--load_path", str(save / "model.pt"), "--data_path", str(data), "--samples", "3", "5",
                               "--batch_size", "2", "--cache_dir", str(cache), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["samples"], r["step"], r["training_size"], r["stored_size"]) for r in rows] == [(3, 2, 16, 24), (5, 2, 16, 24)]
    for r in rows:
        fids = [r["fid_package"], r["fid_handout"], r["fid_stored"]]
        assert all(f > 0 for f in fids) and len(set(fids)) == 3
    # the package's statistics are the trainer's own cache file; the other two sets get one each
    assert sorted(p.name for p in cache.glob("fid_ref_clean_*.npz") if p != trainer_stats) == sorted(
        [next(cache.glob("fid_ref_clean_16px_handout-*.npz")).name, next(cache.glob("fid_ref_clean_24px_*.npz")).name])


def test_fid_protocols_score_only_the_real_sets_asked_for(tmp_path, monkeypatch):
    import fid
    import fid_protocols

    monkeypatch.setattr(fid, "_build_inception", lambda mode, device: TinyFeatures().eval())
    data, cache, save = tiny_run(tmp_path, 2, "--fid", "--fid_samples", "4")
    out = tmp_path / "protocols.json"
    assert fid_protocols.main(["--load_path", str(save / "model.pt"), "--data_path", str(data), "--samples", "3",
                               "--protocols", "handout", "--batch_size", "2", "--cache_dir", str(cache),
                               "--json", str(out)]) == 0
    [row] = json.loads(out.read_text())["rows"]
    assert row["fid_handout"] > 0 and not {"fid_package", "fid_stored"} & set(row)
    # no statistics of the stored files were computed: only the trainer's and the handout set's exist
    assert not list(cache.glob("fid_ref_clean_24px_*.npz"))
    assert list(cache.glob("fid_ref_clean_16px_handout-*.npz"))


def test_handout_images_are_resized_by_pil_and_re_encoded_in_their_own_format(tmp_path):
    import fid_protocols

    data = make_image_folder(tmp_path, count=2, size=24)
    png = Image.open(data / "cat" / "img_000.jpg").convert("RGB")
    png.save(data / "cat" / "img_000.png")
    (data / "cat" / "img_000.jpg").unlink()
    args = fid_protocols.parse_args(["--load_path", "x.pt", "--data_path", str(data)])
    images = fid_protocols.handout_images(args, 16)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.uint8
    files = sorted((data / "cat").iterdir())
    plain = [torch.from_numpy(np.array(Image.open(f).resize((16, 16)).convert("RGB"))).permute(2, 0, 1) for f in files]
    by_name = dict(zip([f.suffix for f in files], range(len(files))))
    assert torch.equal(images[by_name[".png"]], plain[by_name[".png"]])  # PNG: lossless round trip
    assert not torch.equal(images[by_name[".jpg"]], plain[by_name[".jpg"]])  # JPEG: compressed once more


def test_fid_protocols_rebuild_a_checkpoint_from_before_the_defaults_changed_as_it_was_trained(tmp_path):
    """A checkpoint that records neither self_condition, grad_accum nor weight_decay was trained without them,
    whatever main.py's defaults are now; one that records them keeps its values."""
    import fid_protocols

    old = {"architecture": {"image_size": 16, "unet_dim": 8}, "config": {"unet_dim": 8, "seed": 3}}
    args = fid_protocols.checkpoint_args(old)
    assert (args.self_condition, args.grad_accum, args.weight_decay) == (False, 1, 0.0)
    assert (args.unet_dim, args.image_size, args.seed) == (8, 16, 3)
    new = {"architecture": {"image_size": 16, "self_condition": True},
           "config": {"grad_accum": 2, "weight_decay": 0.1}}
    args = fid_protocols.checkpoint_args(new)
    assert (args.self_condition, args.grad_accum, args.weight_decay) == (True, 2, 0.1)


def test_fid_protocols_need_one_readable_stored_size(tmp_path):
    import fid_protocols

    data = make_image_folder(tmp_path, count=3, size=24)
    assert fid_protocols.native_size(str(data), "cat") == 24
    Image.new("RGB", (30, 30)).save(data / "cat" / "odd.jpg")
    with pytest.raises(UserError, match=r"sizes \[\(24, 24\), \(30, 30\)\]; this comparison needs one square size"):
        fid_protocols.native_size(str(data), "cat")
    (data / "cat" / "odd.jpg").write_bytes(b"not an image")
    with pytest.raises(UserError, match=r"odd.jpg cannot be read .*; remove it or pass another --data_path"):
        fid_protocols.native_size(str(data), "cat")


def test_inception_layout_bench_times_both_layouts_on_the_same_features(tmp_path, capsys):
    import bench_inception
    out = tmp_path / "inception.json"
    result = bench_inception.main(["--images", "6", "--image_size", "12", "--batch_size", "4", "--repeats", "2",
                                   "--json", str(out)], model=TinyFeatures())
    assert json.loads(out.read_text()) == result
    assert list(result["images_per_s"]) == ["channels_last (package)", "contiguous NCHW"]
    assert all(len(t) == 2 for t in result["seconds"].values())
    assert result["max_abs_feature_difference"] < 1e-4  # same network, same images: only rounding differs
    assert "x as fast" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_inception.main(["--repeats", "0"], model=TinyFeatures())


def test_inception_bench_bf16_way_runs_the_same_network_in_lower_precision(capsys):
    import bench_inception
    result = bench_inception.main(["--images", "6", "--image_size", "12", "--batch_size", "4", "--repeats", "1",
                                   "--bf16"], model=TinyFeatures())
    assert list(result["images_per_s"]) == ["channels_last (package)", "contiguous NCHW", "channels_last, bf16 autocast"]
    low = result["bf16"]
    assert low["speedup_over_package"] > 0
    # bf16 keeps about 3 significant digits: the features move, but stay close
    assert 1e-5 < low["relative_feature_difference"] < 0.05
    assert "bf16 autocast is" in capsys.readouterr().out


def test_weight_norms_compare_each_kernel_with_the_runs_own_initial_weights(tmp_path, capsys):
    import weight_norms

    _, _, save = tiny_run(tmp_path, 2)
    initial, trained, step, _ = weight_norms.initial_and_trained(str(save / "model.pt"))
    assert step == 2 and any(not torch.equal(a, b) for a, b in zip(initial.parameters(), trained.parameters()))
    # a checkpoint whose raw weights are the run's initial kernels doubled (biases and norms kept) reads 2 everywhere
    ckpt = torch.load(save / "model.pt", map_location="cpu", weights_only=False)
    ckpt["model"] = {k: v * 2 if v.dim() >= 2 else v for k, v in initial.state_dict().items()}
    torch.save(ckpt, tmp_path / "doubled.pt")
    out = tmp_path / "norms.json"
    assert weight_norms.main([str(save / "model.pt"), str(tmp_path / "doubled.pt"), "--json", str(out)]) == 0
    trained_rows, doubled_rows = (result["rows"] for result in json.loads(out.read_text()))
    roles = {r["role"] for r in doubled_rows}
    assert {"residual block, first convolution (GroupNorm follows)", "attention, qkv projection", "time MLP"} <= roles
    for r in doubled_rows:
        if r["role"] == "output convolution":  # zero-initialised: no ratio, and still zero
            assert r["median"] is None and r["norm"] == 0
        else:
            assert r["min"] == pytest.approx(2.0) and r["max"] == pytest.approx(2.0)
    moved = [r for r in trained_rows if r["median"] is not None]
    assert moved and all(0.5 < r["min"] <= r["max"] < 2 for r in moved) and any(r["max"] != 1.0 for r in moved)
    assert "kernel norm over its initial norm" in capsys.readouterr().out
    assert weight_norms.main([str(tmp_path / "missing.pt")]) == 2
