"""README.md and the docs stay true: docs/flags.md is the parser's table, README's flags have their defaults, every
command they show parses with the real parser, and the docs' counts are the suite's."""
import re
import shlex
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
FLAGS = README.parent / "docs" / "flags.md"
sys.path.insert(0, str(README.parent))  # also when run as a script to refresh the table

from settings.cli import build_parser, flags_markdown  # noqa: E402
from settings.config import Config, show  # noqa: E402


def test_the_flags_page_is_the_parsers_table():
    assert FLAGS.read_text() == flags_markdown(), "run: python tests/test_readme.py to refresh docs/flags.md"


def test_readmes_short_flag_table_gives_each_flags_default():
    rows = re.findall(r"^\| (`--.*?) \| (.*?) \| .*\|$", README.read_text(), re.M)
    assert len(rows) >= 8
    defaults = {f: show(v) for f, v in Config().to_dict().items()}
    for flags, given in rows:
        names = re.findall(r"`--(\w+)`", flags)
        values = re.findall(r"`([^`]*)`", given) if given != "-" else [show(None)] * len(names)
        assert len(names) == len(values), flags
        for name, value in zip(names, values):
            assert value == defaults[name], f"README says --{name} defaults to {value}, and it is {defaults[name]}"


def test_every_readme_command_parses():
    commands = re.findall(r"^python main\.py(.*?)(?<!\\)$", README.read_text().replace("\\\n", " "), re.M)
    assert len(commands) >= 6
    parser = build_parser()
    for line in commands:
        parser.parse_args(shlex.split(line.split("#")[0]))


def test_every_readme_benchmark_command_parses():
    sys.path.insert(0, str(README.parent / "bench"))
    import bench
    import bench_sizes
    import profile_step

    text = README.read_text().replace("\\\n", " ")
    for script, parse in (("bench", bench.parse_args), ("bench_sizes", bench_sizes.parse_args),
                          ("profile_step", profile_step.parse_args)):
        commands = re.findall(rf"^python bench/{script}\.py(.*?)$", text, re.M)
        assert commands, f"README.md shows no bench/{script}.py command"
        for line in commands:
            parse(shlex.split(line.split("#")[0]))


def test_the_docs_counts_are_the_suites():
    """docs/testing.md and docs/reliability.md say how many wrong calls and kills the suite makes."""
    sys.path.insert(0, str(README.parent / "tests"))
    import test_errors
    import test_faults

    testing = (README.parent / "docs" / "testing.md").read_text()
    reliability = (README.parent / "docs" / "reliability.md").read_text()
    calls, through, kills = len(test_errors.CASES), len(test_errors.END_TO_END), test_faults.KILL_TRIALS
    assert f"{calls} wrong calls of `main.py`" in testing and f"{through} of them through the real command" in testing
    assert f"{kills} `kill -9` per run" in testing and f"{kills} kills per suite run" in reliability
    assert f"{calls} cases (`tests/test_errors.py`)" in reliability


def refresh() -> None:
    FLAGS.write_text(flags_markdown())


if __name__ == "__main__":
    refresh()
