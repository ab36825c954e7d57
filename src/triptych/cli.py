"""The ``triptych`` command line: ``triptych reproduce {llr|stn|mips|all} [--quick|--full] ...``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import torch


def _reproduce(args: argparse.Namespace) -> int:
    from triptych.experiments import PAPERS, reproduce
    from triptych.experiments.report import command_line, set_quiet

    papers = list(PAPERS) if args.paper == "all" else [args.paper]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and papers != ["stn"]:
        raise ValueError(f"only 'triptych reproduce stn' trains data-parallel under torchrun, got {args.paper!r}; "
                         "run the others as one process")
    set_quiet(args.quiet or int(os.environ.get("RANK", "0")) != 0)  # one progress bar per launch
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    scale = "paper" if args.paper_budget else ("full" if args.full else "quick")
    for paper in papers:
        out_dir = reproduce(paper, scale, args.out, args.seed, command=command_line())
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{paper}: report written to {out_dir / 'report.md'}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``triptych`` command."""
    from triptych.experiments import PAPERS

    parser = argparse.ArgumentParser(prog="triptych", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    rep = commands.add_parser("reproduce", help="reproduce a paper's experiments and write a report")
    rep.add_argument("paper", choices=[*PAPERS, "all"])
    scale = rep.add_mutually_exclusive_group()
    scale.add_argument("--quick", action="store_true", help="quick scale (default): minutes on 2 cores")
    scale.add_argument("--full", action="store_true", help="full scale: the committed reports under results/")
    scale.add_argument("--paper-budget", action="store_true",
                       help="the paper's own training budget, where supported (meant for a GPU)")
    rep.add_argument("--out", default="reports", help="output root; each paper writes OUT/PAPER/ (default reports)")
    rep.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    rep.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    rep.add_argument("--quiet", action="store_true", help="no progress bars")
    rep.set_defaults(handler=_reproduce)

    from triptych.mips.cli import add_mips_parser

    add_mips_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``triptych`` console script."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, TypeError) as error:
        print(f"triptych: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
