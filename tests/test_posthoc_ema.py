"""Weight snapshots written during training, and averages of the weights rebuilt from them afterwards."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

import posthoc_ema
from errors import UserError
from helpers import TinyFeatures, tiny_run
from test_trainer import make_trainer
from trainer import LEGACY_EMA_SIGMA_REL, TrainConfig, ema_decay

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def test_snapshots_rebuild_the_trainers_ema(tmp_path):
    trainer = make_trainer(tmp_path, train_steps=30, save_and_sample_every=30, snapshot_every=1, ema_decay=0.9)
    trainer.train()
    snapshots = posthoc_ema.list_snapshots(tmp_path / "snapshots")
    assert [(first, last) for first, last, _ in snapshots] == [(s, s) for s in range(1, 31)]
    rebuilt = posthoc_ema.rebuild(snapshots, posthoc_ema.ema_step_weights(30, trainer.ema_decay_at))
    ema, raw = trainer.ema.model.state_dict(), trainer.diffusion.model.state_dict()
    assert set(rebuilt) == set(ema)
    for name in ema:
        assert torch.allclose(rebuilt[name], ema[name], atol=1e-6), name
    assert max((raw[k] - ema[k]).abs().max() for k in ema) > 1e-3  # the EMA is not just the last weights


def test_block_means_give_exact_averages_for_weights_constant_in_each_block(tmp_path):
    model = torch.nn.Linear(2, 1)
    writer = posthoc_ema.SnapshotWriter(model, tmp_path, every=3)
    history = []
    for step in range(1, 10):
        with torch.no_grad():
            model.weight.fill_(float(step ** 2))
            model.bias.fill_(-float(step))
        history.append(model.weight.detach().clone())
        writer.add(step)
    snapshots = posthoc_ema.list_snapshots(tmp_path)
    assert [(first, last) for first, last, _ in snapshots] == [(1, 3), (4, 6), (7, 9)]
    first_block = torch.load(snapshots[0][2], weights_only=True)
    assert first_block["steps"] == 3 and torch.allclose(first_block["model"]["weight"], torch.full((1, 2), 14 / 3))
    plain = posthoc_ema.rebuild(snapshots, posthoc_ema.power_step_weights(0.0, 9))  # gamma 0: the plain mean
    assert torch.allclose(plain["weight"], torch.stack(history).mean(0))
    assert torch.allclose(plain["bias"], torch.tensor([-5.0]))
    upto6 = posthoc_ema.rebuild(snapshots, posthoc_ema.power_step_weights(0.0, 6))
    assert torch.allclose(upto6["weight"], torch.stack(history[:6]).mean(0))
    with pytest.raises(UserError, match="falls inside the snapshot"):
        posthoc_ema.rebuild(snapshots, posthoc_ema.power_step_weights(0.0, 5))
    into = torch.nn.Linear(2, 1)
    posthoc_ema.rebuild_into(into, snapshots, posthoc_ema.power_step_weights(0.0, 6))
    assert torch.allclose(into.weight, upto6["weight"]) and torch.allclose(into.bias, upto6["bias"])
    with pytest.raises(UserError, match="lack 0.weight .* another network"):
        posthoc_ema.rebuild_into(torch.nn.Sequential(torch.nn.Linear(2, 1)), snapshots,
                                 posthoc_ema.power_step_weights(0.0, 6))


def test_snapshots_close_at_checkpoints_and_continue_across_a_resume(tmp_path):
    first = make_trainer(tmp_path, train_steps=6, snapshot_every=4)  # checkpoints at steps 3 and 6
    first.train()
    assert [(a, b) for a, b, _ in posthoc_ema.list_snapshots(tmp_path / "snapshots")] == [(1, 3), (4, 4), (5, 6)]
    resumed = make_trainer(tmp_path, train_steps=10, snapshot_every=4)
    resumed.load(tmp_path / "model.pt")
    resumed.train()
    assert [(a, b) for a, b, _ in posthoc_ema.list_snapshots(tmp_path / "snapshots")] == [
        (1, 3), (4, 4), (5, 6), (7, 8), (9, 9), (10, 10)]
    (tmp_path / "snapshots" / "avg-0000008.pt").unlink()
    with pytest.raises(UserError, match="gap: avg-0000006.pt ends at step 6, avg-0000009.pt starts at step 9"):
        posthoc_ema.list_snapshots(tmp_path / "snapshots")
    with pytest.raises(UserError, match="--snapshot_every"):
        posthoc_ema.list_snapshots(tmp_path / "nowhere")


def test_a_resume_from_an_earlier_checkpoint_drops_the_snapshots_of_the_abandoned_steps(tmp_path):
    run = make_trainer(tmp_path, train_steps=3, snapshot_every=2)
    run.train()
    early = run.save(tmp_path / "step3.pt")
    run.config.train_steps = 6
    run.train()
    blocks = [(a, b) for a, b, _ in posthoc_ema.list_snapshots(tmp_path / "snapshots")]
    assert blocks == [(1, 2), (3, 3), (4, 4), (5, 6)]
    again = make_trainer(tmp_path, train_steps=5, snapshot_every=2)
    again.load(early)
    again.train()
    snapshots = posthoc_ema.list_snapshots(tmp_path / "snapshots")
    assert [(a, b) for a, b, _ in snapshots] == [(1, 2), (3, 3), (4, 4), (5, 5)]
    last = torch.load(snapshots[-1][2], weights_only=True)["model"]
    assert all(torch.equal(last[k], v) for k, v in again.diffusion.model.state_dict().items())  # one step: its weights


def test_no_snapshots_unless_asked(tmp_path):
    make_trainer(tmp_path).train()
    assert not (tmp_path / "snapshots").exists()


@pytest.mark.parametrize("sigma_rel", [0.02, 0.09, 0.2, 0.28])
def test_sigma_rel_maps_to_the_power_whose_weights_have_that_width(sigma_rel):
    gamma = posthoc_ema.sigma_rel_to_gamma(sigma_rel)
    weights = posthoc_ema.power_step_weights(gamma, 20_000)
    x = torch.arange(1, 20_001, dtype=torch.float64) / 20_000
    mean = (weights * x).sum()
    assert math.sqrt(float((weights * (x - mean) ** 2).sum())) == pytest.approx(sigma_rel, rel=1e-3)
    with pytest.raises(ValueError):
        posthoc_ema.sigma_rel_to_gamma(0.3)


@pytest.mark.parametrize("sigma_rel", [LEGACY_EMA_SIGMA_REL, TrainConfig.ema_sigma_rel, 0.15])
def test_the_trainers_ema_warmup_has_its_relative_width_at_any_length(sigma_rel):
    for last in (1_000, 10_000):
        weights = posthoc_ema.ema_step_weights(last, lambda count: ema_decay(count, 0.9999, True, sigma_rel))
        x = torch.arange(1, last + 1, dtype=torch.float64) / last
        mean = (weights * x).sum()
        assert math.sqrt(float((weights * (x - mean) ** 2).sum())) == pytest.approx(sigma_rel, rel=0.05)


def test_ema_lengths_bench_scores_rebuilt_averages_like_the_checkpoints_ema(tmp_path, monkeypatch):
    import ema_lengths as bench
    import fid

    monkeypatch.setattr(fid, "_build_inception", lambda mode, device: TinyFeatures().eval())
    data, cache, save = tiny_run(tmp_path, 12, "--snapshot_every", "1", "--ema_decay", "0.8", "--learning_rate", "0.05")
    out = tmp_path / "posthoc.json"
    assert bench.main(["--run", str(save), "--steps", "8", "12", "--sigma_rel", "0.1", "--checkpoint_ema",
                       "--data_path", str(data), "--samples", "5", "--batch_size", "3", "--precision", "fp32",
                       "--cache_dir", str(cache), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["step"], r["average"].split(" (")[0]) for r in rows] == [
        (12, "checkpoint EMA"), (8, "trainer EMA"), (8, "power, sigma_rel 0.1"), (12, "trainer EMA"),
        (12, "power, sigma_rel 0.1")]
    by = {(r["step"], r["average"].split(" (")[0]): r for r in rows}
    # the rebuilt EMA leaves out the initial weights (a share of 3e-6 after 12 warm-up steps) and sums in float64;
    # other averages score 1e-2 apart here
    assert by[(12, "trainer EMA")]["fid"] == pytest.approx(by[(12, "checkpoint EMA")]["fid"], rel=1e-4)
    assert len({round(r["fid"], 6) for r in rows[1:]}) == 4  # different weights, different scores
    with pytest.raises(UserError, match="no snapshot ends at step 13; pick steps where one ends: 1, 2, 3, ..., 12"):
        bench.main(["--run", str(save), "--steps", "13", "--data_path", str(data), "--cache_dir", str(cache)])
