"""The ``difficulty-router`` console script (``[project.scripts]``) and ``python -m difficulty_router.cli``:
builds the parser from each command module's ``register(sub)``, in the order ``--help`` lists the commands,
and runs the chosen command, turning a ValueError or OSError into one line on stderr and exit status 2. It
holds no command of its own, so the command modules never import it or one another; what they share is in
:mod:`.common`."""

from __future__ import annotations

import argparse
import logging
import sys

from difficulty_router.cli import convert, demo, extract, feedback, label, serve, train, zero_label

DESCRIPTION = "``difficulty-router`` command line: extract, train, evaluate, route, serve, convert, demo."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difficulty-router", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    extract.register(sub)  # extract
    train.register(sub)  # train, evaluate
    serve.register(sub)  # route, serve
    convert.register(sub)  # convert
    demo.register(sub)  # demo
    zero_label.register(sub)  # pretrained, calibrate
    label.register(sub)  # label
    feedback.register(sub)  # feedback
    from difficulty_router.evaluation.report import add_report_parser

    add_report_parser(sub)  # report
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:
        print(f"difficulty-router {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
