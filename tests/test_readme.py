"""README.md stays true: its flag table is the parser's, and its commands parse with the real parser."""
import re
import shlex
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
sys.path.insert(0, str(README.parent))  # also when run as a script to refresh the table

from settings.cli import build_parser, flags_markdown  # noqa: E402


def test_flag_table_matches_the_parser():
    text = README.read_text()
    table = re.search(r"<!-- flags:begin.*?-->\n(.*?)<!-- flags:end -->", text, re.S)
    assert table, "README.md lost its flags markers"
    assert table.group(1).strip() == flags_markdown().strip(), "run: python tests/test_readme.py to refresh the table"


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


def refresh() -> None:
    text = README.read_text()
    new = re.sub(r"(<!-- flags:begin.*?-->\n).*?(<!-- flags:end -->)",
                 lambda m: m.group(1) + "\n" + flags_markdown() + "\n" + m.group(2), text, flags=re.S)
    README.write_text(new)


if __name__ == "__main__":
    refresh()
