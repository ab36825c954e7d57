"""Reproductions of the papers' experiments: one module per paper, each turning a config into a report.

Each paper module defines ``make_config(scale, seed)`` (``scale`` is ``"quick"``, ``"full"`` or, where the
paper supports it, ``"paper"``) and ``run(config, out_dir) -> Report`` (``None`` on the ranks that do not write,
when a paper trains under ``torchrun``). :func:`reproduce` runs one and writes
its report with full provenance. The library parts never import this package.
"""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path

from triptych._validation import check_choice
from triptych.experiments.report import Report, environment, write_report

log = logging.getLogger(__name__)

# Paper name -> module implementing make_config(scale, seed) and run(config, out_dir).
PAPERS = {
    "llr": "triptych.experiments.llr",
    "stn": "triptych.experiments.stn",
    "mips": "triptych.experiments.mips",
}
SCALES = ("quick", "full", "paper")


def reproduce(paper: str, scale: str = "quick", out_root: str | Path = "reports", seed: int = 0,
              command: str | None = None) -> Path:
    """Run one paper's reproduction at ``scale`` and write its report to ``out_root/paper``.

    Returns:
        The folder holding ``report.md``, ``results.json`` and the figures.
    """
    check_choice("paper", paper, PAPERS)
    check_choice("scale", scale, SCALES)
    module = importlib.import_module(PAPERS[paper])
    config = module.make_config(scale, seed)
    out_dir = Path(out_root) / paper
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()  # the commit of the code that runs, not of the tree when it ends
    start = time.perf_counter()
    report: Report | None = module.run(config, out_dir)
    elapsed = time.perf_counter() - start
    if report is None:  # a rank other than 0 of a torchrun launch: rank 0 writes the report
        return out_dir
    write_report(report, out_dir, config=config, command=command, elapsed_s=elapsed, env=env)
    log.info("%s report written to %s in %.0f s", paper, out_dir, elapsed)
    return out_dir


__all__ = ["PAPERS", "SCALES", "reproduce"]
