"""The command line: ``main.py``'s parser, built from ``settings.config.Config``'s fields, and docs/flags.md.

Every flag's default is ``argparse.SUPPRESS``: a parse holds exactly the flags the command line names, and the
settings it leaves out keep ``Config``'s defaults. So "which flags were typed" (what a loaded checkpoint may not
override) needs no second parse. Nothing here imports torch: ``python main.py --help`` answers at once.
"""
from __future__ import annotations

import argparse
from dataclasses import fields

from settings.config import AUTO_OR_BOOL, BOOL, Config, show


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (what is wrong, and where to look) instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (python main.py --help lists every flag)\n")


def build_parser() -> Parser:
    parser = Parser(prog="main.py", argument_default=argparse.SUPPRESS,
                    description="Train a DDPM on AFHQ cats, visualize its diffusion processes, sample it and score "
                                "it with FID.")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(Config):
        meta = f.metadata
        if meta["group"] not in groups:
            groups[meta["group"]] = parser.add_argument_group(meta["group"])
        help_text = f"{meta['help']} (default: {show(f.default)})".replace("%", "%%")
        kind, options = meta["kind"], dict(help=help_text, type=meta["kind"])
        if meta["choices"]:
            options["choices"] = meta["choices"]
        if meta["nargs"]:
            options["nargs"] = meta["nargs"]
        elif kind in (BOOL, AUTO_OR_BOOL):
            options.update(nargs="?", const=True, metavar=kind.metavar)
        groups[meta["group"]].add_argument(f"--{f.name}", **options)
    return parser


def parse(argv: list[str] | None = None, parser: Parser | None = None) -> tuple[Config, set[str]]:
    """The ``Config`` of a command line, and the settings it names; a bad value exits 2 with one line."""
    parser = parser or build_parser()
    named = vars(parser.parse_args(argv))
    return checked(parser, **named), set(named)


def checked(parser: Parser, base: Config | None = None, **values) -> Config:
    """``Config(**values)`` (or ``base`` with ``values`` replaced), a ValueError said as the parser's error."""
    try:
        return base.replace(**values) if base is not None else Config(**values)
    except ValueError as e:
        parser.error(str(e))


FLAGS_INTRO = """# Flags

Every flag of `main.py`, by group, as `python main.py --help` lists them. Boolean flags take both forms, `--fid`
and `--fid True/False`; `--cuda_graph` and `--one_pass` also take `auto`. With `--load_path`, the network's flags
(and, when training resumes, the training flags and the data's folder) that the command line does not name take
the checkpoint's values, and a resumed run writes to the checkpoint's folder unless `--save_folder` is named.
Generated from `settings/config.py` by `python tests/test_readme.py`.
"""


def flags_markdown() -> str:
    """docs/flags.md: the table of every flag (name, default, meaning) by group; tests/test_readme.py keeps the
    file equal to it."""
    lines, group = [FLAGS_INTRO.rstrip("\n")], None
    for f in fields(Config):
        meta = f.metadata
        if meta["group"] != group:
            group = meta["group"]
            heading = f"## {group[0].upper()}{group[1:]}"
            lines += ["", heading, "", "| flag | default | meaning |", "| --- | --- | --- |"]
        choices = f" (one of: {', '.join(map(str, meta['choices']))})" if meta["choices"] else ""
        lines.append(f"| `--{f.name}` | `{show(f.default)}` | {meta['help']}{choices} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(flags_markdown(), end="")
