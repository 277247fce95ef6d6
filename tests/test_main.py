"""End-to-end runs of the real command on a tiny model and images the tests make (wandb off, CPU)."""
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main
from helpers import TINY_FLAGS, TinyFeatures, make_image_folder
from runtime.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = [*TINY_FLAGS, "--log_every", "2"]


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("afhq"), count=12)


def args(data_path, save, *extra):
    return [*TINY, "--data_path", str(data_path), "--save_folder", str(save), *map(str, extra)]


def run_cli(argv, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *argv], capture_output=True, text=True,
                          env=env, cwd=kw.pop("cwd", ROOT), timeout=kw.pop("timeout", 300), **kw)


def test_train_command_writes_every_output(data_path, tmp_path):
    result = run_cli(args(data_path, tmp_path / "out", "--train_steps", 4, "--save_and_sample_every", 2))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    for name in ("model.pt", "sample-2.png", "sample-4.png", "metrics.jsonl", "loss.png", "config.json"):
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert config["train_steps"] == 4 and config["time_steps"] == 10
    assert config["effective_batch_size"] == 8  # two batches of 4 per step by default
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4]
    assert load_checkpoint(out / "model.pt")["step"] == 4
    assert "learning_rate: 0.001" in result.stdout  # the config is printed at start


def test_resume_through_the_command_matches_an_uninterrupted_run(data_path, tmp_path):
    assert main.main(args(data_path, tmp_path / "a", "--train_steps", 4, "--save_and_sample_every", 2)) == 0
    assert main.main(args(data_path, tmp_path / "b", "--train_steps", 2, "--save_and_sample_every", 2)) == 0
    assert main.main(args(data_path, tmp_path / "b", "--train_steps", 4, "--save_and_sample_every", 2,
                          "--load_path", tmp_path / "b" / "model.pt")) == 0
    a, b = load_checkpoint(tmp_path / "a" / "model.pt"), load_checkpoint(tmp_path / "b" / "model.pt")
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]  # the curve continues from the checkpoint


def test_a_resumed_run_goes_on_in_its_checkpoints_folder_unless_told_otherwise(data_path, tmp_path, monkeypatch,
                                                                               capsys):
    monkeypatch.chdir(tmp_path)  # where the default ./results/ would be
    run = tmp_path / "runs" / "a"
    assert main.main(args(data_path, run, "--train_steps", 2, "--save_and_sample_every", 2)) == 0
    capsys.readouterr()
    assert main.main([*TINY, "--load_path", str(run / "model.pt"), "--train_steps", "4"]) == 0
    assert f"--save_folder {run}" in capsys.readouterr().out  # said, with the other settings it adopts
    assert load_checkpoint(run / "model.pt")["step"] == 4 and not (tmp_path / "results").exists()
    elsewhere = tmp_path / "b"
    assert main.main(args(data_path, elsewhere, "--train_steps", 6, "--load_path", run / "model.pt")) == 0
    assert load_checkpoint(elsewhere / "model.pt")["step"] == 6 and load_checkpoint(run / "model.pt")["step"] == 4


def test_visualize_writes_figures_and_gif(data_path, tmp_path):
    save = tmp_path / "run"
    assert main.main(args(data_path, save, "--train_steps", 2, "--save_and_sample_every", 2)) == 0
    trained_config = (save / "config.json").read_text()
    assert main.main(args(data_path, save, "--load_path", save / "model.pt", "--visualize", "--num_vis", 3,
                          "--seed", 5)) == 0
    for name in ("forward_process.png", "backward_process.png", "backward_process.gif"):
        assert (save / name).stat().st_size > 0, name
    assert main.main(args(data_path, save, "--load_path", save / "model.pt", "--sample", 4, "--learning_rate", 0.01)) == 0
    assert (save / "samples-2-ancestral.png").exists()
    for name in ("forward_process.png", "samples-2-ddim.png"):
        (save / name).unlink(missing_ok=True)
    # both modes in one command: each runs
    assert main.main(args(data_path, save, "--load_path", save / "model.pt", "--visualize", "--sample", 4,
                          "--sampler", "ddim", "--sample_steps", 3)) == 0
    assert (save / "forward_process.png").exists() and (save / "samples-2-ddim.png").exists()
    assert (save / "config.json").read_text() == trained_config  # the training run's record is kept


def test_checkpoint_of_another_architecture_is_refused(data_path, tmp_path, capsys):
    save = tmp_path / "run"
    assert main.main(args(data_path, save, "--train_steps", 2, "--save_and_sample_every", 2)) == 0
    code = main.main(args(data_path, tmp_path / "other", "--load_path", save / "model.pt", "--num_res_blocks", 2))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "num_res_blocks=1 in the checkpoint but 2 here" in err[-1] and "--num_res_blocks 1" in err[-1]


def test_model_and_training_flags_reach_the_network_the_trainer_and_the_checkpoint(data_path, tmp_path, capsys,
                                                                                  monkeypatch):
    from training import launch

    built = []
    real = launch.build_diffusion
    monkeypatch.setattr(launch, "build_diffusion", lambda *a: built.append(real(*a)) or built[-1])
    save = tmp_path / "run"
    extra = ["--loss", "huber", "--dropout", 0.1, "--weight_decay", 0.05, "--ema_sigma_rel", 0.03, "--lr_warmup", 3,
             "--lr_decay", "cosine", "--grad_clip", 0.5, "--one_pass", "False", "--sampler", "ddim", "--sample_steps", 5]
    assert main.main(args(data_path, save, "--train_steps", 2, "--save_and_sample_every", 2, *extra)) == 0
    d = built[-1]
    assert d.loss_type == "huber" and d.self_condition and d.model.input_conv.in_channels == 6
    assert d.model.down[0].dropout.p == 0.1
    ckpt = load_checkpoint(save / "model.pt")
    recorded = ckpt["config"]
    assert recorded["self_condition"] is True
    assert (recorded["weight_decay"], recorded["ema_sigma_rel"], recorded["lr_warmup"], recorded["lr_decay"]) == \
        (0.05, 0.03, 3, "cosine")
    assert (recorded["grad_clip"], recorded["one_pass"], recorded["sampler"], recorded["sample_steps"]) == \
        (0.5, False, "ddim", 5)
    # what reached the optimizer, not just the record: AdamW decays the kernels' group only
    assert [g["weight_decay"] for g in ckpt["optimizer"]["param_groups"]] == [0.05, 0.0]
    capsys.readouterr()
    code = main.main(args(data_path, tmp_path / "other", "--load_path", save / "model.pt", "--sample", 2,
                          "--self_condition", "False"))
    assert code == 2  # a flag named on the command line that contradicts the checkpoint's network is refused
    assert "self_condition=True in the checkpoint but False here" in capsys.readouterr().err.strip().splitlines()[-1]
    # unnamed, the network's flags are taken from the checkpoint (here: the same as the defaults)
    assert main.main(args(data_path, tmp_path / "other", "--load_path", save / "model.pt", "--sample", 2)) == 0


def test_wandb_offline_keeps_a_local_run(data_path, tmp_path):
    save = tmp_path / "run"
    argv = args(data_path, save, "--train_steps", 2, "--save_and_sample_every", 2)
    argv[argv.index("--wandb") + 1] = "offline"
    assert main.main(argv) == 0
    assert list((save / "wandb").glob("offline-run-*"))
    assert (save / "metrics.jsonl").read_text().strip()


@pytest.mark.parametrize("value,expected", [([], False), (["--fid"], True), (["--fid", "True"], True),
                                            (["--fid", "False"], False), (["--fid", "no"], False)])
def test_boolean_flags_take_both_forms(value, expected):
    from settings.cli import parse

    assert parse(value)[0].fid is expected


def test_defaults_are_the_assignments_recommended_command():
    from settings.cli import parse

    a = parse([])[0]
    assert (a.image_size, a.batch_size, a.time_steps, a.unet_dim, a.learning_rate) == (32, 32, 50, 16, 1e-3)
    assert (a.train_steps, a.save_and_sample_every, a.data_class) == (10000, 1000, "cat")
    assert Path(a.data_path) == Path("./data/train") and Path(a.save_folder) == Path("./results")
    # the package's own choices that scored best at that command (BENCHMARKS.md), on by default
    assert (a.grad_accum, a.self_condition, a.weight_decay, a.ema_sigma_rel) == (2, True, 0.1, 0.05)
    assert (a.loss, a.ema_decay, a.grad_clip, a.lr_decay) == ("l1", 0.999, 1.0, "none")
    assert (a.one_pass, a.cuda_graph) == ("auto", False)


def test_named_flags_are_those_the_command_line_names_whatever_their_values():
    from settings.cli import parse

    argv = ["--grad_accum=2", "--self_condition", "--weight_decay", "0.1", "--fid", "False", "--dim_mults", "1", "2"]
    config, named = parse(argv)
    assert named == {"grad_accum", "self_condition", "weight_decay", "fid", "dim_mults"}
    assert (config.grad_accum, config.self_condition, config.fid, config.dim_mults) == (2, True, False, (1, 2))
    assert parse([])[1] == set()


def test_help_answers_without_importing_torch():
    code = ("import sys, main\ntry:\n    main.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--train_steps" in result.stdout and "(default: 10000)" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_resuming_keeps_how_the_checkpoint_was_trained_unless_a_flag_says_otherwise(data_path, tmp_path, capsys):
    save = tmp_path / "run"
    plain = ["--grad_accum", 1, "--self_condition", "False", "--weight_decay", 0, "--learning_rate", 5e-4]
    assert main.main(args(data_path, save, "--train_steps", 2, "--save_and_sample_every", 2, *plain)) == 0
    capsys.readouterr()
    assert main.main(args(data_path, save, "--train_steps", 4, "--save_and_sample_every", 2,
                          "--load_path", save / "model.pt", "--weight_decay", 0.2)) == 0
    out = capsys.readouterr().out
    assert "--learning_rate 0.0005 --self_condition False --grad_accum 1" in out
    config = json.loads((save / "config.json").read_text())
    assert (config["grad_accum"], config["self_condition"], config["learning_rate"]) == (1, False, 5e-4)
    assert config["weight_decay"] == 0.2 and config["effective_batch_size"] == 4  # named: the command line's
    ckpt = load_checkpoint(save / "model.pt")
    assert ckpt["step"] == 4
    groups = {g["name"]: (g["weight_decay"], g["lr"]) for g in ckpt["optimizer"]["param_groups"]}
    assert groups == {"decay": (0.2, 5e-4), "no_decay": (0.0, 5e-4)}  # what AdamW trained with after the resume


def test_a_checkpoint_is_enough_to_sample_and_to_score_once_the_statistics_are_cached(tmp_path, stand_in_inception,
                                                                                        capsys):
    data = make_image_folder(tmp_path / "afhq", count=12)
    run = functools.partial(main.main, extractor=stand_in_inception)
    save, cache = tmp_path / "run", tmp_path / "cache"
    assert run(args(data, save, "--train_steps", 2, "--save_and_sample_every", 2, "--fid", "--fid_samples", 4,
                          "--cache_dir", cache)) == 0
    moved = tmp_path / "elsewhere"
    (data / "cat").rename(moved)  # the training images are gone
    for name in list(cache.glob("cat_*")):
        name.unlink()  # and their decoded cache: only the FID statistics are left
    gone = tmp_path / "nowhere" / "train"
    assert run(args(gone, save, "--load_path", save / "model.pt", "--sample", 4)) == 0
    assert (save / "samples-2-ancestral.png").exists()
    capsys.readouterr()
    assert run(args(gone, save, "--load_path", save / "model.pt", "--evaluate", "--fid_samples", 4)) == 0
    assert "FID " in capsys.readouterr().out  # found through the folder the checkpoint records
    [stats] = cache.glob("fid_ref_*.npz")
    stats.write_bytes(stats.read_bytes()[:100])  # damaged: it would have to be computed again, from the images
    with pytest.warns(RuntimeWarning, match="unusable"):
        assert run(args(gone, save, "--load_path", save / "model.pt", "--evaluate", "--fid_samples", 4)) == 2
    assert "cannot be used (the warning above says why); pass --data_path with the training images" in \
        capsys.readouterr().err
    stats.unlink()
    assert run(args(gone, save, "--load_path", save / "model.pt", "--evaluate", "--fid_samples", 4)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --evaluate needs the training images for FID's reference "
                                               "statistics") and f"--data_path {gone} does not exist" in err[0]
    assert run(args(gone, save, "--load_path", save / "model.pt", "--visualize")) == 0  # the checkpoint's 8 images
    assert (save / "forward_process.png").exists() and "figures: 100%" in capsys.readouterr().err
    assert run(args(gone, save, "--load_path", save / "model.pt", "--visualize", "--num_vis", 9)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --visualize shows real training images going through both "
                                               "processes (the checkpoint keeps fewer than --num_vis 9)") and \
        f"--data_path {gone} does not exist" in err[0]


@pytest.fixture
def stand_in_inception():
    from evaluation import fid

    return fid.FeatureExtractor(model=TinyFeatures().eval())


def test_fid_curve_and_standalone_score(data_path, tmp_path, stand_in_inception, capsys):
    save = tmp_path / "run"
    cache = tmp_path / "cache"
    argv = args(data_path, save, "--train_steps", 4, "--save_and_sample_every", 2, "--fid", "--fid_samples", 6,
                "--cache_dir", cache)
    assert main.main(argv, extractor=stand_in_inception) == 0
    fids = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    fids = [r for r in fids if "fid" in r]
    assert [r["step"] for r in fids] == [2, 4] and all(r["fid_samples"] == 6 and r["fid"] >= 0 for r in fids)
    assert (save / "fid.png").exists() and (save / "model_best.pt").exists()
    assert len(list(cache.glob("fid_ref_clean_16px_*.npz"))) == 1  # reference statistics cached once
    capsys.readouterr()
    assert main.main(args(data_path, save, "--load_path", save / "model.pt", "--evaluate", "--fid_samples", 6,
                          "--cache_dir", cache), extractor=stand_in_inception) == 0
    out = capsys.readouterr().out
    assert "FID " in out and "KID " in out and "(6 samples, sampler ancestral, 10 steps," in out


def test_fid_statistics_survive_a_re_extracted_data_folder(tmp_path, stand_in_inception):
    data = make_image_folder(tmp_path / "afhq", count=12)
    cache = tmp_path / "cache"
    run = lambda name: main.main(args(data, tmp_path / name, "--train_steps", 2, "--save_and_sample_every", 2,  # noqa: E731
                                      "--fid", "--fid_samples", 4, "--cache_dir", cache), extractor=stand_in_inception)
    assert run("a") == 0
    [stats] = cache.glob("fid_ref_clean_16px_*.npz")
    written = stats.stat().st_mtime_ns
    image_caches = set(cache.glob("cat_16px_*.npy"))
    for path in (data / "cat").iterdir():
        os.utime(path, ns=(10**18, 10**18))
    assert run("b") == 0
    assert set(cache.glob("cat_16px_*.npy")) != image_caches  # the files changed: the image cache is rebuilt
    assert list(cache.glob("fid_ref_*.npz")) == [stats] and stats.stat().st_mtime_ns == written  # the pixels did not


def test_fid_offline_warns_and_trains_on_but_standalone_score_fails(data_path, tmp_path, capsys):
    from evaluation import fid

    class Offline(fid.FeatureExtractor):
        def load(self):
            raise fid.InceptionUnavailable("FID's Inception network weights could not be downloaded (URLError); "
                                           "fetch it by hand, or leave off --fid")

    save = tmp_path / "run"
    with pytest.warns(UserWarning, match="FID is skipped and training goes on"):
        code = main.main(args(data_path, save, "--train_steps", 2, "--save_and_sample_every", 2, "--fid"),
                         extractor=Offline())
    assert code == 0 and (save / "model.pt").exists()
    code = main.main(args(data_path, save, "--load_path", save / "model.pt", "--evaluate"), extractor=Offline())
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "could not be downloaded" in err[-1]


def test_a_new_run_does_not_replace_another_runs_model(data_path, tmp_path, capsys):
    save = tmp_path / "run"
    assert main.main(args(data_path, save, "--train_steps", 2, "--save_and_sample_every", 2)) == 0
    before = (save / "model.pt").read_bytes()
    metrics = (save / "metrics.jsonl").read_text()
    assert main.main(args(data_path, save, "--train_steps", 2)) == 2
    assert "already holds a trained model" in capsys.readouterr().err
    assert (save / "model.pt").read_bytes() == before
    # visualizing and sampling a saved model leave the run's metrics as they are
    assert main.main(args(data_path, save, "--load_path", save / "model.pt", "--sample", 2)) == 0
    assert (save / "metrics.jsonl").read_text() == metrics
    assert main.main(args(data_path, save, "--train_steps", 2, "--save_and_sample_every", 2, "--overwrite")) == 0
