"""The training step: one pass against separate passes, fp16 loss scaling on the device, captured steps."""
import copy
import itertools

import pytest
import torch

from helpers import FakeBatches, tiny_diffusion
from imagedata.batches import Batch
from runtime.memory import activation_bytes_per_image
from settings.config import Config
from training import step as train_step
from training.build import ema_copy
from training.step import TrainStep, use_one_pass

CPU = torch.device("cpu")


def cpu_fused_adam() -> bool:
    """Whether this torch has fused AdamW on the CPU (2.4 and newer), the stand-in these tests use for CUDA's."""
    try:
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True)
    except RuntimeError:
        return False
    return True


needs_cpu_fused_adam = pytest.mark.skipif(not cpu_fused_adam(), reason="fused AdamW on the CPU needs torch 2.4")


def make_step(*, precision="fp32", self_condition=True, trained_output=False, **config) -> TrainStep:
    """A step on a tiny U-Net; ``trained_output`` gives its last layer weights, so that its output, and with it
    the loss, depends on everything before it (the zero-initialised layer makes the first loss the noise's size)."""
    torch.manual_seed(0)
    diffusion = tiny_diffusion(self_condition=self_condition)
    if trained_output:
        torch.nn.init.normal_(diffusion.model.output[-1].weight, std=0.1)
    ema = ema_copy(diffusion)
    config = Config(**{"grad_accum": 1, "weight_decay": 0.0, **config})  # plain Algorithm 1 unless asked
    return TrainStep(diffusion, ema, config=config, device=CPU, precision=precision, batch_size=4)


def batches(count: int, batch_size: int = 4) -> list[Batch]:
    return list(itertools.islice(iter(FakeBatches(batch_size)), count))


@pytest.mark.parametrize("grad_accum, batch_size", [(2, 4), (3, 4), (2, 3)])
def test_one_pass_gives_the_loss_and_gradients_of_separate_passes(grad_accum, batch_size):
    """k batches as one pass of k x B images: the same timesteps and noise, self-conditioning on the same images
    (B // 2 of each batch, also for an odd B), the same mean loss and the same gradients as k passes of B, up to
    float rounding."""
    step_batches = batches(grad_accum, batch_size)
    results = []
    for one_pass in (False, True):
        step = make_step(grad_accum=grad_accum, one_pass=one_pass, trained_output=True)
        assert step.one_pass is one_pass
        torch.manual_seed(7)
        loss = step.forward_backward(step_batches)
        results.append((loss, [p.grad.clone() for p in step.diffusion.model.parameters()]))
    (loss_split, grads_split), (loss_one, grads_one) = results
    torch.testing.assert_close(loss_one, loss_split, rtol=1e-6, atol=1e-7)
    for a, b in zip(grads_one, grads_split):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads_one)


def test_a_loaded_optimizer_takes_this_runs_settings_by_group_name():
    """A checkpoint's AdamW state brings its moments; the weight decay and learning rate are this run's, put into
    each group by its name, also for a checkpoint whose groups have no names."""
    old = make_step(weight_decay=0.3, learning_rate=5e-4)
    old.step(batches(1), lr=5e-4, ema_weight=0.1)
    named = old.optimizer.state_dict()
    unnamed = copy.deepcopy(named)
    for group in unnamed["param_groups"]:
        del group["name"]
    for saved in (named, unnamed):
        new = make_step(weight_decay=0.05, learning_rate=2e-3)
        new.load_state_dict({"optimizer": saved})
        groups = {group["name"]: group for group in new.optimizer.param_groups}
        assert (groups["decay"]["weight_decay"], groups["no_decay"]["weight_decay"]) == (0.05, 0.0)
        assert groups["decay"]["lr"] == groups["no_decay"]["lr"] == 2e-3
        assert all(p.dim() >= 2 for p in groups["decay"]["params"])
        assert all(p.dim() < 2 for p in groups["no_decay"]["params"])
        pairs = zip(new.diffusion.model.parameters(), old.diffusion.model.parameters())
        assert all(torch.equal(new.optimizer.state[a]["exp_avg"], old.optimizer.state[b]["exp_avg"]) for a, b in pairs)


def test_one_pass_by_default_where_the_steps_activations_fit_a_quarter_of_the_free_memory():
    gib, cuda = 2 ** 30, torch.device("cuda")
    assert use_one_pass("auto", CPU, step_bytes=gib, free=8 * gib) is True
    assert use_one_pass("auto", CPU, step_bytes=3 * gib, free=8 * gib) is False  # over a quarter: a pass per batch
    assert use_one_pass("auto", cuda, step_bytes=gib, free=4 * gib) is True
    assert use_one_pass("auto", cuda, step_bytes=2 * gib, free=4 * gib) is False
    assert use_one_pass("auto", torch.device("mps"), step_bytes=0, free=None) is False
    assert use_one_pass(False, CPU, step_bytes=0, free=None) is False
    assert use_one_pass(True, cuda, step_bytes=gib, free=gib) is True
    assert make_step(grad_accum=2).one_pass is True  # a tiny step fits anywhere
    assert make_step(grad_accum=1).one_pass is False  # one batch: nothing to join


def test_the_activation_estimate_grows_with_the_image_area_and_leaves_the_rng_alone():
    """The estimate behind ``--one_pass auto``: one forward pass's layer outputs, which grow with the pixels."""
    small, large = tiny_diffusion(size=16, dropout=0.5), tiny_diffusion(size=32, dropout=0.5)
    large.model.train()
    before = torch.get_rng_state()
    ratio = activation_bytes_per_image(large) / activation_bytes_per_image(small)
    assert torch.equal(torch.get_rng_state(), before) and large.model.training  # no dropout drawn, mode restored
    assert 3.8 < ratio < 4.0  # all but the time embedding scales with the pixels


def test_the_step_reads_its_learning_rate_and_ema_weight_from_tensors_as_a_captured_step_does():
    """A captured step reads the learning rate and the EMA's weight from 0-dim device tensors, refilled before
    each replay; the same body run with tensors on the CPU must train as with plain numbers."""
    plain, tensors = make_step(grad_accum=2, weight_decay=0.1), make_step(grad_accum=2, weight_decay=0.1)
    for i, pair in enumerate(itertools.islice(zip(*[iter(FakeBatches())] * 2), 3)):
        lr, weight = 1e-3 * (i + 1) / 3, 0.5 / (i + 1)
        torch.manual_seed(i)
        expected = plain.step(list(pair), lr=lr, ema_weight=weight)
        for group in tensors.optimizer.param_groups:
            group["lr"] = torch.tensor(lr)
        tensors.ema_weight = torch.tensor(weight)
        torch.manual_seed(i)
        loss = tensors.body(list(pair))
        tensors.optimizer.zero_grad(set_to_none=True)
        torch.testing.assert_close(loss, expected)
        # float32 tensors round apart from Python's doubles by an ulp or two (the decay factor 1 - lr * wd, Adam's
        # step size, the EMA's tensor form ema + w (model - ema) against torch.lerp), which Adam's next steps carry
        # up to about 1e-6 where a gradient is near zero; a stale learning rate or weight would be off by 1e-4
        for a, b in zip([*tensors.ema.parameters(), *tensors.diffusion.parameters()],
                        [*plain.ema.parameters(), *plain.diffusion.parameters()]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def fp16_steps(fused: bool, monkeypatch, *, overflow: bool) -> tuple[TrainStep, list[torch.Tensor]]:
    """Two fp16 steps on the CPU with AdamW fused (as on CUDA, where the scaler hands it the overflow flag on the
    device) or not (the scaler checks the flag on the host); ``overflow`` scales the second loss past fp16's
    range. Returns the step and the weights after its first step."""
    monkeypatch.setattr(train_step, "use_fused_adam", lambda device: fused)
    step = make_step(precision="fp16", weight_decay=0.1)
    assert step.optimizer.defaults["fused"] is fused and step.scaler.is_enabled()
    step.step(batches(1), lr=1e-3, ema_weight=0.5)  # a first step that fits
    first = [p.detach().clone() for p in step.diffusion.model.parameters()]
    if overflow:
        step.scaler.update(2.0 ** 40)  # the scaled gradients overflow fp16
    torch.manual_seed(1)
    step.step(batches(1), lr=1e-3, ema_weight=0.5)
    return step, first


@needs_cpu_fused_adam
@pytest.mark.parametrize("overflow", [False, True])
def test_fp16_steps_are_taken_or_skipped_as_the_scaler_decides_with_the_flag_on_the_device(monkeypatch, overflow):
    """The fused AdamW of a captured fp16 step takes the scaler's overflow flag and scale on the device; it must
    decide exactly as the host-side check does: take the step, or skip it (AdamW's state and the weights
    untouched) and halve the scale. The EMA moves either way."""
    host, _ = fp16_steps(False, monkeypatch, overflow=overflow)
    device, first = fp16_steps(True, monkeypatch, overflow=overflow)
    assert device.scaler.get_scale() == host.scaler.get_scale() == (2.0 ** 39 if overflow else 2.0 ** 16)
    for a, b in zip(device.diffusion.model.parameters(), host.diffusion.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    steps = {int(s["step"]) for s in device.optimizer.state.values()}
    assert steps == {int(s["step"]) for s in host.optimizer.state.values()} == {1 if overflow else 2}
    moved = [not torch.equal(a, b) for a, b in zip(device.diffusion.model.parameters(), first)]
    assert not any(moved) if overflow else all(moved)


@needs_cpu_fused_adam
def test_loading_a_checkpoint_keeps_this_devices_adam(monkeypatch):
    """A checkpoint written with plain Adam (on a CPU) resumed where Adam is fused (CUDA) stays fused: the
    scaler's on-device overflow flag only works with the fused kernel."""
    plain = make_step()
    plain.step(batches(1), lr=1e-3, ema_weight=0.5)
    monkeypatch.setattr(train_step, "use_fused_adam", lambda device: True)
    fused = make_step()
    fused.load_state_dict(plain.state_dict())
    assert all(group["fused"] for group in fused.optimizer.param_groups)
    fused.step(batches(1), lr=1e-3, ema_weight=0.5)


def cuda_step(precision: str, graph: bool, **config) -> TrainStep:
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    diffusion = tiny_diffusion(self_condition=True).to(cuda)
    torch.nn.init.normal_(diffusion.model.output[-1].weight, std=0.1)
    ema = copy.deepcopy(diffusion).eval().requires_grad_(False)
    step = TrainStep(diffusion, ema, device=cuda, precision=precision, batch_size=4,
                     config=Config(**{"cuda_graph": graph, **config}))
    assert step.graphed is graph
    return step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("precision, one_pass", [("fp32", False), ("bf16", False), ("bf16", True), ("fp16", False)])
def test_graphed_steps_train_as_eager_steps_do(precision, one_pass):
    """Six steps, the learning rate and the EMA's weight changing at each, replayed from a captured graph (after
    three warm-up steps on a side stream and the capture) against the same steps run eagerly, on one GPU."""
    runs = []
    for graph in (False, True):
        step, losses, stream = cuda_step(precision, graph, one_pass=one_pass), [], iter(FakeBatches())
        for i in range(6):
            pair = [next(stream).cuda() for _ in range(2)]
            torch.manual_seed(i)
            losses.append(step.step(pair, lr=1e-3 * (i + 1) / 6, ema_weight=0.5 / (i + 1)).item())
        runs.append((losses, [p.detach().clone() for p in step.ema.model.parameters()]))
    (eager_losses, eager_ema), (graph_losses, graph_ema) = runs
    assert graph_losses == pytest.approx(eager_losses, rel=1e-3)
    for a, b in zip(graph_ema, eager_ema):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_a_replayed_fp16_step_whose_gradients_overflow_is_skipped_and_halves_the_scale():
    step, stream = cuda_step("fp16", True), iter(FakeBatches())
    for i in range(5):  # warm-up, capture, one replay
        step.step([next(stream).cuda() for _ in range(2)], lr=1e-3, ema_weight=0.1)
    assert step.captured.graph is not None
    steps_before = {int(s["step"]) for s in step.optimizer.state.values()}
    weights = [p.detach().clone() for p in step.diffusion.model.parameters()]
    step.scaler.update(2.0 ** 40)  # fills the scale tensor the graph reads: the scaled gradients overflow
    step.step([next(stream).cuda() for _ in range(2)], lr=1e-3, ema_weight=0.1)
    assert step.scaler.get_scale() == 2.0 ** 39
    assert {int(s["step"]) for s in step.optimizer.state.values()} == steps_before  # AdamW skipped the step
    assert all(torch.equal(before, after) for before, after in zip(weights, step.diffusion.model.parameters()))
