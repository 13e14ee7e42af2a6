"""``sublearn``: the console script.

Each subcommand lives with the code it runs; this module only dispatches to them and
imports a subpackage when its subcommand is chosen, so ``sublearn mnist`` never loads
torch and ``sublearn lm`` never loads jax. It also reports, for every subcommand alike, a
:class:`~sublearn._common.UserError` as one line ``PROG: error: MESSAGE`` with exit status
2, and an interrupt with what was kept (the subcommand's ``kept_after_interrupt(args)``,
if it has one) with status 130.

- ``sublearn mnist``: the MNIST auxiliary-logit experiment (:mod:`toymodels.cli`).
- ``sublearn atlas``: the MNIST experiment's curves against each knob (:mod:`toymodels.atlas`).
- ``sublearn theory``: the gradient-alignment lemma, checked numerically (:mod:`theory.cli`).
- ``sublearn lm``: the language-model pipeline (:mod:`lmpipeline.cli`); ``sublearn llm``,
  its former name, still works, with a notice (it goes in version 0.2.0).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import typing

from sublearn._common import UserError, former_name

# subcommand -> (module with `add_arguments(parser)`, `run(args) -> int` and optionally
# `kept_after_interrupt(args) -> str | None`, one-line help)
SUBCOMMANDS = {
    "mnist": ("toymodels.cli", "MNIST auxiliary-logit experiment (the paper's toy model)"),
    "atlas": ("toymodels.atlas", "the MNIST effect against each knob, with CIs, next to the published numbers"),
    "theory": ("theory.cli", "check the gradient-alignment lemma numerically"),
    "lm": (
        "lmpipeline.cli",
        "language-model pipeline (teacher, numbers, filter, finetuning, evaluation) and transfer study",
    ),
}


ALIASES = {"llm": "lm"}  # former names, still accepted and not listed


class _Parser(argparse.ArgumentParser):
    """Reports a bad option as one line naming it, and exits with status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ALIASES:
        former_name(f"`sublearn {argv[0]}`", f"`sublearn {ALIASES[argv[0]]}`")
        argv = [ALIASES[argv[0]], *argv[1:]]
    parser = _Parser(
        prog="sublearn",
        description="Subliminal learning: experiments from Cloud et al. (2025).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in SUBCOMMANDS:
        args = parser.parse_args(argv)  # prints help or a usage error naming the choices
        parser.print_help()
        return 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    sub_parser = _Parser(prog=f"sublearn {argv[0]}", description=SUBCOMMANDS[argv[0]][1])
    module.add_arguments(sub_parser)
    args = sub_parser.parse_args(argv[1:])
    prog = getattr(args, "prog", sub_parser.prog)  # `sublearn lm` names its action too
    try:
        return module.run(args)
    except UserError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = getattr(module, "kept_after_interrupt", lambda _: None)(args)
        then = f"{kept}; rerun the same command to continue" if kept else "nothing was kept"
        print(f"\n{prog}: interrupted; {then}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
