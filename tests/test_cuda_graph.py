"""The reverse chain on static tensors (what a CUDA graph replays) gives the eager loops' images for the same noise."""
import pytest
import torch

from helpers import tiny_diffusion
from sampling_graph import ChainGraph, ChainGraphs


def trained_looking(self_condition: bool, device: str = "cpu"):
    torch.manual_seed(0)
    d = tiny_diffusion(T=12, self_condition=self_condition)
    for p in d.model.parameters():  # weights that make every layer matter (an untrained U-Net predicts zeros)
        torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else None
    return d.to(device).eval()


def generator(device: str = "cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(11)


@pytest.mark.parametrize("self_condition", [False, True])
@pytest.mark.parametrize("sampler, steps", [("ddpm", 12), ("ddim", 5)])
def test_the_static_step_samples_what_the_eager_loops_sample(self_condition, sampler, steps):
    d = trained_looking(self_condition)
    chain = ChainGraph(d, (3, 3, 16, 16), sampler=sampler, steps=steps, capture=False)
    expected = d.sample(3, sampler=sampler, steps=steps, generator=generator())
    assert torch.equal(chain.sample(generator()), expected)
    assert torch.equal(chain.sample(generator()), expected)  # the static tensors start afresh on every run
    assert expected.std() > 0.05  # the images depend on the network


def test_a_partial_chain_with_intermediates_for_the_backward_figure():
    d = trained_looking(True)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    eager, eager_states = d.p_sample_loop(x, start_t=7, return_steps=[7, 3, 0], generator=generator())
    chain = ChainGraph(d, (2, 3, 16, 16), capture=False)
    final, states = chain.run(x, start_t=7, return_steps=[7, 3, 0], generator=generator())
    assert torch.equal(final, eager) and states.keys() == eager_states.keys()
    assert all(torch.equal(states[t], eager_states[t]) for t in states)


def test_one_chain_per_batch_size_and_sampler():
    chains = ChainGraphs(trained_looking(False), steps=4)
    assert chains.get(2, "ddpm") is chains.get(2, "ddpm")
    assert chains.get(2, "ddim") is not chains.get(2, "ddpm") and chains.get(3, "ddpm").shape == (3, 3, 16, 16)
    with pytest.raises(ValueError, match="sampler"):
        ChainGraph(chains.diffusion, (1, 3, 16, 16), sampler="euler")


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_with_cuda_graphs_the_trainer_samples_grids_fid_images_and_figures_through_the_chain(tmp_path, sampler):
    """What a --cuda_graph run does, with the chain's steps run eagerly here: the same grids, FID images and
    backward-process figures as without graphs."""
    from helpers import FakeBatches
    from trainer import TrainConfig, Trainer

    def trainer(folder):
        config = TrainConfig(sampler=sampler, sample_steps=4, precision="fp32")
        t = Trainer(trained_looking(True), FakeBatches(), config=config, device="cpu", save_folder=tmp_path / folder)
        return t

    eager, graphed = trainer("eager"), trainer("graphed")
    graphed.stepper.graphed = True
    graphed._chains = ChainGraphs(graphed.ema, steps=4, capture=False)
    assert torch.equal(graphed.sample(3), eager.sample(3))
    fid_images = [t.fid_sample_fn() for t in (graphed, eager)]
    assert all(torch.equal(a, b) for a, b in zip([fid_images[0](2), fid_images[0](2)], [fid_images[1](2), fid_images[1](2)]))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    for a, b in zip(graphed.visualize(x), eager.visualize(x)):
        assert a.read_bytes() == b.read_bytes()
    assert {key[1] for key in graphed._chains._chains} == {sampler, "ddpm"}  # the figure runs the full chain


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("sampler, steps", [("ddpm", 12), ("ddim", 5)])
def test_the_captured_chain_samples_what_the_eager_loops_sample_on_a_gpu(sampler, steps):
    d = trained_looking(True, "cuda")
    chain = ChainGraph(d, (4, 3, 16, 16), sampler=sampler, steps=steps)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = d.sample(4, sampler=sampler, steps=steps, generator=generator("cuda"))
        first = chain.sample(generator("cuda"))  # warm-up, capture, replays
        again = chain.sample(generator("cuda"))  # replays only
    assert chain._captured.graph is not None
    torch.testing.assert_close(first, expected, rtol=0, atol=2e-3)
    torch.testing.assert_close(again, expected, rtol=0, atol=2e-3)
