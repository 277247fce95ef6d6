"""run_in_colab.ipynb: its settings cell, the commands it runs, and a whole run of it in a real Jupyter kernel.

The notebook's commands are ``run(f"...")`` calls whose f-strings read the settings cell (tagged ``parameters``,
papermill's convention) and what its Drive cell decides (where the runs go, and whether each resumes). The
static tests render them with the settings' defaults, which must be the assignment's runs, off Colab and as if
on Colab with Google Drive; the end-to-end test executes every cell with papermill on the CPU, offline, scaled
down, and once more as on a recycled Colab runtime whose runs are on Drive.
"""
import ast
import base64
import contextlib
import functools
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import nbformat
import papermill
import pytest
from IPython.core.inputtransformer2 import TransformerManager
from PIL import Image

from helpers import TINY_FLAGS, make_image_folder
from settings.cli import parse as parse_flags

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
    "python -m pip install -q -r requirements-page.txt",
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


DRIVE = "/content/drive/MyDrive/ddpm-afhq"  # the default DRIVE_FOLDER


def drive_cell(nb):
    [cell] = [c for c in nb.cells if c.cell_type == "code" and "drive.mount(" in c.source]
    return cell


def after_drive_cell(nb, values: dict, monkeypatch, *, colab: bool) -> tuple[dict, list[str], str]:
    """The notebook's names once its Drive cell has run with ``values`` for the settings: as on Colab (a stand-in
    ``google.colab.drive`` records what is mounted) or not (``google.colab`` cannot be imported). Returns the
    names, the mount points and what the cell printed. Paths are relative to the current folder, as in the
    notebook: the tests run it in a temporary one."""
    mounts = []
    colab_module = types.ModuleType("google.colab")
    colab_module.drive = types.SimpleNamespace(mount=lambda mountpoint, **options: mounts.append(mountpoint))
    monkeypatch.setitem(sys.modules, "google.colab", colab_module if colab else None)  # None: ImportError
    namespace = dict(values)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(python_of(drive_cell(nb)), "<drive cell>", "exec"), namespace)
    return namespace, mounts, printed.getvalue()


def calls(nb, name: str, namespace: dict) -> list:
    """The argument of every call of ``name`` in the notebook's code cells, in order, evaluated in ``namespace``."""
    found = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for node in ast.walk(python_of(cell)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name:
                [argument] = node.args
                found.append(eval(compile(ast.Expression(argument), f"<{name} argument>", "eval"), namespace))
    return found


def commands(nb, values: dict, monkeypatch, *, colab: bool = False) -> list[str]:
    """The command line of every ``run(...)`` call in the notebook, in order, with ``values`` for the settings."""
    return calls(nb, "run", after_drive_cell(nb, values, monkeypatch, colab=colab)[0])


def flag(command: str, name: str) -> list[str]:
    """The values of every ``--name`` on a command line."""
    args = shlex.split(command)
    return [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == f"--{name}"]


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


def test_default_settings_run_the_assignments_commands(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nb = read_notebook()
    rendered = commands(nb, settings(nb), monkeypatch)
    assert [shlex.split(c) for c in rendered] == [shlex.split(c) for c in DEFAULT_COMMANDS]
    for line in rendered:
        if line.startswith("python main.py"):
            parse_flags(shlex.split(line)[2:])
    flags = commands(nb, {**settings(nb), "EXTRA_FLAGS": "--wandb disabled --fid_samples 512"}, monkeypatch)
    assert all(c.endswith(" --wandb disabled --fid_samples 512") for c in flags if c.startswith("python main.py"))


# What the notebook runs on Colab with the default settings (USE_DRIVE on): the runs and the FID statistics on Drive
DRIVE_COMMANDS = [
    *DEFAULT_COMMANDS[:2],
    f"python main.py --train_steps 1000 --save_and_sample_every 500 --data_path ./data/train "
    f"--save_folder {DRIVE}/results/steps1k --cache_dir {DRIVE}/cache",
    f"python main.py --train_steps 1000 --save_and_sample_every 100 --fid --data_path ./data/train "
    f"--save_folder {DRIVE}/results/fid1k --cache_dir {DRIVE}/cache",
    f"python main.py --load_path {DRIVE}/results/steps1k/model.pt --visualize --data_path ./data/train "
    f"--save_folder {DRIVE}/results/steps1k --cache_dir {DRIVE}/cache",
    f"python main.py --train_steps 10000 --save_and_sample_every 1000 --fid False --data_path ./data/train "
    f"--save_folder {DRIVE}/results/steps10k --cache_dir {DRIVE}/cache",
    DEFAULT_COMMANDS[-1],  # the page's extra
]
SHOWN = ["steps1k/loss.png", "fid1k/fid.png", "steps1k/forward_process.png", "steps1k/backward_process.png",
         "steps10k/sample-10000.png"]  # the figures the notebook shows, in each run's folder


def test_off_colab_google_drive_is_skipped_with_a_line_that_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nb = read_notebook()
    assert settings(nb)["USE_DRIVE"] is True and settings(nb)["DRIVE_FOLDER"] == DRIVE
    namespace, mounts, printed = after_drive_cell(nb, settings(nb), monkeypatch, colab=False)
    assert mounts == [] and "not on Colab: Google Drive is skipped" in printed
    assert calls(nb, "Image", namespace) == [f"results/{name}" for name in SHOWN]
    # on Colab with USE_DRIVE off: nothing mounted, everything as off Colab
    namespace, mounts, printed = after_drive_cell(nb, {**settings(nb), "USE_DRIVE": False}, monkeypatch, colab=True)
    assert mounts == [] and "USE_DRIVE is False" in printed
    assert calls(nb, "run", namespace) == commands(nb, settings(nb), monkeypatch, colab=False)
    assert calls(nb, "Image", namespace) == [f"results/{name}" for name in SHOWN]


def test_on_colab_the_runs_and_fid_statistics_go_to_google_drive(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nb = read_notebook()
    namespace, mounts, printed = after_drive_cell(nb, settings(nb), monkeypatch, colab=True)
    assert mounts == ["/content/drive"] and DRIVE in printed
    rendered = calls(nb, "run", namespace)
    assert [shlex.split(c) for c in rendered] == [shlex.split(c) for c in DRIVE_COMMANDS]
    for line in rendered:
        if line.startswith("python main.py"):
            parse_flags(shlex.split(line)[2:])
    assert calls(nb, "Image", namespace) == [f"{DRIVE}/results/{name}" for name in SHOWN]  # shown from Drive
    assert calls(nb, "open", namespace) == [f"{DRIVE}/results/fid1k/metrics.jsonl"]
    assert list(tmp_path.iterdir()) == []  # rendering wrote nothing


@pytest.mark.parametrize("colab", [False, True], ids=["off Colab", "on Colab with Drive"])
def test_every_training_cell_goes_on_from_its_runs_checkpoint(tmp_path, monkeypatch, colab):
    """A training cell run again (after a disconnect, or on a new runtime with the runs on Drive) resumes its
    own run's model.pt when there is one, and starts the run when there is none; folders with spaces are quoted."""
    monkeypatch.chdir(tmp_path)
    nb = read_notebook()
    values = {**settings(nb), "DRIVE_FOLDER": str(tmp_path / "My Drive" / "ddpm afhq")}
    runs = Path(values["DRIVE_FOLDER"], "results") if colab else Path("results")

    def main_py_commands():
        return [c for c in commands(nb, values, monkeypatch, colab=colab) if c.startswith("python main.py")]

    [loss, fid, visualize, long] = main_py_commands()
    assert [flag(c, "load_path") for c in (loss, fid, long)] == [[], [], []]  # new runs
    assert flag(visualize, "load_path") == [str(runs / "steps1k" / "model.pt")]
    names = ["steps1k", "fid1k", "steps1k", "steps10k"]
    assert [flag(c, "save_folder") for c in main_py_commands()] == [[str(runs / name)] for name in names]
    assert {tuple(flag(c, "cache_dir")) for c in main_py_commands()} == {
        (str(Path(values["DRIVE_FOLDER"], "cache")),) if colab else ()}

    for name in ("steps1k", "fid1k", "steps10k"):  # as a recycled runtime finds them on Drive
        (runs / name).mkdir(parents=True)
        (runs / name / "model.pt").write_bytes(b"")
    rendered = main_py_commands()
    for command, name in zip(rendered, names):
        assert flag(command, "load_path") == [str(runs / name / "model.pt")], command
        assert flag(command, "save_folder") == [str(runs / name)], command
        parse_flags(shlex.split(command)[2:])
    assert [flag(c, "train_steps") for c in rendered] == [["1000"], ["1000"], [], ["10000"]]


def test_the_notebook_covers_the_report_questions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nb = read_notebook()
    text = NOTEBOOK.read_text()
    for needle in ("steps1k/loss.png", "fid1k/fid.png", "forward_process.png",
                   "backward_process.png", 'sample-{LONG_STEPS}.png', "nvidia-smi", "requirements.txt"):
        assert needle in text, needle
    assert settings(nb)["LONG_STEPS"] == 10000
    for colab in (False, True):  # keeps Colab's torch
        assert not any("torch" in c.split() for c in commands(nb, settings(nb), monkeypatch, colab=colab) if "pip" in c)


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

    # a kernel turns SIGINT into KeyboardInterrupt, also where this process was started with SIGINT ignored (a
    # background job of a non-interactive shell)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt_when_ready, daemon=True).start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            notebook_helpers()["run"](f"python -c {shlex.quote(child)}")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "saved on SIGINT" in capsys.readouterr().out and time.monotonic() - started < 50


# What the snapshot never takes, git-ignored or not: a Python environment (a virtualenv's folder holds pyvenv.cfg,
# a conda environment's conda-meta/), installed packages, and main.py's default data and results folders. The
# project's own files come to a few MB; any of these can hold gigabytes, and the notebook clones the snapshot
# once more.
ENVIRONMENT_MARKERS = ("pyvenv.cfg", "conda-meta")
PACKAGE_FOLDERS = ("site-packages", "dist-packages")
RUN_FOLDERS = ("data", "results")  # at the project's top: --data_path ./data/train, --save_folder ./results/


def project_files(root: Path = ROOT) -> list[str]:
    """The files of the project at ``root`` that a snapshot takes, as paths relative to it: every tracked file
    still on disk, and every untracked file git does not ignore, except those inside a top-level data or results
    folder, a site-packages folder, or a folder holding a Python environment."""
    def listed(*options: str) -> list[str]:
        out = subprocess.run(["git", "ls-files", "-z", *options], cwd=root, check=True, capture_output=True).stdout
        return list(filter(None, out.decode().split("\0")))

    @functools.lru_cache(maxsize=None)
    def outside_project(folder: str) -> bool:  # a folder, relative to root ("" is root itself)
        if not folder:
            return False
        parent, _, name = folder.rpartition("/")
        return ((not parent and name in RUN_FOLDERS) or name in PACKAGE_FOLDERS
                or any((root / folder / marker).exists() for marker in ENVIRONMENT_MARKERS)
                or outside_project(parent))

    untracked = [name for name in listed("--others", "--exclude-standard")
                 if not outside_project(name.rpartition("/")[0])]
    return [name for name in listed("--cached") + untracked
            if (root / name).is_file()]  # a tracked file deleted on disk is left out


def snapshot_repository(dest: Path, root: Path = ROOT) -> Path:
    """A git repository holding the project's files at ``root`` as they are on disk (``project_files``: committed
    or not, ignored ones and environments left out), for the notebook to clone: what is tested is the code on disk."""
    dest.mkdir()
    for name in project_files(root):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, dest / name)
    git = ["git", "-c", "user.name=notebook test", "-c", "user.email=notebook-test@example.invalid",
           "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "working tree"]):
        subprocess.run([*git, *args], cwd=dest, check=True, capture_output=True)
    return dest


def test_gitignore_leaves_out_python_environments():
    """The usual environment folders in the project folder are git-ignored, so git lists none of their files."""
    def ignored(path):
        return subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT).returncode == 0

    for path in (".venv/pyvenv.cfg", ".venv/lib/python3.11/site-packages/torch/__init__.py", "venv/bin/python",
                 "env/pyvenv.cfg", ".env", "ENV/bin/python", "env.bak/pyvenv.cfg", "venv.bak/pyvenv.cfg",
                 ".conda/conda-meta/history", ".tox/py311/pyvenv.cfg", ".nox/tests/pyvenv.cfg"):
        assert ignored(path), path
    for path in ("main.py", "tests/test_notebook.py", "data/README.md", "run_in_colab.ipynb", "environment.py"):
        assert not ignored(path), path


def test_the_snapshot_takes_the_projects_files_and_no_environment_even_unignored(tmp_path):
    """Whatever .gitignore says, environments, installed packages, data and results stay out of the snapshot,
    while the project's files, committed or not, go in as they are on disk."""
    project = tmp_path / "project"
    files = {
        "main.py": "tracked", "data/README.md": "tracked", "tests/test_x.py": "tracked", ".gitignore": "tracked",
        "new_module.py": "new", "tests/new_test.py": "new", "tests/data/fixture.json": "new", "docs/notes.md": "new",
        "tools/helper.py": "new", "tools/environment.py": "new",
        "run.log": "ignored",  # by the .gitignore below
        # environments and packages under names that no .gitignore knows
        "myenv/pyvenv.cfg": "env", "myenv/bin/python": "env",
        "myenv/lib/python3.11/site-packages/pkg/__init__.py": "env",
        "tools/nested/pyvenv.cfg": "env", "tools/nested/lib/mod.py": "env",
        "condaenv/conda-meta/history": "env", "condaenv/bin/python": "env",
        "prefix/lib/python3/dist-packages/pkg.py": "env", "vendored/site-packages/pkg.py": "env",
        # main.py's data and results folders (git-ignored in the project, not here)
        "data/train/cat/img_000.jpg": "data", "results/steps1k/model.pt": "results",
    }
    for name, kind in files.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text("*.log\n" if name == ".gitignore" else kind)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=project, check=True)
    subprocess.run([*git, "add", *(name for name, kind in files.items() if kind == "tracked")], cwd=project, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "project"], cwd=project, check=True)
    (project / "tests" / "test_x.py").write_text("tracked, changed")

    expected = {name for name, kind in files.items() if kind in ("tracked", "new")}
    assert set(project_files(project)) == expected
    repo = snapshot_repository(tmp_path / "snapshot", project)
    committed = subprocess.run(["git", "ls-files"], cwd=repo, check=True, capture_output=True, text=True).stdout
    assert set(committed.split()) == expected
    assert (repo / "tests" / "test_x.py").read_text() == "tracked, changed"  # the file as it is on disk


def png_outputs(cell) -> list[bytes]:
    return [base64.b64decode(o["data"]["image/png"]) for o in cell.outputs if "image/png" in o.get("data", {})]


def outputs_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs)


SMALL_RUNS = dict(CODE_DIR="ddpm-afhq", LOSS_STEPS=4, LOSS_SAMPLE_EVERY=2, FID_STEPS=4, FID_EVERY=2, LONG_STEPS=4,
                  LONG_SAMPLE_EVERY=2, EXTRA_FLAGS=" ".join([*TINY_FLAGS, "--precision", "fp32", "--fid_samples", "8"]))


def execute(work: Path, site: list[Path], **parameters):
    """Run the notebook in a kernel in the new folder ``work`` (a fresh runtime), with ``site`` first on the
    PYTHONPATH of the kernel and of the main.py runs it starts; raises PapermillExecutionError when a cell fails."""
    work.mkdir()
    paths = [*map(str, site), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", os.pathsep.join(paths))
        env.setenv("PIP_NO_INDEX", "1")  # pip never reaches an index
        return papermill.execute_notebook(
            str(NOTEBOOK), str(work.with_suffix(".ipynb")), cwd=str(work), kernel_name="python3",
            progress_bar=False, execution_timeout=300, parameters=parameters)


def test_the_stand_in_inception_replaces_the_fid_modules_network_in_a_new_python():
    """SITE's sitecustomize.py hooks the FID module by its name: a python started as the notebook's are builds the
    stand-in network, not clean-fid's Inception (which would be downloaded, and fail offline)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [SITE, SITE.parent]))}
    code = ("import evaluation.fid as f, helpers; "
            "print(type(f._build_inception('clean', 'cpu')) is helpers.TinyFeatures)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """The notebook run top to bottom off Colab, on a snapshot of the working tree and 12 made-up cats; FID
    with the stand-in network (SITE's sitecustomize.py) in the kernel and the main.py runs it starts."""
    tmp_path = tmp_path_factory.mktemp("notebook")
    repo = snapshot_repository(tmp_path / "repo")
    data = make_image_folder(tmp_path / "afhq", count=12, size=24)
    out = execute(tmp_path / "colab", [SITE, SITE.parent], REPO_URL=str(repo), DATA_PATH=str(data), **SMALL_RUNS)
    return types.SimpleNamespace(repo=repo, data=data, work=tmp_path / "colab", out=out)


@pytest.mark.xdist_group("notebook_first_run")  # one worker runs both, and the fixture once
def test_the_notebook_runs_top_to_bottom_in_a_kernel(first_run):
    out, work = first_run.out, first_run.work
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
    assert "not on Colab: Google Drive is skipped" in outputs_text(drive_cell(out))


COLAB_DRIVE = '''"""Stand-in for Colab's google.colab.drive: mounting only says so."""


def mount(mountpoint, **options):
    print(f"Mounted at {mountpoint}")
'''


@pytest.mark.xdist_group("notebook_first_run")  # one worker runs both, and the fixture once
def test_a_recycled_colab_runtime_goes_on_from_the_runs_on_google_drive(first_run, tmp_path):
    """As on Colab (a stand-in google.colab), on a fresh runtime with the first run's results on Drive: the
    notebook run again from the top, with a longer last run, mounts Drive, stops the finished runs at once,
    continues the last one from its checkpoint, and writes the runs and the FID statistics on Drive only."""
    drive = tmp_path / "drive" / "MyDrive" / "ddpm afhq"  # with a space, as in "My Drive"
    shutil.copytree(first_run.work / "ddpm-afhq" / "results", drive / "results")
    colab = tmp_path / "colab_site"
    (colab / "google" / "colab").mkdir(parents=True)  # google/ stays a namespace package, as protobuf's is
    (colab / "google" / "colab" / "__init__.py").write_text("")
    (colab / "google" / "colab" / "drive.py").write_text(COLAB_DRIVE)
    work = tmp_path / "runtime"
    out = execute(work, [colab, SITE, SITE.parent], REPO_URL=str(first_run.repo), DATA_PATH=str(first_run.data),
                  **{**SMALL_RUNS, "LONG_STEPS": 6, "USE_DRIVE": True, "DRIVE_FOLDER": str(drive)})

    code = [c for c in out.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert "Mounted at /content/drive" in outputs_text(drive_cell(out))
    training = [outputs_text(c) for c in code if 'run(f"python main.py --train_steps' in c.source]
    assert len(training) == 3
    for text in training[:2]:  # the loss and FID runs are finished
        assert "nothing to train" in text, text[-2000:]
    assert "at step 6" in training[2] and "nothing to train" not in training[2], training[2][-2000:]
    records = (drive / "results" / "steps10k" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line).get("step") for line in records]
    assert 4 in steps and 6 in steps  # the first runtime's records are kept, the new ones follow
    assert list((drive / "cache").glob("fid_ref_*.npz"))  # the FID statistics are cached on Drive
    assert (work / "ddpm-afhq" / "main.py").is_file() and not (work / "ddpm-afhq" / "results").exists()
    shown = [png for c in code for png in png_outputs(c)]
    assert shown == [(drive / "results" / name).read_bytes() for name in [*SHOWN[:-1], "steps10k/sample-6.png"]]


def test_the_data_cell_counts_a_folder_of_your_own_and_fetches_nothing(tmp_path, monkeypatch):
    """``DATA_PATH`` set to a folder of the user's images (on Drive, say): the data cell says what is there and
    downloads no AFHQ; the training cells pass that folder to main.py, which reads every image in it."""
    from PIL import Image

    mine = tmp_path / "my-pictures"
    (mine / "summer").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (40, 40), (i, 0, 0)).save(mine / ("summer" if i else ".") / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    nb = read_notebook()
    [cell] = [c for c in nb.cells if c.cell_type == "code" and "ensure_dataset" in c.source]
    monkeypatch.setattr("imagedata.download.download_afhq", lambda *a, **k: pytest.fail("downloaded AFHQ"))
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(python_of(cell), "<data cell>", "exec"), {"DATA_PATH": str(mine)})
    assert printed.getvalue() == f"3 images of your own in {mine} (nested: ./ (1), summer/ (2))\n"
    rendered = commands(nb, {**settings(nb), "DATA_PATH": str(mine)}, monkeypatch)
    assert all(flag(c, "data_path") == [str(mine)] for c in rendered if c.startswith("python main.py"))
