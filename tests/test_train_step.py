"""The training step: one pass against separate passes, fp16 loss scaling on the device, CUDA-graph settings."""
import copy
import itertools

import pytest
import torch

import train_step
from errors import UserError
from helpers import FakeBatches, tiny_diffusion
from trainer import TrainConfig
from train_step import TrainStep, draw_inputs, graph_blocker, use_graph, use_one_pass

CPU = torch.device("cpu")


def make_step(*, precision="fp32", self_condition=True, **config) -> TrainStep:
    torch.manual_seed(0)
    diffusion = tiny_diffusion(self_condition=self_condition)
    ema = copy.deepcopy(diffusion).eval().requires_grad_(False)
    return TrainStep(diffusion, ema, config=TrainConfig(**config), device=CPU, precision=precision)


def batches(count: int, batch_size: int = 4) -> list[torch.Tensor]:
    return list(itertools.islice(iter(FakeBatches(batch_size)), count))


@pytest.mark.parametrize("grad_accum", [2, 3])
def test_one_pass_gives_the_loss_and_gradients_of_separate_passes(grad_accum):
    """k batches as one pass of k x B images: the same timesteps and noise, self-conditioning on the same half of
    the images, the same mean loss and the same gradients as k passes of B, up to float rounding."""
    step_batches = batches(grad_accum)
    results = []
    for one_pass in (False, True):
        step = make_step(grad_accum=grad_accum, one_pass=one_pass)
        torch.manual_seed(7)
        loss = step.forward_backward(step_batches)
        results.append((loss, [p.grad.clone() for p in step.diffusion.model.parameters()]))
    (loss_split, grads_split), (loss_one, grads_one) = results
    torch.testing.assert_close(loss_one, loss_split, rtol=1e-6, atol=1e-7)
    for a, b in zip(grads_one, grads_split):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads_one)


def test_one_pass_draws_what_separate_passes_draw_and_puts_the_self_conditioned_halves_first():
    diffusion = tiny_diffusion(self_condition=True)
    parts = batches(2)
    torch.manual_seed(3)
    separate = [(diffusion.sample_timesteps(4, CPU), torch.randn_like(b)) for b in parts]
    torch.manual_seed(3)
    x, t, noise = draw_inputs(diffusion, parts)
    order = [0, 1, 4, 5, 2, 3, 6, 7]  # first halves of both batches, then the second halves
    assert torch.equal(x, torch.cat(parts)[order])
    assert torch.equal(t, torch.cat([s[0] for s in separate])[order])
    assert torch.equal(noise, torch.cat([s[1] for s in separate])[order])


def test_separate_passes_are_what_the_step_runs_when_asked(monkeypatch):
    step = make_step(grad_accum=2, one_pass=False)
    sizes = []
    real = step.diffusion.p_loss
    monkeypatch.setattr(step.diffusion, "p_loss", lambda x, *a, **k: sizes.append(len(x)) or real(x, *a, **k))
    step.step(batches(2), lr=1e-3, ema_weight=0.1)
    assert sizes == [4, 4]
    step.one_pass = True
    step.step(batches(2), lr=1e-3, ema_weight=0.1)
    assert sizes == [4, 4, 8]


def test_one_pass_by_default_on_the_cpu_only():
    assert use_one_pass("auto", CPU) is True
    assert use_one_pass("auto", torch.device("cuda")) is False  # separate passes until measured on a GPU
    assert use_one_pass("auto", torch.device("mps")) is False
    assert use_one_pass(False, CPU) is False and use_one_pass(True, torch.device("cuda")) is True


def fp16_steps(fused: bool, monkeypatch, *, overflow: bool) -> TrainStep:
    """One fp16 step on the CPU with Adam fused (as on CUDA, where the scaler hands it the overflow flag on the
    device) or not (the scaler checks the flag on the host); ``overflow`` scales the loss past fp16's range."""
    monkeypatch.setattr(train_step, "use_fused_adam", lambda device: fused)
    step = make_step(precision="fp16", weight_decay=0.1)
    assert step.optimizer.defaults["fused"] is fused and step.scaler.is_enabled()
    step.step(batches(1), lr=1e-3, ema_weight=0.5)  # a first step that fits
    if overflow:
        step.scaler.update(2.0 ** 40)  # the scaled gradients overflow fp16
    torch.manual_seed(1)
    step.step(batches(1), lr=1e-3, ema_weight=0.5)
    return step


@pytest.mark.parametrize("overflow", [False, True])
def test_fp16_steps_are_taken_or_skipped_as_the_scaler_decides_with_the_flag_on_the_device(monkeypatch, overflow):
    """The fused Adam of a captured fp16 step takes the scaler's overflow flag and scale on the device; it must
    decide exactly as the host-side check does: take the step, or skip it (Adam's state and the weights but for
    the weight decay untouched) and halve the scale. The EMA moves either way."""
    host = fp16_steps(False, monkeypatch, overflow=overflow)
    device = fp16_steps(True, monkeypatch, overflow=overflow)
    assert device.scaler.get_scale() == host.scaler.get_scale() == (2.0 ** 39 if overflow else 2.0 ** 16)
    for a, b in zip(device.diffusion.model.parameters(), host.diffusion.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    steps = {int(s["step"]) for s in device.optimizer.state.values()}
    assert steps == {int(s["step"]) for s in host.optimizer.state.values()} == {1 if overflow else 2}
    if overflow:  # the skipped step changed the kernels by the weight decay alone, 1 - 1e-3 * 0.1
        one = fp16_steps(True, monkeypatch, overflow=False)
        assert not torch.equal(one.diffusion.model.input_conv.weight, device.diffusion.model.input_conv.weight)


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


def test_cuda_graph_settings():
    cuda = torch.device("cuda")
    assert graph_blocker(cuda, world_size=1, compiled=False) is None  # fp16 included: it is captured too
    assert "single process" in graph_blocker(cuda, world_size=2, compiled=False)
    assert "--compile" in graph_blocker(cuda, world_size=1, compiled=True)
    assert "CUDA GPU" in graph_blocker(CPU, world_size=1, compiled=False)
    assert use_graph(False, cuda, world_size=1, compiled=False) is False
    assert use_graph("auto", CPU, world_size=1, compiled=False) is False
    with pytest.raises(UserError, match="--cuda_graph True: CUDA graphs need a CUDA GPU, and this run is on the CPU"):
        use_graph(True, CPU, world_size=1, compiled=False)


def test_auto_says_in_one_line_why_a_gpu_run_steps_eagerly(capsys):
    cuda = torch.device("cuda")
    assert use_graph("auto", cuda, world_size=2, compiled=False) is False
    assert capsys.readouterr().out == ("training steps run eagerly: CUDA graphs run in a single process, and this "
                                       "run has 2 (torchrun)\n")
    assert use_graph("auto", CPU, world_size=1, compiled=False) is False
    assert capsys.readouterr().out == ""  # nobody expects graphs on a CPU
    with pytest.raises(UserError, match="--compile"):
        use_graph(True, cuda, world_size=1, compiled=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_graphed_steps_train_as_eager_steps_do(precision):
    """Five steps replayed from a captured graph against the same five steps run eagerly, on one GPU."""
    cuda = torch.device("cuda")
    runs = []
    for graph in (False, True):
        torch.manual_seed(0)
        diffusion = tiny_diffusion(self_condition=True).to(cuda)
        ema = copy.deepcopy(diffusion).eval().requires_grad_(False)
        step = TrainStep(diffusion, ema, device=cuda, precision=precision,
                         config=TrainConfig(grad_accum=2, weight_decay=0.1, cuda_graph=graph))
        assert step.graphed is graph
        losses, stream = [], iter(FakeBatches())
        for i in range(5):  # three warm-up steps on a side stream, the capture, one replay
            pair = [next(stream).to(cuda) for _ in range(2)]
            torch.manual_seed(i)
            losses.append(step.step(pair, lr=1e-3 * (i + 1) / 5, ema_weight=0.2).item())
        runs.append((losses, [p.detach().clone() for p in ema.model.parameters()]))
    (eager_losses, eager_ema), (graph_losses, graph_ema) = runs
    assert graph_losses == pytest.approx(eager_losses, rel=1e-2)
    for a, b in zip(graph_ema, eager_ema):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)
