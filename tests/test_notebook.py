"""run_in_colab.ipynb is a valid notebook and every main.py command in it parses with the real parser."""
import re
import shlex
from pathlib import Path

import nbformat

from cli import build_parser, check_args

NOTEBOOK = Path(__file__).resolve().parents[1] / "run_in_colab.ipynb"


def test_notebook_is_valid_nbformat():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert sum(cell.cell_type == "code" for cell in nb.cells) >= 8


def test_every_main_command_parses():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    commands = [line for cell in nb.cells if cell.cell_type == "code"
                for line in cell.source.replace("\\\n", " ").splitlines() if line.strip().startswith("!python main.py")]
    assert len(commands) >= 4
    parser = build_parser()
    for line in commands:
        args = parser.parse_args(shlex.split(line.strip()[len("!python main.py"):]))
        check_args(parser, args)


def test_the_notebook_covers_the_report_questions():
    text = NOTEBOOK.read_text()
    for needle in ("--train_steps 1000", "--fid", "--visualize", "--train_steps 10000", "sample-10000.png",
                   "nvidia-smi", "requirements.txt"):
        assert needle in text, needle
    assert not re.search(r"pip install[^\n]*\btorch\b", text)  # never replaces Colab's torch
