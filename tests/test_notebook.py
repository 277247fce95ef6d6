"""run_in_colab.ipynb: its settings cell, the commands it runs, and a whole run of it in a real Jupyter kernel.

The notebook's commands are ``run(f"...")`` calls whose f-strings read the settings cell (tagged ``parameters``,
papermill's convention). The static tests render them with the settings' defaults, which must be the
assignment's runs; the end-to-end test executes every cell with papermill on the CPU, offline, scaled down.
"""
import ast
import base64
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import nbformat
import papermill
import pytest
from IPython.core.inputtransformer2 import TransformerManager
from PIL import Image

from cli import build_parser, check_args
from helpers import TINY_FLAGS, make_image_folder

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "run_in_colab.ipynb"
SITE = Path(__file__).resolve().parent / "notebook_site"  # sitecustomize.py: the FID tests' stand-in Inception

# What the notebook runs with its default settings: the assignment's commands (README, report questions)
DEFAULT_COMMANDS = [
    "git clone -q https://github.com/your-name/ddpm-afhq.git ddpm-afhq",
    "python -m pip install -q -r requirements.txt",
    "python main.py --train_steps 1000 --save_and_sample_every 500 --data_path ./data/train "
    "--save_folder results/steps1k",
    "python main.py --train_steps 1000 --save_and_sample_every 100 --fid --data_path ./data/train "
    "--save_folder results/fid1k",
    "python main.py --load_path results/steps1k/model.pt --visualize --data_path ./data/train "
    "--save_folder results/steps1k",
    "python main.py --train_steps 10000 --save_and_sample_every 1000 --fid False --data_path ./data/train "
    "--save_folder results/steps10k",
]


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def python_of(cell) -> ast.Module:
    """A code cell as Python (IPython's ``!`` and ``%`` lines become calls), parsed."""
    return ast.parse(TransformerManager().transform_cell(cell.source))


def parameters_cell(nb):
    [cell] = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    return cell


def settings(nb) -> dict:
    namespace = {}
    exec(parameters_cell(nb).source, namespace)
    return {k: v for k, v in namespace.items() if k != "__builtins__"}


def commands(nb, values: dict) -> list[str]:
    """The command line of every ``run(...)`` call in the notebook, in order, with ``values`` for the settings."""
    found = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for node in ast.walk(python_of(cell)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "run":
                [argument] = node.args
                found.append(eval(compile(ast.Expression(argument), "<run argument>", "eval"), {"os": os, **values}))
    return found


def test_notebook_is_valid_nbformat():
    nb = read_notebook()
    nbformat.validate(nb)
    assert sum(cell.cell_type == "code" for cell in nb.cells) >= 8


def test_one_settings_cell_near_the_top_that_every_later_cell_reads():
    nb = read_notebook()
    code = [c for c in nb.cells if c.cell_type == "code"]
    cell = parameters_cell(nb)
    assert "nvidia-smi" in code[0].source and code[1] is cell  # the GPU check first, then the settings
    tree = ast.parse(cell.source)
    assert all(isinstance(s, ast.Assign) and isinstance(s.value, ast.Constant) for s in tree.body)  # papermill's -p
    names = set(settings(nb))
    assert {"REPO_URL", "DATA_PATH", "LOSS_STEPS", "FID_EVERY", "LONG_STEPS", "EXTRA_FLAGS"} <= names
    read_later = {node.id for c in code[2:] for node in ast.walk(python_of(c)) if isinstance(node, ast.Name)}
    assert names <= read_later, names - read_later
    assert "only this one" in "".join(c.source for c in nb.cells if c.cell_type == "markdown")


def test_default_settings_run_the_assignments_commands():
    nb = read_notebook()
    rendered = commands(nb, settings(nb))
    assert [shlex.split(c) for c in rendered] == [shlex.split(c) for c in DEFAULT_COMMANDS]
    parser = build_parser()
    for line in rendered:
        if line.startswith("python main.py"):
            check_args(parser, parser.parse_args(shlex.split(line)[2:]))
    flags = commands(nb, {**settings(nb), "EXTRA_FLAGS": "--wandb disabled --fid_samples 512"})
    assert all(c.endswith(" --wandb disabled --fid_samples 512") for c in flags if c.startswith("python main.py"))


def test_the_notebook_covers_the_report_questions():
    nb = read_notebook()
    text = NOTEBOOK.read_text()
    for needle in ("results/steps1k/loss.png", "results/fid1k/fid.png", "forward_process.png",
                   "backward_process.png", 'sample-{LONG_STEPS}.png', "nvidia-smi", "requirements.txt"):
        assert needle in text, needle
    assert settings(nb)["LONG_STEPS"] == 10000
    assert not any("torch" in c.split() for c in commands(nb, settings(nb)) if "pip" in c)  # keeps Colab's torch


def notebook_helpers() -> dict:
    """The names the notebook's helper cell defines (``run``, ``CommandFailed``)."""
    [helper] = [c for c in read_notebook().cells if c.cell_type == "code" and "def run(" in c.source]
    namespace = {}
    exec(compile(python_of(helper), "<helper cell>", "exec"), namespace)
    return namespace


def test_a_failing_command_stops_its_cell(capsys):
    """The notebook's ``run`` raises when a command exits non-zero (a ``!`` line would not), with one line."""
    namespace = notebook_helpers()
    namespace["run"]("python -c \"print('from the child')\"")
    assert "from the child" in capsys.readouterr().out
    with pytest.raises(namespace["CommandFailed"], match="exited with code 3; the lines above say why") as failed:
        namespace["run"]("python -c \"import sys; print('bad flag'); sys.exit(3)\"")
    assert "bad flag" in capsys.readouterr().out
    assert len(failed.value._render_traceback_()) == 1


def test_the_stop_button_lets_the_command_save_and_then_stops_the_cell(tmp_path, capsys):
    """An interrupt of the kernel (Jupyter's stop button) reaches the command once as SIGINT, which main.py
    answers by saving a checkpoint; ``run`` waits for that, then raises KeyboardInterrupt."""
    ready = tmp_path / "ready"
    child = ("import pathlib, signal, sys, time\n"
             "signal.signal(signal.SIGINT, lambda *_: (print('saved on SIGINT', flush=True), sys.exit(130)))\n"
             f"pathlib.Path({str(ready)!r}).touch()\n"
             "time.sleep(60)\n")

    def interrupt_when_ready():
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)  # Python raises KeyboardInterrupt in the main thread, as in a kernel

    threading.Thread(target=interrupt_when_ready, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        notebook_helpers()["run"](f"python -c {shlex.quote(child)}")
    assert "saved on SIGINT" in capsys.readouterr().out and time.monotonic() - started < 50


def snapshot_repository(dest: Path) -> Path:
    """A git repository holding the working tree's files (committed or not, ignored ones left out), for the
    notebook to clone: what is tested is the code as it is on disk."""
    dest.mkdir()
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        if (ROOT / name).is_file():  # a tracked file deleted on disk is left out
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    git = ["git", "-c", "user.name=notebook test", "-c", "user.email=notebook-test@example.invalid",
           "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "working tree"]):
        subprocess.run([*git, *args], cwd=dest, check=True, capture_output=True)
    return dest


def png_outputs(cell) -> list[bytes]:
    return [base64.b64decode(o["data"]["image/png"]) for o in cell.outputs if "image/png" in o.get("data", {})]


def test_the_notebook_runs_top_to_bottom_in_a_kernel(tmp_path, monkeypatch):
    repo = snapshot_repository(tmp_path / "repo")
    data = make_image_folder(tmp_path / "afhq", count=12, size=24)
    work = tmp_path / "colab"
    work.mkdir()
    # the kernel and the main.py runs it starts: FID with the stand-in network; pip never reaches an index
    paths = [str(SITE), str(SITE.parent), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    extra = [*TINY_FLAGS, "--precision", "fp32", "--fid_samples", "8"]
    out = papermill.execute_notebook(
        str(NOTEBOOK), str(tmp_path / "executed.ipynb"), cwd=str(work), kernel_name="python3",
        progress_bar=False, execution_timeout=300,
        parameters=dict(REPO_URL=str(repo), CODE_DIR="ddpm-afhq", DATA_PATH=str(data), LOSS_STEPS=4,
                        LOSS_SAMPLE_EVERY=2, FID_STEPS=4, FID_EVERY=2, LONG_STEPS=4, LONG_SAMPLE_EVERY=2,
                        EXTRA_FLAGS=" ".join(extra)))  # raises PapermillExecutionError when a cell fails

    code = [c for c in out.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)  # every cell ran
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert (work / "ddpm-afhq" / ".git").is_dir() and (work / "ddpm-afhq" / "main.py").is_file()  # really cloned

    results = work / "ddpm-afhq" / "results"
    figures = [results / "steps1k" / "loss.png", results / "fid1k" / "fid.png",
               results / "steps1k" / "forward_process.png", results / "steps1k" / "backward_process.png",
               results / "steps10k" / "sample-4.png"]
    for path in figures:
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) >= 32, (path, image.format, image.size)
            image.load()
            assert len(set(image.convert("L").getextrema())) == 2, path  # more than one grey level
    shown = [png for c in code for png in png_outputs(c)]
    assert shown == [path.read_bytes() for path in figures]  # the notebook shows exactly these files, in order

    fid_text = "".join(o.get("text", "") for c in code if "fid1k/metrics.jsonl" in c.source for o in c.outputs)
    assert "step     2: FID" in fid_text and "step     4: FID" in fid_text
    gpu_text = "".join(o.get("text", "") for o in code[0].outputs)
    assert "CUDA available:" in gpu_text
