"""CUDA graphs: when a run may use them, and the reverse step on static tensors (what a graph replays), which
gives the eager chain's images for the same noise."""
import pytest
import torch

from helpers import FakeBatches, tiny_diffusion
from runtime.errors import UserError
from runtime.graphs import graph_blocker, sample_with_graphs, train_with_graphs
from sampling.captured_step import ChainStep, ChainSteps
from settings.config import Config

CPU = torch.device("cpu")


def trained_looking(self_condition: bool, device: str = "cpu"):
    torch.manual_seed(0)
    d = tiny_diffusion(T=12, self_condition=self_condition)
    for p in d.model.parameters():  # weights that make every layer matter (an untrained U-Net predicts zeros)
        torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else None
    return d.to(device).eval()


def generator(device: str = "cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(11)


def test_cuda_graph_settings():
    cuda = torch.device("cuda")
    assert graph_blocker(cuda, world_size=1, compiled=False) is None  # fp16 included: it is captured too
    assert "single process" in graph_blocker(cuda, world_size=2, compiled=False)
    assert "--compile" in graph_blocker(cuda, world_size=1, compiled=True)
    assert "CUDA GPU" in graph_blocker(CPU, world_size=1, compiled=False)
    assert train_with_graphs(False, cuda, world_size=1, compiled=False) is False
    assert train_with_graphs("auto", CPU, world_size=1, compiled=False) is False
    with pytest.raises(UserError, match="--cuda_graph True: CUDA graphs need a CUDA GPU, and this run is on the CPU"):
        train_with_graphs(True, CPU, world_size=1, compiled=False)


def test_auto_says_in_one_line_why_a_gpu_run_steps_eagerly(capsys):
    cuda = torch.device("cuda")
    assert train_with_graphs("auto", cuda, world_size=2, compiled=False) is False
    assert capsys.readouterr().out == ("training steps run eagerly: CUDA graphs run in a single process, and this "
                                       "run has 2 (torchrun)\n")
    assert train_with_graphs("auto", CPU, world_size=1, compiled=False) is False
    assert capsys.readouterr().out == ""  # nobody expects graphs on a CPU
    with pytest.raises(UserError, match="--compile"):
        train_with_graphs(True, cuda, world_size=1, compiled=True)


def test_sampling_asks_its_own_question():
    """Sampling runs in one process on the uncompiled EMA copy: a CUDA GPU is all it needs."""
    cuda = torch.device("cuda")
    assert sample_with_graphs("auto", cuda) and sample_with_graphs(True, cuda)
    assert not train_with_graphs("auto", cuda, world_size=2, compiled=True, announce=False)
    assert not sample_with_graphs(False, cuda) and not sample_with_graphs("auto", CPU)


@pytest.mark.parametrize("self_condition", [False, True])
@pytest.mark.parametrize("sampler, steps, eta", [("ddpm", None, 0.0), ("ddim", 5, 0.0), ("ddim", 5, 0.5),
                                                 ("dpmpp_2m", 5, 0.0), ("dpmpp_2m_sde", 5, 0.0)])
def test_the_static_step_samples_what_the_eager_chain_samples(self_condition, sampler, steps, eta):
    d = trained_looking(self_condition)
    step = ChainStep(d, (3, 3, 16, 16), sampler=sampler, eta=eta, capture=False)
    expected = d.sample(3, sampler=sampler, steps=steps, eta=eta, generator=generator())
    assert torch.equal(d.sample(3, sampler=sampler, steps=steps, eta=eta, generator=generator(), step=step), expected)
    # the static tensors start afresh on every run
    assert torch.equal(d.sample(3, sampler=sampler, steps=steps, eta=eta, generator=generator(), step=step), expected)
    assert expected.std() > 0.05  # the images depend on the network


def test_the_static_step_reads_the_data_mean_the_model_holds_when_it_runs():
    d = trained_looking(True)
    d.set_data_mean(torch.full((1, 3, 16, 16), -0.5))
    step = ChainStep(d, (3, 3, 16, 16), sampler="ancestral", capture=False)
    first = d.sample(3, sampler="ancestral", steps=5, generator=generator(), step=step)
    assert torch.equal(first, d.sample(3, sampler="ancestral", steps=5, generator=generator()))
    d.set_data_mean(torch.full((1, 3, 16, 16), 0.5))  # as training updates it between grids: in place
    again = d.sample(3, sampler="ancestral", steps=5, generator=generator(), step=step)
    assert torch.equal(again, d.sample(3, sampler="ancestral", steps=5, generator=generator()))
    assert not torch.equal(again, first)


def test_a_partial_chain_with_intermediates_for_the_backward_figure():
    d = trained_looking(True)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    eager, eager_states = d.p_sample_loop(x, start_t=7, return_steps=[7, 3, 0], generator=generator())
    step = ChainStep(d, (2, 3, 16, 16), sampler="ddpm", capture=False)
    final, states = d.p_sample_loop(x, start_t=7, return_steps=[7, 3, 0], generator=generator(), step=step)
    assert torch.equal(final, eager) and states.keys() == eager_states.keys() == {7, 3, 0}
    assert all(torch.equal(states[t], eager_states[t]) for t in states)


def test_one_step_per_batch_size_and_sampler():
    steps = ChainSteps(trained_looking(False))
    assert steps.get(2, "ddpm") is steps.get(2, "ddpm")
    assert steps.get(2, "ddim") is not steps.get(2, "ddpm") and steps.get(3, "ddpm").x.shape == (3, 3, 16, 16)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_with_cuda_graphs_the_trainer_samples_grids_fid_images_and_figures_through_the_static_step(tmp_path, sampler):
    """What a --cuda_graph run does, with the static steps run eagerly here: the same grids and FID images in
    training, and the same backward-process figures from a trained model, as without graphs."""
    from sampling.commands import visualize
    from sampling.model import LoadedModel
    from trainer import Trainer

    def trainer(folder, graphed: bool):
        config = Config(image_size=16, time_steps=12, unet_dim=8, dim_mults=(1, 2), num_res_blocks=1,
                        sampler=sampler, sample_steps=4, precision="fp32", save_folder=str(tmp_path / folder))
        t = Trainer(trained_looking(True), FakeBatches(), config=config, device="cpu")
        model = LoadedModel.of(t.ema, config)
        if graphed:  # what --cuda_graph sets up on a GPU, with capture off
            t.sampler.chain_steps = ChainSteps(t.ema, capture=False)
            model.sampler.chain_steps = ChainSteps(t.ema, capture=False)
        return t, model

    (eager, eager_model), (graphed, graphed_model) = trainer("eager", False), trainer("graphed", True)
    assert eager.sampler.chain_steps is None  # on the CPU the chain runs eagerly
    assert torch.equal(graphed.sampler.sample(3), eager.sampler.sample(3))
    fid_images = [t.sampler.fid_sample_fn() for t in (graphed, eager)]
    assert all(torch.equal(a, b) for a, b in zip([fid_images[0](2), fid_images[0](2)], [fid_images[1](2), fid_images[1](2)]))
    assert set(graphed.sampler.chain_steps.made()) == {(3, sampler, 0.0), (2, sampler, 0.0)}  # the grid, FID
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    for a, b in zip(visualize(graphed_model, x), visualize(eager_model, x)):
        assert a.read_bytes() == b.read_bytes()
    assert graphed_model.sampler.chain_steps.made() == [(2, "ddpm", 0.0)]  # the figure's full DDPM chain


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("sampler, steps", [("ddpm", None), ("ddim", 5), ("dpmpp_2m", 5), ("dpmpp_2m_sde", 5)])
def test_the_captured_step_samples_what_the_eager_chain_samples_on_a_gpu(sampler, steps):
    d = trained_looking(True, "cuda")
    d.set_data_mean(torch.full((1, 3, 16, 16), -0.5, device="cuda"))
    step = ChainStep(d, (4, 3, 16, 16), sampler=sampler)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = d.sample(4, sampler=sampler, steps=steps, generator=generator("cuda"))
        first = d.sample(4, sampler=sampler, steps=steps, generator=generator("cuda"), step=step)  # warm-up, capture
        again = d.sample(4, sampler=sampler, steps=steps, generator=generator("cuda"), step=step)  # replays only
        d.set_data_mean(torch.full((1, 3, 16, 16), 0.5, device="cuda"))  # in place: the replay reads it
        moved = d.sample(4, sampler=sampler, steps=steps, generator=generator("cuda"))
        replayed = d.sample(4, sampler=sampler, steps=steps, generator=generator("cuda"), step=step)
    assert step.captured.graph is not None
    torch.testing.assert_close(first, expected, rtol=0, atol=2e-3)
    torch.testing.assert_close(again, expected, rtol=0, atol=2e-3)
    torch.testing.assert_close(replayed, moved, rtol=0, atol=2e-3)


def test_inpainting_candidates_run_every_fill_through_one_static_step(tmp_path):
    """``--candidates 3`` on 2 images, replacement (no backward pass, so a graph may run it): the static step is
    made for the 6 chains, and the consensus is the eager run's."""
    from sampling.model import LoadedModel

    d = trained_looking(True)
    config = Config(image_size=16, time_steps=12, unet_dim=8, dim_mults=(1, 2), num_res_blocks=1, sampler="ddim",
                    sample_steps=4, precision="fp32", resample=1, candidates=3, save_folder=str(tmp_path))
    eager, graphed = LoadedModel.of(d, config).sampler, LoadedModel.of(d, config).sampler
    graphed.chain_steps = ChainSteps(d, capture=False)
    images, keep = torch.rand(2, 3, 16, 16), torch.ones(1, 1, 16, 16)
    keep[..., 8:, :] = 0
    assert torch.equal(graphed.edit(images, keep=keep), eager.edit(images, keep=keep))
    assert graphed.chain_steps.made() == [(6, "ddim", 0.0)]
