"""The Trainer with a tiny U-Net and fake batches: steps, EMA, schedules, checkpoints, resume, NaN, FID, figures."""
import math
import re
import time

import pytest
import torch

from helpers import FakeBatches, tiny_diffusion
from runtime import checkpoint as ckpt_io
from runtime.errors import UserError
from settings.config import Config
from trainer import Trainer, TrainingDiverged
from training.data_mean import DataMean, means_from_state
from training.ema import MAX_SIGMA_REL, sigma_rel_to_gamma

# tiny_diffusion's network, trained as plain Algorithm 1 (one batch per step, no weight decay) unless asked
TINY = dict(image_size=16, time_steps=10, unet_dim=8, dim_mults=(1, 2), num_res_blocks=1, grad_accum=1,
            weight_decay=0.0, train_steps=6, save_and_sample_every=3, num_samples=4, log_every=2)


def make_trainer(tmp_path, *, dropout=0.0, self_condition=False, **cfg):
    torch.manual_seed(0)  # as main.py does before building the model
    config = Config(**{**TINY, "dropout": dropout, "self_condition": self_condition, "save_folder": str(tmp_path),
                       **cfg})
    return Trainer(tiny_diffusion(dropout=dropout, self_condition=self_condition), FakeBatches(), config=config,
                   device="cpu")


def time_summary(out: str) -> dict:
    """The numbers of the trainer's last line: ``trained: N steps in T s: training A s, ... B s, FID C s``."""
    line = [x for x in out.splitlines() if x.startswith("trained: ")][-1]
    steps, total, training, periodic, fid = map(float, re.findall(r"(\d+(?:\.\d+)?)(?= s| steps)", line))
    return {"steps": steps, "total": total, "training": training, "periodic": periodic, "fid": fid}


def test_training_writes_checkpoints_grids_and_lowers_loss(tmp_path, capsys):
    trainer = make_trainer(tmp_path)
    trainer.train()
    times = time_summary(capsys.readouterr().out)
    assert times["steps"] == 6 and times["fid"] == 0 and times["periodic"] > 0 and times["training"] > 0
    assert trainer.step == 6
    assert (tmp_path / "model.pt").exists()
    assert (tmp_path / "sample-3.png").exists() and (tmp_path / "sample-6.png").exists()
    losses = [r["loss"] for r in trainer.history if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    ckpt = ckpt_io.load_checkpoint(tmp_path / "model.pt")
    assert ckpt["step"] == 6 and set(ckpt) >= {"model", "ema", "optimizer", "rng", "data", "config", "history"}


def test_dropout_acts_in_training_only_never_when_sampling_the_ema(tmp_path):
    trainer = make_trainer(tmp_path / "a", dropout=0.5)
    for _ in range(2):
        trainer.train_step()
    assert trainer.diffusion.training and not trainer.ema.training
    # with dropout on, two draws of the same noise would differ: dropout takes its masks from the global RNG
    first, second = trainer.sampler.sample(2), trainer.sampler.sample(2)
    assert torch.equal(first, second)
    trainer.save()
    resumed = make_trainer(tmp_path / "b", dropout=0.5)
    resumed.load(tmp_path / "a" / "model.pt")
    assert not resumed.ema.training and torch.equal(resumed.sampler.sample(2), first)
    plain = tiny_diffusion()  # the same network without dropout, holding the EMA weights
    plain.model.load_state_dict(trainer.ema.model.state_dict())
    trainer.ema = plain.eval()
    assert torch.equal(trainer.sampler.sample(2), first)


def test_checkpoints_keep_the_mean_of_the_images_trained_on_and_a_resumed_run_goes_on_counting(tmp_path):
    trainer = make_trainer(tmp_path, train_steps=3, save_and_sample_every=3)
    trainer.train()
    stream = iter(FakeBatches())
    seen = torch.cat([next(stream).images for _ in range(3)])
    state = ckpt_io.load_checkpoint(tmp_path / "model.pt")["data_mean"]
    assert state["count"].tolist() == [12.0]
    assert torch.allclose(means_from_state(state)[0], seen.mean(dim=0), atol=1e-6)
    assert torch.allclose(trainer.ema.data_mean[0], seen.mean(dim=0), atol=1e-6)
    assert trainer.diffusion.data_mean is None  # training's own estimates (self-conditioning) never take it
    resumed = make_trainer(tmp_path, train_steps=5, save_and_sample_every=5)
    resumed.load(tmp_path / "model.pt")
    assert torch.allclose(resumed.ema.data_mean, trainer.ema.data_mean)  # before any step of its own
    resumed.train()
    seen = torch.cat([seen, next(stream).images, next(stream).images])
    state = ckpt_io.load_checkpoint(tmp_path / "model.pt")["data_mean"]
    assert state["count"].tolist() == [20.0]
    assert torch.allclose(means_from_state(state)[0], seen.mean(dim=0), atol=1e-6)


def test_the_data_mean_counts_each_class_and_a_class_not_seen_takes_the_mean_of_all():
    mean = DataMean(3, (1, 2, 2), "cpu")
    assert means_from_state(mean.state_dict()) is None
    mean.add(torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 2, 2), torch.tensor([0, 0, 1, 1]))
    means = mean.means()
    assert means.shape == (4, 1, 2, 2)
    assert [means[k, 0, 0, 0].item() for k in range(4)] == [0.5, 2.5, 1.5, 1.5]
    assert torch.equal(means_from_state(mean.state_dict()), means)


def test_ema_follows_the_weights_at_the_warm_up_decay(tmp_path):
    trainer = make_trainer(tmp_path, ema_decay=0.9)
    before = [p.clone() for p in trainer.ema.model.parameters()]
    decay = trainer.ema_decay_at(0)
    trainer.train_step()
    assert decay == pytest.approx(1 / (sigma_rel_to_gamma(0.05) + 2))  # (1 + step) / (gamma + 2 + step) at step 0
    for p_ema, p_old, p in zip(trainer.ema.model.parameters(), before, trainer.diffusion.model.parameters()):
        assert torch.allclose(p_ema, decay * p_old + (1 - decay) * p.detach(), atol=1e-6)
    assert trainer.ema_decay_at(10 ** 6) == pytest.approx(0.9)  # capped by --ema_decay


def test_the_warm_up_width_sets_gamma():
    """sigma_rel is the standard deviation of s / S under weights s ** gamma: gamma 8 gives sqrt(9 / 1100) (the
    warm-up (1 + step) / (10 + step)), and a narrower average needs a larger gamma."""
    assert sigma_rel_to_gamma((9 / 1100) ** 0.5) == pytest.approx(8.0, rel=1e-9)
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.28) < 1 < sigma_rel_to_gamma(0.2)


def test_an_ema_wider_than_any_power_function_average_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"--ema_sigma_rel 0.29\d* is not valid: expected a number in \(0, 0.28\]"):
        make_trainer(tmp_path, ema_sigma_rel=MAX_SIGMA_REL + 0.01)


def test_lr_warmup_and_gradient_accumulation(tmp_path):
    trainer = make_trainer(tmp_path, lr_warmup=4, grad_accum=3)
    assert trainer.lr_at(0) == pytest.approx(0.25e-3) and trainer.lr_at(3) == pytest.approx(1e-3)
    trainer.train_step()
    assert trainer.batches.position == 3  # three batches per optimizer step
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.25e-3)


def test_cosine_learning_rate_decay_after_the_warmup(tmp_path):
    trainer = make_trainer(tmp_path, train_steps=10, lr_warmup=2, lr_decay="cosine")
    lrs = [trainer.lr_at(step) for step in range(11)]
    assert lrs[:3] == pytest.approx([0.5e-3, 1e-3, 1e-3])  # warmup, then the peak
    assert lrs[6] == pytest.approx(0.5e-3)  # half-way through the decay
    assert lrs[10] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    trainer.train()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lrs[9])  # the last step's rate was applied
    assert make_trainer(tmp_path, train_steps=10).lr_at(9) == pytest.approx(1e-3)  # no decay by default
    with pytest.raises(ValueError, match="lr_decay"):
        make_trainer(tmp_path, lr_decay="linear")


def test_precision_choice(monkeypatch):
    from runtime import precision as precision_module
    from runtime.precision import choose_precision

    monkeypatch.setattr(precision_module, "cpu_has_bf16", lambda: False)
    assert choose_precision("auto", torch.device("cpu")) == "fp32"
    assert choose_precision("auto", torch.device("mps")) == "fp32"
    monkeypatch.setattr(precision_module, "cpu_has_bf16", lambda: True)
    assert choose_precision("auto", torch.device("cpu")) == "bf16"  # a CPU with bf16 instructions
    assert choose_precision("auto", torch.device("mps")) == "fp32"
    assert choose_precision("fp32", torch.device("cpu")) == "fp32"  # an explicit choice always wins
    monkeypatch.delattr(torch.amp, "GradScaler", raising=False)  # torch before 2.3: a loss scaler on CUDA only
    with pytest.raises(UserError, match="--precision fp16 off a CUDA GPU needs torch 2.3"):
        choose_precision("fp16", torch.device("cpu"))
    assert choose_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError):
        choose_precision("fp8", torch.device("cpu"))


def test_bf16_autocast_step_on_cpu(tmp_path):
    trainer = make_trainer(tmp_path, precision="bf16")
    loss = trainer.train_step()
    assert torch.isfinite(loss)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    straight = make_trainer(tmp_path / "a", train_steps=6)
    straight.train()
    first = make_trainer(tmp_path / "b", train_steps=3)
    first.train()
    resumed = make_trainer(tmp_path / "b", train_steps=6)
    resumed.load(tmp_path / "b" / "model.pt")
    assert resumed.step == 3
    resumed.train()
    a = ckpt_io.load_checkpoint(tmp_path / "a" / "model.pt")
    b = ckpt_io.load_checkpoint(tmp_path / "b" / "model.pt")
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for index, state in a["optimizer"]["state"].items():  # Adam's moments and step counts too
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][index][name])), name
    # the curve continues: every point of the straight run is there (plus the first run's last step)
    assert {r["step"] for r in a["history"]} <= {r["step"] for r in b["history"]} == {2, 3, 4, 6}


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, train_steps=20)
    real = trainer.diffusion.p_loss

    def poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)
        return loss * float("nan") if trainer.step >= 4 else loss

    trainer.diffusion.p_loss = poisoned
    with pytest.raises(TrainingDiverged, match="NaN or infinite"):
        trainer.train()
    ckpt = ckpt_io.load_checkpoint(tmp_path / "model.pt")
    assert ckpt["step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_other_architecture_is_refused_with_the_mismatch(tmp_path):
    make_trainer(tmp_path, train_steps=3).train()
    with pytest.raises(UserError, match="unet_dim=8 in the checkpoint but 16 here; rerun with --unet_dim 8"):
        make_trainer(tmp_path / "x", unet_dim=16).load(tmp_path / "model.pt")


def test_a_network_that_does_not_fit_the_tensors_is_refused_naming_the_first_that_differs(tmp_path):
    make_trainer(tmp_path, train_steps=3).train()
    deeper = make_trainer(tmp_path / "c")
    deeper.diffusion.model = type(deeper.diffusion.model)(8, (1, 2), num_res_blocks=2, image_size=16)
    with pytest.raises(UserError, match=r"does not fit this model: .* has shape \[24\] in the checkpoint but \[32\] "
                                        r"here; rerun with the architecture flags it was trained with"):
        deeper.load(tmp_path / "model.pt")


def test_a_checkpoint_of_another_format_is_refused_naming_the_last_commit_that_reads_it(tmp_path):
    make_trainer(tmp_path, train_steps=3).train()
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    ckpt["format"] = 1
    torch.save(ckpt, tmp_path / "old.pt")
    with pytest.raises(UserError, match=r"old.pt is a checkpoint of format 1, and this code reads format 2; use it "
                                        r"with the code of commit (\w+) \(git checkout \1\)$"):
        make_trainer(tmp_path / "a").load(tmp_path / "old.pt")
    ckpt["format"] = 3
    torch.save(ckpt, tmp_path / "newer.pt")
    with pytest.raises(UserError, match="format 3, and this code reads format 2; update this code"):
        make_trainer(tmp_path / "a").load(tmp_path / "newer.pt")


def test_weight_decay_is_adamw_on_the_kernels_only(tmp_path):
    """One step with --weight_decay 0.1 against the same step without: the kernels end lower by exactly
    lr * wd * w_before (AdamW's decoupled decay), biases and GroupNorm gains match, and so does the result of
    torch's own AdamW given the same split of the parameters."""
    plain = make_trainer(tmp_path / "a", precision="fp32")
    decayed = make_trainer(tmp_path / "b", precision="fp32", weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in decayed.diffusion.model.named_parameters()}
    reference = tiny_diffusion()
    reference.model.load_state_dict(decayed.diffusion.model.state_dict())
    kernels = [p for p in reference.model.parameters() if p.dim() >= 2]
    others = [p for p in reference.model.parameters() if p.dim() < 2]
    adamw = torch.optim.AdamW([{"params": kernels, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
                              lr=1e-3, betas=(0.9, 0.999))
    torch.manual_seed(1)
    plain.train_step()
    torch.manual_seed(1)
    decayed.train_step()
    batch = next(iter(FakeBatches()))  # the trainers' first batch
    torch.manual_seed(1)
    reference.train()
    reference(batch.images).backward()
    torch.nn.utils.clip_grad_norm_(reference.model.parameters(), 1.0)
    adamw.step()
    after_plain = dict(plain.diffusion.model.named_parameters())
    after_ref = dict(reference.model.named_parameters())
    assert any(p.dim() >= 2 for p in before.values()) and any(p.dim() < 2 for p in before.values())
    for name, p in decayed.diffusion.model.named_parameters():
        shrink = 1e-3 * 0.1 * before[name] if p.dim() >= 2 else torch.zeros_like(p)
        assert torch.allclose(after_plain[name] - p, shrink, atol=1e-7), name
        assert torch.allclose(p, after_ref[name], atol=1e-6), name
    with pytest.raises(ValueError, match="weight_decay"):
        make_trainer(tmp_path / "c", weight_decay=-0.1)


def test_broken_checkpoints_are_refused(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        ckpt_io.load_checkpoint(empty)
    make_trainer(tmp_path, train_steps=3).train()
    data = (tmp_path / "model.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or damaged"):
        ckpt_io.load_checkpoint(cut)
    with pytest.raises(UserError, match="does not exist"):
        ckpt_io.load_checkpoint(tmp_path / "nope.pt")
    torch.save({"hello": 1}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="not a checkpoint of this package"):
        ckpt_io.load_checkpoint(tmp_path / "foreign.pt")


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"format": 1, "model": {}, "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="refuses to unpickle"):
        ckpt_io.load_checkpoint(tmp_path / "evil.pt")


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, train_steps=3)
    trainer.train()
    before = (tmp_path / "model.pt").read_bytes()

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match="No space left on device.*previous file there is intact"):
        trainer.save()
    assert (tmp_path / "model.pt").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


class FakeEvaluator:
    """Stands in for fid.FIDEvaluator: records the sample calls and returns scripted FIDs."""

    def __init__(self, scores):
        self.scores, self.calls = list(scores), []

    def evaluate_or_warn(self, sample_fn):
        images = sample_fn(3)
        self.calls.append(images.shape)
        assert images.min() >= 0 and images.max() <= 1
        time.sleep(0.1)  # stands for Inception's time, which the trainer reports apart
        score = self.scores.pop(0)
        return None if score is None else {"fid": score, "kid": score / 100, "fid_samples": 3, "seconds": 0.1}


def test_fid_points_are_logged_and_the_best_checkpoint_kept(tmp_path, capsys):
    from evaluation.metrics import MetricsLogger

    trainer = make_trainer(tmp_path, train_steps=9)
    trainer.evaluator = FakeEvaluator([50.0, 40.0, 45.0])
    trainer.logger = MetricsLogger(tmp_path, config={}, wandb_mode="disabled")
    trainer.train()
    times = time_summary(capsys.readouterr().out)
    assert times["steps"] == 9 and times["fid"] >= 0.3 and times["periodic"] > 0
    fids = [(r["step"], r["fid"]) for r in trainer.history if "fid" in r]
    assert fids == [(3, 50.0), (6, 40.0), (9, 45.0)]
    assert ckpt_io.load_checkpoint(tmp_path / "model_best.pt")["step"] == 6
    assert ckpt_io.load_checkpoint(tmp_path / "model.pt")["best_fid"] == 40.0
    assert (tmp_path / "fid.png").exists() and (tmp_path / "loss.png").exists()
    assert trainer.evaluator.calls == [(3, 3, 16, 16)] * 3


def test_training_goes_on_when_fid_cannot_be_scored(tmp_path):
    trainer = make_trainer(tmp_path, train_steps=6)
    trainer.evaluator = FakeEvaluator([None, None])
    trainer.train()
    assert trainer.step == 6 and not (tmp_path / "model_best.pt").exists()


def test_process_figures_run_in_process_order():
    from evaluation.figures import diffusion_processes

    d = tiny_diffusion(T=20)
    steps, forward, backward, frames = diffusion_processes(d, torch.rand(2, 3, 16, 16) * 2 - 1)
    assert steps == [0, 5, 10, 15, 19]
    assert list(forward) == steps and list(backward) == steps[::-1]
    assert torch.equal(backward[19], forward[19])  # the chain starts from the forward process's last image
    assert len(frames) == 21


def test_a_checkpoint_moves_between_graph_and_eager_optimizer_settings(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.train_step()
    path = trainer.save()
    other = make_trainer(tmp_path / "other")
    other.stepper.graphed = True  # as a --cuda_graph run configures its Adam after loading
    other.load(path, resume=True)
    group = other.optimizer.param_groups[0]
    assert isinstance(group["lr"], torch.Tensor) and group["capturable"] and float(group["lr"]) == pytest.approx(1e-3)
    assert isinstance(other.stepper.ema_weight, torch.Tensor)
    other.stepper.graphed = False
    other.stepper.configure_optimizer()
    group = other.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(1e-3) and not isinstance(group["lr"], torch.Tensor) and not group["capturable"]
