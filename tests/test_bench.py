"""The benchmark's own parts: the reference solutions' pipeline it measures against, one measured row in its
own process, and a clear exit when the data is missing. Timings themselves are never asserted here."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import make_image_folder, tiny_diffusion

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "bench.py"
sys.path.insert(0, str(ROOT / "bench"))

import bench  # noqa: E402
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
    for _ in range(3):  # two batches per step, more than one epoch of 8 images holds: the loader starts the next
        step()
    assert len(step.losses) == 3 and all(isinstance(x, float) and x > 0 for x in step.losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, diffusion.parameters()))


def _row(spec: dict) -> dict:
    out = subprocess.run([sys.executable, str(BENCH), "--row", json.dumps(spec)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


TINY_FLAGS = ["--image_size", "16", "--batch_size", "4", "--time_steps", "5", "--unet_dim", "8"]
TINY = {"device": "cpu", "workers": 0}


def test_a_training_row_reports_throughput_and_peak_memory(tmp_path):
    row = _row({"kind": "train", "pipeline": "synthetic", "steps": 2, "warmup": 1, "flags": TINY_FLAGS, **TINY})
    assert row["precision"] in ("bf16", "fp32")  # what the trainer chose on this CPU; fp16 is CUDA's
    assert row["images"] == 2 * 2 * 4  # the timed steps' two batches of 4 each, counted as drawn
    # the rates are of the timed steps alone (the warm-up step is neither timed nor counted)
    assert row["steps_per_s"] == pytest.approx(2 / row["seconds"]) and row["seconds"] > 0
    assert row["images_per_s"] == pytest.approx(row["images"] / row["seconds"])
    assert row["peak_rss_mib"] > 50  # torch alone takes more than this


def test_training_rows_take_main_pys_flags():
    spec = {"kind": "train", "pipeline": "synthetic", "steps": 1, "warmup": 1, **TINY}
    shipped = bench.run_row({**spec, "flags": TINY_FLAGS})  # in this process: the row's code, without its isolation
    baseline = bench.run_row({**spec, "flags": [*TINY_FLAGS, "--self_condition", "False", "--grad_accum", "1"]})
    # the same network but for the input convolution, which also reads the 3 channels of the x_0 estimate
    assert shipped["parameters"] - baseline["parameters"] == 3 * 8 * 3 * 3
    assert (shipped["images"], baseline["images"]) == (2 * 4, 4)  # --grad_accum 2, then one batch per step


def test_a_training_row_through_the_package_pipeline_uses_the_image_cache(tmp_path):
    data = make_image_folder(tmp_path, count=8, size=24) / "cat"
    cache = tmp_path / "cache"
    row = bench.run_row({"kind": "train", "pipeline": "package", "data": str(data.parent), "cache_dir": str(cache),
                         "steps": 2, "warmup": 1, "flags": [*TINY_FLAGS, "--one_pass", "False"], **TINY})
    assert row["steps_per_s"] > 0
    assert list(cache.glob("cat_16px_*.npy")), "the package pipeline decodes once into its cache"


def test_a_sampling_row_times_the_asked_sampler():
    row = bench.run_row({"kind": "sample", "sampler": "ddim", "steps": 3, "batch": 2, "flags": TINY_FLAGS, **TINY})
    assert row["images"] == 2 and row["seconds"] > 0  # the images the timed chain returned
    assert row["precision"] in ("bf16", "fp32")


def test_missing_data_is_one_line_and_exit_2(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH), "--data_path", str(tmp_path / "nowhere"), "--quick"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "--data_path" in out.stderr


def test_the_gpu_check_reads_the_trainers_time_summary_and_pytests_counts():
    import gpu_check

    out = ("loss 0.1\ntrained: 1000 steps in 41.3 s: training 30.2 s, checkpoints and sample grids 3.1 s, "
           "FID 8.0 s\ndone: results/model.pt at step 1000\n")
    assert gpu_check.time_summary(out) == {"steps": 1000, "total_s": 41.3, "training_s": 30.2, "periodic_s": 3.1,
                                           "fid_s": 8.0}
    assert gpu_check.time_summary("error: no data\n") is None
    assert gpu_check.pytest_counts("12 passed, 7 skipped in 3.0s") == {"passed": 12, "skipped": 7}


def test_the_gpu_check_scales_the_report_commands_and_runs_graphs_only_on_cuda():
    import gpu_check
    from settings.cli import parse

    full = gpu_check.report_commands(gpu_check.parse_args([]), cuda=True)
    assert [name for name, _ in full] == ["10000 steps", "10000 steps, CUDA graph", "1000 steps, FID every 100",
                                          "1000 steps, FID every 100, CUDA graph"]
    cpu = gpu_check.report_commands(gpu_check.parse_args(["--scale", "0.1"]), cuda=False)
    assert [name for name, _ in cpu] == ["1000 steps", "100 steps, FID every 10"]
    for _, flags in full + cpu:
        parse(flags)  # every command is one main.py takes


def test_the_gpu_checks_networks_part_trains_each_candidate_and_reads_its_last_fid(tmp_path):
    import gpu_check
    from settings.cli import parse

    args = gpu_check.parse_args(["--parts", "networks", "--network_steps", "500"])
    commands = gpu_check.network_commands(args)
    assert [name for name, _ in commands] == ["1 1 2 4 8 8, attention 4", "1 1 2 2 4 8, attention 4 5",
                                              "1 2 4 8, attention 3"]
    configs = [parse(flags)[0] for _, flags in commands]  # every command is one main.py takes
    assert [(c.dim_mults, c.attention_levels) for c in configs] == [
        ((1, 1, 2, 4, 8, 8), (4,)), ((1, 1, 2, 2, 4, 8), (4, 5)), ((1, 2, 4, 8), (3,))]
    assert all(c.image_size == 128 and c.train_steps == c.save_and_sample_every == 500 and c.fid for c in configs)
    assert [flags for _, flags in gpu_check.network_commands(gpu_check.parse_args(["--networks", "1 2: 1"]))] == [
        ["--image_size", "128", "--train_steps", "1000", "--save_and_sample_every", "1000", "--fid", "--dim_mults",
         "1", "2", "--attention_levels", "1"]]
    for bad in ("1 2 4 8", "1 two:3", ":3", "1 2:"):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(["--networks", bad])

    metrics = tmp_path / "metrics.jsonl"
    assert gpu_check.last_fid(metrics) == {}
    metrics.write_text('{"step": 10, "loss": 0.5}\n{"step": 500, "fid": 90.5, "kid": 0.07}\n'
                       '{"step": 510, "loss": 0.4}\n{"step": 1000, "fid": 70.25, "kid": 0.05}\n')
    assert gpu_check.last_fid(metrics) == {"fid": 70.25, "kid": 0.05}
    summary = {"steps": 1000, "total_s": 60.0, "training_s": 50.0, "periodic_s": 2.0, "fid_s": 8.0}
    assert gpu_check.steps_per_s(summary) == 20.0
    assert gpu_check.steps_per_s(None) is None and gpu_check.steps_per_s({**summary, "training_s": 0.0}) is None
    table = gpu_check.markdown({"device": "cpu", "torch": "2", "date": "d", "scale": 1.0, "networks": [
        {"name": "1 2 4 8, attention 3", "exit": 0, "steps_per_s": 20.0, "fid": 70.25, "kid": 0.05},
        {"name": "1 2, attention 1", "exit": 1, "steps_per_s": None}]})
    assert "| 1 2 4 8, attention 3 | 0 | 20.00 | 70.25 | 0.0500 |" in table
    assert "| 1 2, attention 1 | 1 | - | - | - |" in table


def test_the_gpu_check_refuses_a_missing_data_folder(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--data_path", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.strip().endswith("that holds cat/")


def test_the_guidance_benchmarks_classifier_learns_the_real_classes_and_scores_samples_by_them():
    from bench_guidance import share_classified, train_classifier

    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(40)
    shapes = torch.zeros(3, 8, 8)
    shapes[0, 3:5, :] = 1  # a horizontal bar, a vertical bar, a diagonal
    shapes[1, :, 3:5] = 1
    shapes[2] = torch.eye(8)
    grey = 0.7 * shapes[labels] + 0.2 * torch.rand(len(labels), 8, 8, generator=generator)
    images = (grey[:, None].expand(-1, 3, -1, -1) * 255).to(torch.uint8)
    net, accuracy = train_classifier(images, labels, 3, epochs=30)
    assert accuracy == 1.0
    x = images.float() / 255
    assert share_classified(net, x, labels) == 1.0
    assert share_classified(net, x, (labels + 1) % 3) == 0.0  # samples of another class than asked: none counted


def test_the_sampler_benchmark_scores_each_sampler_from_the_checkpoint_alone(tmp_path):
    from bench_samplers import parse_args, run
    from evaluation import fid
    from helpers import TinyFeatures, tiny_run

    data, cache, save = tiny_run(tmp_path, 2)
    args = parse_args(["--load_path", str(save / "model.pt"), "--data_path", str(data), "--cache_dir", str(cache),
                       "--samplers", "ddpm", "ddim:3", "--fid_samples", "4", "--device", "cpu"])
    rows = run(args, extractor=fid.FeatureExtractor(model=TinyFeatures().eval()))
    assert [row["sampler"] for row in rows] == ["ddpm", "ddim:3"]
    assert all(row["step"] == 2 and row["fid_samples"] == 4 and row["fid"] >= 0 for row in rows)
    assert all(row["sampling_s_per_1000"] > 0 for row in rows)
    assert rows[0]["fid"] != rows[1]["fid"]  # each row samples with its own sampler



def test_the_chain_profile_times_each_sampler_in_turn_and_finds_the_network(tmp_path, monkeypatch):
    import profile_chain
    from helpers import tiny_run

    _, _, save = tiny_run(tmp_path, 2)
    passes = []
    loaded = profile_chain.load

    def counting(load_path, device):
        model = loaded(load_path, device)
        model.diffusion.model.register_forward_hook(lambda *_: passes.append(1))
        return model

    monkeypatch.setattr(profile_chain, "load", counting)
    args = profile_chain.parse_args(["--load_path", str(save / "model.pt"), "--samplers", "ddpm", "ancestral:4",
                                     "--batch", "2", "--rounds", "2", "--profile", "1", "--device", "cpu"])
    result = profile_chain.run(args)
    assert {row: len(seconds) for row, seconds in result["times"].items()} == {"ddpm": 2, "ancestral:4": 2}
    assert len(passes) == 3 + 2 * (10 + 4) + 10  # the warm-up, two rounds of both rows, one profiled ddpm chain
    assert list(result["tables"]) == ["ddpm"] and "convolution" in result["tables"]["ddpm"]
    assert 0.0 < result["network_share"]["ddpm"] <= 1.0


def test_the_size_benchmark_measures_each_size_with_its_own_network(capsys):
    import bench_sizes

    args = bench_sizes.parse_args(["--sizes", "32", "64", "--steps", "1", "--warmup", "1", "--device", "cpu",
                                   "--flags", "--unet_dim", "8", "--batch_size", "2", "--time_steps", "5"])
    rows = bench_sizes.run(args)
    assert [row["size"] for row in rows] == [32, 64]
    assert [row["dim_mults"] for row in rows] == [[1, 2, 4, 8], [1, 2, 4, 8, 8]]
    assert all(row["images"] == 2 * 2 and row["estimate_gib"] > 0 for row in rows)  # one step of two batches of 2
    assert rows[0]["step_ratio"] == 1.0 and rows[1]["step_ratio"] > 0
    assert capsys.readouterr().out.count("steps/s") == 2


def test_the_size_benchmark_trains_a_grey_network_on_grey_batches():
    import bench_sizes

    args = bench_sizes.parse_args(["--sizes", "32", "--steps", "1", "--warmup", "1", "--device", "cpu", "--flags",
                                   "--unet_dim", "8", "--batch_size", "2", "--time_steps", "5", "--channels", "1"])
    (row,) = bench_sizes.run(args)
    assert row["images"] == 2 * 2 and row["steps_per_s"] > 0


def test_the_editing_benchmark_splits_a_folder_and_keeps_every_class_folder(tmp_path):
    import bench_edits

    source = make_image_folder(tmp_path / "src", count=5, size=24, cls="a")
    make_image_folder(tmp_path / "src", count=3, size=24, cls="b")
    train, held = bench_edits.split(source, tmp_path / "train", tmp_path / "held", every=2)
    assert (train, held) == (3, 5)  # a: 0, 2, 4 held out; b: 0, 2
    assert sorted(p.name for p in (tmp_path / "held" / "a").iterdir()) == ["img_000.jpg", "img_002.jpg", "img_004.jpg"]
    assert sorted(p.name for p in (tmp_path / "train" / "b").iterdir()) == ["img_001.jpg"]


def test_the_editing_benchmark_scores_inpainting_and_img2img_on_held_out_images(tmp_path):
    import bench_edits
    from evaluation import fid
    from helpers import TinyFeatures, tiny_run

    data, cache, save = tiny_run(tmp_path, 2)
    held = make_image_folder(tmp_path / "held", count=5, size=24) / "cat"
    common = ["--load_path", str(save / "model.pt"), "--data_path", str(data), "--held_out", str(held),
              "--cache_dir", str(cache), "--device", "cpu"]
    extractor = fid.FeatureExtractor(model=TinyFeatures().eval())
    rows = bench_edits.inpaint(bench_edits.parse_args(["inpaint", *common, "--masks", "centre", "left",
                                                       "--resample", "1", "3", "--kept_guidance", "0",
                                                       "--samplers", "ancestral:3", "ddpm", "--candidates", "1",
                                                       "3"]),
                               extractor=extractor)
    assert [row["method"] for row in rows] == ["held-out images", "plain sampling"] + 2 * [
        "mean fill", "replacement (ancestral, 3 steps)", "replacement, the consensus of 3 (ancestral, 3 steps)",
        "RePaint, 3 resamplings (ancestral, 3 steps)",
        "RePaint, 3 resamplings, the consensus of 3 (ancestral, 3 steps)",
        "replacement (ddpm)", "replacement, the consensus of 3 (ddpm)", "RePaint, 3 resamplings (ddpm)",
        "RePaint, 3 resamplings, the consensus of 3 (ddpm)"]
    filled = rows[2:]
    assert all(row["hole_rmse"] > 0 and row["seam"] >= 0 and row["fid"] >= 0 for row in filled)
    assert len({row["seam_of_originals"] for row in filled}) == 2  # one per mask
    assert rows[1]["s_per_image"] > 0 and filled[2]["s_per_image"] > 0

    real, plain = rows[:2]
    s0, s1 = bench_edits.img2img(bench_edits.parse_args(["img2img", *common, "--strengths", "0", "1"]),
                                 extractor=extractor)
    assert s0["distance"] == 0.0 and s0["fid"] == real["fid"]  # s = 0 returns the inputs
    assert s1["distance"] > 0 and s1["fid"] == plain["fid"]  # s = 1 draws what plain sampling draws


def test_the_editing_benchmark_translates_held_out_images_of_each_class(tmp_path):
    import bench_edits
    import main
    from evaluation import fid
    from helpers import TINY_FLAGS, TinyFeatures

    for cls in ("a", "b"):
        data = make_image_folder(tmp_path / "data", count=6, size=24, cls=cls)
        held = make_image_folder(tmp_path / "held", count=3, size=24, cls=cls)
    save = tmp_path / "run"
    assert main.main([*TINY_FLAGS, "--data_path", str(data), "--data_class", "all", "--class_conditional",
                      "--save_folder", str(save), "--cache_dir", str(tmp_path / "cache"), "--train_steps", "2",
                      "--save_and_sample_every", "2"]) == 0
    args = bench_edits.parse_args(["translate", "--load_path", str(save / "model.pt"), "--data_path", str(data),
                                   "--held_out", str(held), "--cache_dir", str(tmp_path / "cache"), "--device", "cpu",
                                   "--strengths", "0", "0.5", "--guidance", "0", "2"])
    head, *rows = bench_edits.translate(args, extractor=fid.FeatureExtractor(model=TinyFeatures().eval()))
    assert [(row["strength"], row["guidance"]) for row in rows] == [
        (s, w) for s in (0.0, 0.5) for w in ("no class", 0.0, 2.0)]
    for row in rows[:3]:  # s = 0: the inputs themselves, as the classifier sees the held-out images
        assert row["distance"] == 0.0 and row["kept_source"] == head["classifier_on_held_out"]
        assert row["to_target"] + row["kept_source"] == pytest.approx(1.0)  # two classes: the target is the other one
    assert all(0.0 <= row["to_target"] <= 1.0 and row["distance"] > 0 for row in rows[3:])


def shape_digits(root: Path, counts: dict[str, int], seed: int) -> Path:
    """Grey 16-px class folders under ``root``: class "a" a vertical bar, "b" a diagonal, on noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            array = rng.integers(0, 40, size=(16, 16))
            if name == "a":
                array[:, 6:10] = 220
            else:
                array[np.eye(16, dtype=bool) | np.eye(16, k=1, dtype=bool)] = 220
            Image.fromarray(array.astype(np.uint8), "L").save(root / name / f"{i:02d}.png")
    return root


def test_a_fills_lead_over_retrieval_is_paired_over_the_images():
    import bench_digits

    right, retrieval = torch.tensor([1.0, 0.5, 0.0, 1.0]), torch.tensor([1.0, 1.0, 0.0, 0.0])
    lead = bench_digits.lead_over(right, retrieval)  # differences 0, -50, 0, 100 points
    assert lead["lead_over_retrieval_points"] == pytest.approx(12.5)
    assert lead["lead_95_half_width"] == pytest.approx(1.96 * torch.tensor([0.0, -50, 0, 100]).std().item() / 2)
    assert bench_digits.lead_over(retrieval, retrieval) == {"lead_over_retrieval_points": 0.0, "lead_95_half_width": 0.0}


def test_the_digit_benchmark_judges_fills_of_held_out_images_and_the_balance_of_samples(tmp_path):
    import bench_digits
    import main
    import numpy as np
    from PIL import Image
    from helpers import TINY_FLAGS

    data = shape_digits(tmp_path / "train", {"a": 80, "b": 40}, seed=0)
    held = shape_digits(tmp_path / "held", {"a": 4, "b": 4}, seed=1)
    save, cache = tmp_path / "run", tmp_path / "cache"
    train = [*TINY_FLAGS, "--data_path", str(data), "--data_class", "all", "--save_folder", str(save),
             "--cache_dir", str(cache)]
    assert main.main([*train, "--channels", "1", "--flip", "False", "--train_steps", "2"]) == 0
    common = ["--data_path", str(data), "--cache_dir", str(cache), "--device", "cpu"]
    head, whole, *rows = bench_digits.complete(bench_digits.parse_args(
        ["complete", "--load_path", str(save / "model.pt"), *common, "--held_out", str(held), "--masks", "bottom",
         "right", "--resample", "1", "2", "--kept_guidance", "0", "2", "--samplers", "ancestral:3", "--fills", "2"]))
    assert head["held_out"] == 8 and whole["named_right"] == 1.0
    assert [(row["mask"], row["method"]) for row in rows] == [(mask, method) for mask in ("bottom", "right") for method in (
        "mean fill", "retrieval", "replacement (ancestral, 3 steps)", "RePaint, 2 resamplings (ancestral, 3 steps)",
        "RePaint, 2 resamplings, pulled to the kept pixels at 2 (ancestral, 3 steps)")]
    retrieval = rows[1]  # the kept top half shows the stroke, so the nearest training image is of the same class
    assert retrieval["named_right"] == 1.0 and retrieval["per_class"] == {"a": 1.0, "b": 1.0}
    assert all(0.0 <= row["named_right"] <= 1.0 and row["s_per_image"] >= 0 for row in rows)
    for mask in range(2):  # the model's rows: two fills of each of the 8 images, set against retrieval's
        retrieval, models = rows[5 * mask + 1], rows[5 * mask + 2:5 * mask + 5]
        for row in models:
            assert (16 * row["named_right"]) == pytest.approx(round(16 * row["named_right"]))
            assert row["lead_over_retrieval_points"] == pytest.approx(100 * (row["named_right"] - retrieval["named_right"]))
            assert row["lead_95_half_width"] >= 0
        assert "lead_over_retrieval_points" not in rows[5 * mask] and "lead_over_retrieval_points" not in retrieval
    floors = bench_digits.complete(bench_digits.parse_args(  # no model: the same floors, from the folders alone
        ["complete", *common, "--held_out", str(held), "--masks", "bottom", "right", "--image_size", "16"]))
    without_time = [{k: v for k, v in row.items() if k != "s_per_image"} for row in (head, whole, *rows)]
    assert [{k: v for k, v in row.items() if k != "s_per_image"} for row in floors] == [
        row for row in without_time if "ancestral" not in row.get("method", "")]

    (save / "model.pt").rename(save / "first.pt")
    assert main.main([*train, "--load_path", str(save / "first.pt"), "--train_steps", "4"]) == 0
    head, *checkpoints = bench_digits.balance(bench_digits.parse_args(
        ["balance", "--load_path", str(save / "model.pt"), str(save / "first.pt"), *common, "--samples", "6"]))
    assert head["data"] == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    assert [row["step"] for row in checkpoints] == [4, 2]
    for row in checkpoints:
        assert sum(row["samples"].values()) == pytest.approx(1.0)
        gap = {c: 100 * (row["samples"][c] - head["data"][c]) for c in "ab"}
        assert row["largest_gap_points"] == pytest.approx(gap[row["class_of_largest_gap"]])
        assert abs(row["largest_gap_points"]) == pytest.approx(max(map(abs, gap.values())))
        assert row["total_variation_points"] == pytest.approx(sum(map(abs, gap.values())) / 2)
        assert 0 <= row["ink"] <= 1
    pngs = [np.asarray(Image.open(f)) for f in sorted(data.rglob("*.png"))]  # 16 px, as the model trains on them
    assert head["data_ink"] == pytest.approx(np.mean(pngs) / 255, abs=1e-6)
    assert bench_digits.ink(torch.tensor([[0, 255], [51, 0]], dtype=torch.uint8)) == pytest.approx(0.3)
    _, real, *rows = bench_digits.balance(bench_digits.parse_args(
        ["balance", "--load_path", str(save / "model.pt"), *common, "--samples", "4", "--samplers", "ancestral:3",
         "ddim:2", "ddpm", "--held_out", str(held)]))
    assert [(row["step"], row["sampler"]) for row in rows] == [(4, "ancestral, 3 steps"), (4, "ddim, 2 steps"),
                                                               (4, "ddpm")]
    assert real["images"] == 8 and real["samples"] == {"a": 0.5, "b": 0.5}  # the reader names all 8 right (above)
    assert real["largest_gap_points"] == real["total_variation_points"] == 0
    assert real["data_as_read"] == pytest.approx(head["data"])  # a reader that errs on none reads the data as it is
    for row in rows:
        assert row["against_data_as_read"] == {k: row[k] for k in (
            "largest_gap_points", "class_of_largest_gap", "total_variation_points")}


def test_the_balance_sets_the_samples_against_the_data_as_the_classifier_reads_real_images():
    import bench_digits

    classes = ("a", "b", "c")  # half the a's read as b's, every b right, c's read as a's a quarter of the time
    truth = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    named = torch.tensor([0, 1, 1, 1, 2, 2, 0, 2])
    read = bench_digits.confusion(named, truth, classes)
    assert read.tolist() == [[0.5, 0.0, 0.25], [0.5, 1.0, 0.0], [0.0, 0.0, 0.75]]
    data = torch.tensor([0.5, 0.25, 0.25])
    as_read = read @ data  # a model drawing the data's shares is named a 31.25 %, b 50 %, c 18.75 % of the time
    assert as_read.tolist() == pytest.approx([0.3125, 0.5, 0.1875])
    row = bench_digits.gaps_from(as_read, as_read, classes)
    assert row["total_variation_points"] == 0
    assert bench_digits.gaps_from(as_read, data, classes)["largest_gap_points"] == pytest.approx(25.0)
    with pytest.raises(SystemExit, match="no images of c"):
        bench_digits.confusion(named[:4], truth[:4], classes)
