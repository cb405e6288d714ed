"""The `sid-fast` command line. Each subcommand lives in `sid_fast/commands/<name>.py` and exposes
`add_arguments(parser)` and `run(args) -> int`; modules are imported only when their command runs."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Add a command by adding a module and a line here.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("sid_fast.commands.demo", "run the embedded default end to end and write a report"),
    "distill": ("sid_fast.commands.distill", "distil a teacher with SiD from a YAML config and overrides"),
    "sample": ("sid_fast.commands.sample", "sample an exported generator: prompts in, PNG grid out"),
    "plan": ("sid_fast.commands.plan", "predict per-GPU memory of a ZeRO-3 SiD run and whether it fits"),
    "prepare": ("sid_fast.commands.prepare", "encode prompts or images once into webdataset shards"),
    "pretrain": ("sid_fast.commands.pretrain", "train the ShapesWorld teacher with flow matching (docs/shapes.md)"),
    "kernels": ("sid_fast.commands.kernels", "check and time fused-op backends (triton, cpp, your own) against the reference"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors on one line (`sid-fast plan: error: argument --teacher: invalid choice ...`), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="sid-fast", description="Score identity Distillation of flow-matching transformers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
        parser.print_help()
        return 0
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    command_parser = OneLineParser(prog=f"sid-fast {name}", description=help_text)
    module.add_arguments(command_parser)
    args, extra = command_parser.parse_known_args(argv[1:])
    args.overrides = list(getattr(args, "overrides", []) or []) + extra
    bad = [item for item in args.overrides if "=" not in item]
    if bad:
        command_parser.error(f"unrecognised arguments {bad}; config overrides look like --section.field=value")
    return run_command(name, module.run, args)


def run_command(name: str, run, args, prog: str | None = None) -> int:
    """`run(args)`, with what the user can fix told apart from bugs (sid_fast/errors.py, docs/reliability.md):
    a user error prints ONE line, `sid-fast NAME: error: <thing>: <what is wrong>` (`PROG: error: ...` when `prog`
    is given, e.g. a launcher script), and returns 2; a lost rank of a distributed run one line naming it, and 1; any
    other exception is a bug and propagates with its traceback."""
    from sid_fast.errors import is_user_error, lost_rank_error, one_line

    prog = prog or f"sid-fast {name}"
    try:
        return int(run(args) or 0)
    except Exception as error:
        lost = lost_rank_error(error)
        if lost is not None:
            print(f"{prog}: error: {one_line(lost)}", file=sys.stderr)
            return 1
        if not is_user_error(error):
            raise
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
