"""Every way of calling main.py wrongly: one line on stderr, exit code 2, nothing written, never a traceback;
in-process, and a few through the real command."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import main
from helpers import TINY_FLAGS, make_image_folder

ROOT = Path(__file__).resolve().parents[1]
TINY = [*TINY_FLAGS, "--train_steps", "2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    data = make_image_folder(root, count=6)
    (root / "notes.txt").write_text("not a checkpoint")
    assert main.main([*TINY, "--train_steps", "1", "--data_path", str(data), "--save_folder", str(root / "run")]) == 0
    good = (root / "run" / "model.pt").read_bytes()
    (root / "truncated.pt").write_bytes(good[: len(good) * 2 // 3])
    (root / "empty.pt").write_bytes(b"")
    return {"data": str(data), "root": str(root)}


CASES = [
    # (extra flags, text the one line must contain); {data} and {root} are filled in
    (["--bogus_flag", "1"], "unrecognized arguments: --bogus_flag"),
    (["--batch_size", "abc"], "--batch_size: expected a positive integer, got 'abc'"),
    (["--batch_size", "0"], "--batch_size: expected a positive integer, got '0'"),
    (["--train_steps", "-5"], "--train_steps: expected a positive integer"),
    (["--image_size", "0"], "--image_size: expected a positive integer"),
    (["--time_steps", "1"], "--time_steps: expected an integer of at least 2"),
    (["--learning_rate", "5"], "--learning_rate: expected a learning rate in (0, 1]"),
    (["--learning_rate", "0"], "--learning_rate: expected a learning rate in (0, 1]"),
    (["--learning_rate", "nan"], "--learning_rate: expected a learning rate in (0, 1]"),
    (["--fid", "maybe"], "--fid: expected True or False"),
    (["--weight_decay", "-0.1"], "--weight_decay: expected a number in [0, 1], got '-0.1'"),
    (["--ema_sigma_rel", "0.5"], "--ema_sigma_rel: expected a number in (0, 0.28], got '0.5'"),
    (["--grad_clip", "-1"], "--grad_clip: expected a non-negative number"),
    (["--lr_decay", "linear"], "--lr_decay: invalid choice: 'linear'"),
    (["--one_pass", "perhaps"], "--one_pass: expected auto, True or False, got 'perhaps'"),
    (["--cuda_graph", "maybe"], "--cuda_graph: expected auto, True or False, got 'maybe'"),
    (["--timestep_gamma", "0.5"], "unrecognized arguments: --timestep_gamma 0.5"),
    (["--data_class", "horse"], "has no horse/ folder; its folders are cat/: pass one of them as --data_class"),
    (["--visualize"], "--visualize needs a trained model: add --load_path"),
    (["--evaluate"], "--evaluate needs a trained model: add --load_path"),
    (["--load_path", "{root}/missing.pt"], "does not exist"),
    (["--load_path", "{root}/notes.txt"], "is not a PyTorch checkpoint file at all"),
    (["--load_path", "{root}/truncated.pt"], "it is truncated or damaged"),
    (["--load_path", "{root}/empty.pt"], "is empty (0 bytes)"),
    (["--load_path", "{root}/run"], "is a folder; pass the checkpoint file inside it"),
    (["--load_path", "{root}/run/model.pt", "--unet_dim", "16"], "unet_dim=8 in the checkpoint but 16 here"),
    (["--save_folder", "{root}/notes.txt/sub"], "cannot be written"),
    (["--image_size", "96"], "all 6 images under {data} are smaller than half of 96px (the largest has a short "
                             "side of 40px), too small to upsample; pass --image_size 80 or less"),
    (["--image_size", "15"], "--image_size 15 does not fit a U-Net of 2 levels (--dim_mults 1 2), which takes "
                             "multiples of 2; the nearest are 14 and 16"),
    (["--unet_dim", "12"], "GroupNorm cannot split into 8 groups"),
    (["--data_path", "{root}/nowhere"], "does not exist"),
    (["--attention_levels", "5"], "--attention_levels 5 must be below the number of --dim_mults"),
    (["--cuda_graph"], "--cuda_graph True: CUDA graphs need a CUDA GPU, and this run is on the CPU; pass "
                       "--cuda_graph auto or False"),
    (["--sampler", "euler"], "--sampler: invalid choice: 'euler'"),
    (["--sampler", "ddpm", "--sample_steps", "5"], "--sampler ddpm visits every one of the --time_steps 10 timesteps, "
     "so it cannot take --sample_steps 5; drop --sample_steps, or pass a sampler that takes fewer steps: ancestral, "
     "ddim, dpmpp_2m, dpmpp_2m_sde"),
    (["--sampler", "dpmpp_2m", "--sample_steps", "11"], "--sample_steps 11 is more than --time_steps 10; lower it"),
]


def argv_for(world, tmp_path, extra) -> list[str]:
    return [*TINY, "--data_path", world["data"], "--save_folder", str(tmp_path / "out"),
            *(e.format(**world) for e in extra)]


@pytest.mark.parametrize("extra,expected", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_call_gets_one_line_and_exit_2(world, tmp_path, capsys, extra, expected):
    """In-process: a refusal is exit code 2 (returned, or argparse's SystemExit) and one line on stderr."""
    try:
        code = main.main(argv_for(world, tmp_path, extra))
    except SystemExit as e:
        code = e.code
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith(("error:", "main.py: error:"))]
    assert code == 2, lines
    assert len(errors) == 1 and lines[-1] == errors[0], lines  # progress bars and warnings may come before it
    assert expected.format(**world) in errors[0], errors[0]
    assert not (tmp_path / "out" / "model.pt").exists()


# the real command, where the process boundary matters: argparse's exit, a checkpoint refused before any work,
# and a refusal after the data is read (every image too small); each without a traceback
END_TO_END = [case for case in CASES if case[0][0] == "--bogus_flag" or case[0][-1] in ("{root}/truncated.pt", "96")]
assert len(END_TO_END) == 3, "each end-to-end case must be found by name"


@pytest.mark.parametrize("extra,expected", END_TO_END, ids=[" ".join(c[0]) for c in END_TO_END])
def test_the_real_command_says_it_in_one_line_and_exits_2(world, tmp_path, extra, expected):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), *argv_for(world, tmp_path, extra)],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith(("error:", "main.py: error:"))]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(errors) == 1 and expected.format(**world) in errors[0], result.stderr
    assert result.stderr.rstrip().endswith(errors[0].rstrip())


def test_torch_built_for_numpy_1_beside_numpy_2_is_one_line_before_any_work(monkeypatch, capsys, tmp_path):
    """torch before 2.3 under NumPy 2 fails its first array ("Numpy is not available"), which pip cannot prevent."""
    import torch

    def unavailable(*args, **kwargs):
        raise RuntimeError("Numpy is not available")

    monkeypatch.setattr(torch, "from_numpy", unavailable)
    argv = [*TINY, "--data_path", str(tmp_path / "nowhere"), "--save_folder", str(tmp_path / "out")]
    assert main.main(argv) == 2
    assert "was built for NumPy 1, and NumPy" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
