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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sid-fast", description="Score identity Distillation of flow-matching transformers.")
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
    command_parser = argparse.ArgumentParser(prog=f"sid-fast {name}", description=help_text)
    module.add_arguments(command_parser)
    args, extra = command_parser.parse_known_args(argv[1:])
    args.overrides = list(getattr(args, "overrides", []) or []) + extra
    bad = [item for item in args.overrides if "=" not in item]
    if bad:
        command_parser.error(f"unrecognised arguments {bad}; config overrides look like --section.field=value")
    try:
        return int(module.run(args) or 0)
    except ValueError as error:  # configuration and input errors: one clear line, no traceback
        print(f"sid-fast {name}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
