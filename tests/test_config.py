"""Every setting declared once: the parser, the defaults, the checks and the roles all come from ``Config``."""
from dataclasses import fields

import pytest
import torch

from sampling.model import build_diffusion
from settings.cli import parse
from settings.config import ROLES, Config, names, recorded, show

TINY = dict(image_size=16, time_steps=10, unet_dim=8, dim_mults=(1, 2), num_res_blocks=1)


@pytest.mark.parametrize("name", [f.name for f in fields(Config) if f.default is not None])
def test_every_setting_is_a_flag_that_reads_its_own_default_as_written(name):
    """The text ``--help`` and README show as a setting's default parses back to that default."""
    default = getattr(Config(), name)
    config, named = parse([f"--{name}", *show(default).split(" ")])
    assert named == {name} and config == Config()


def test_every_setting_has_a_role_help_and_a_group():
    for f in fields(Config):
        assert f.metadata["role"] in ROLES and f.metadata["help"] and f.metadata["group"], f.name


def network_fingerprint(config: Config) -> dict:
    """What a built network is: its tensors' names and shapes (the schedule's among them), and the images it makes."""
    diffusion = build_diffusion(config, ("a", "b", "c") if config.class_conditional else ())  # on three classes
    shapes = {name: tuple(t.shape) for name, t in diffusion.state_dict().items()}
    return {**shapes, "images": (diffusion.channels, diffusion.image_size)}


# a value other than TINY's for each setting that could change the network
OTHER = dict(image_size=32, time_steps=12, unet_dim=16, dim_mults=(1, 2, 2), num_res_blocks=2,
             attention_levels=(0,), self_condition=False, dropout=0.2, loss="l2", class_conditional=True,
             class_dropout=0.3, guidance=3.0)


@pytest.mark.parametrize("name", sorted(OTHER))
def test_the_network_role_is_exactly_the_settings_that_change_the_network(name):
    """A network setting changes the tensors a checkpoint holds (so loading must adopt it); the others do not."""
    base = Config(**TINY)
    changed = network_fingerprint(base) != network_fingerprint(base.replace(**{name: OTHER[name]}))
    assert changed is (name in names("network")), name


def test_a_checkpoint_hands_on_its_network_and_with_a_resume_its_training_settings():
    saved = Config(**TINY, learning_rate=5e-4, save_folder="elsewhere").to_dict()
    assert recorded(saved, training=False) == {k: saved[k] for k in names("network")}
    on_resume = recorded(saved, training=True)
    assert on_resume["learning_rate"] == 5e-4 and on_resume["dim_mults"] == (1, 2)
    assert "save_folder" not in on_resume and "train_steps" not in on_resume  # how this run behaves is its own


@pytest.mark.parametrize("values, message", [
    (dict(batch_size=0), "--batch_size 0 is not valid: expected a positive integer"),
    (dict(batch_size=True), "--batch_size True is not valid"),
    (dict(learning_rate=0.0), "--learning_rate 0.0 is not valid: expected a learning rate in (0, 1]"),
    (dict(learning_rate=float("nan")), "--learning_rate nan is not valid"),
    (dict(sampler="euler"), "--sampler euler is not valid: expected one of ancestral, ddpm, ddim"),
    (dict(dim_mults=()), "--dim_mults  is not valid"),
    (dict(one_pass="sometimes"), "--one_pass sometimes is not valid: expected auto, True or False"),
    (dict(attention_levels=(4,)), "--attention_levels 4 must be below the number of --dim_mults (4)"),
    (dict(sampler="ddim", sample_steps=60), "--sample_steps 60 is more than --time_steps 50; lower it"),
    (dict(sample=4), "--sample needs a trained model: add --load_path"),
])
def test_a_bad_value_is_refused_naming_its_flag(values, message):
    with pytest.raises(ValueError) as info:
        Config(**values)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_the_command_line_says_a_bad_value_in_one_line_and_exits_2(capsys):
    for argv in (["--batch_size", "0"], ["--sample_steps", "60", "--sampler", "ddim"], ["--visualize"]):
        with pytest.raises(SystemExit) as info:
            parse(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("main.py: error: ") and err[0].endswith("lists every flag)")
        assert argv[0] in err[0]  # names the flag


def test_list_settings_are_tuples_however_given():
    assert Config(dim_mults=[1, 2]).dim_mults == (1, 2)
    assert parse(["--dim_mults", "1", "2", "--attention_levels", "1"])[0].attention_levels == (1,)


def test_a_resumed_run_can_be_built_from_what_a_checkpoint_records(tmp_path):
    """The recorded settings round-trip through a checkpoint's torch.save (weights_only) into a Config."""
    saved = Config(**TINY, attention_levels=(1,)).to_dict()
    torch.save({"config": saved}, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)["config"]
    assert Config().replace(**recorded(loaded, training=True)) == Config(**TINY, attention_levels=(1,))
