"""The report layer shared by every paper's reproduction.

An experiment module returns a :class:`Report` (Markdown sections, a JSON-able results dict, the figures it
saved). :func:`write_report` adds the provenance every result must carry — command, config, git commit,
package versions, machine — and writes ``results.json`` and ``report.md`` atomically.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from triptych._io import atomic_write_bytes, atomic_write_text  # noqa: E402

T = TypeVar("T")
PACKAGES = ("triptych", "torch", "numpy", "matplotlib", "faiss-cpu", "scann", "hnswlib", "prodigyopt",
            "dadaptation", "schedulefree", "kornia")
_QUIET = False


@dataclass
class Report:
    """What one paper's reproduction produced.

    Attributes:
        title: report title, e.g. ``"LLR — Speed learning on the fly"``.
        sections: Markdown blocks, in order, each usually starting with a ``##`` heading.
        results: JSON-able numbers behind every table and figure.
        figures: file names (relative to the report folder) of the PNGs the experiment saved.
    """

    title: str
    sections: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)


def set_quiet(quiet: bool) -> None:
    """Turn progress bars off (``--quiet``) or on for the rest of the process."""
    global _QUIET
    _QUIET = quiet


def is_quiet() -> bool:
    """Whether progress bars are off in this process (to hand on to worker processes)."""
    return _QUIET


def progress(iterable: Iterable[T], desc: str, total: int | None = None, **kwargs: Any) -> Iterable[T]:
    """Wrap a long loop in a progress bar (on stderr), unless ``--quiet`` was given."""
    return tqdm(iterable, desc=desc, total=total, disable=_QUIET, dynamic_ncols=True, leave=False, **kwargs)


def git_commit() -> str:
    """The current commit of the source tree, with ``-dirty`` when it has uncommitted changes."""
    root = Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo where available."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions() -> dict[str, str]:
    """Installed versions of the package, its dependencies and the peers (absent ones omitted)."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def environment() -> dict[str, Any]:
    """Provenance of a run: git commit, versions, machine, threads, device, time."""
    return {
        "git_commit": git_commit(),
        "versions": package_versions(),
        "machine": {
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        },
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def command_line() -> str:
    """The command that started this process, as typed."""
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if hasattr(value, "item") and hasattr(value, "dtype"):  # numpy scalars
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them readable
    if isinstance(value, Path):
        return str(value)
    return value


def to_json(value: Any) -> str:
    """Strict JSON text of ``value`` (dataclasses, tensors, numpy scalars and non-finite floats handled)."""
    return json.dumps(_jsonable(value), indent=2, allow_nan=False) + "\n"


def provenance_markdown(command: str, config: Any, env: dict[str, Any]) -> str:
    """The block at the top of every report: how to get these numbers again."""
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    machine = env["machine"]
    return "\n".join([
        "## Provenance",
        f"- command: `{command}`",
        f"- git commit: `{env['git_commit']}`",
        f"- date (UTC): {env['date']}",
        f"- machine: {machine['cpu']}, {machine['cpu_count']} CPUs, torch threads {machine['torch_threads']}, "
        f"device {machine['device']}",
        f"- versions: {versions}",
        "- config:",
        "",
        "```json",
        to_json(config).rstrip(),
        "```",
    ])


def write_report(report: Report, out_dir: str | os.PathLike, *, config: Any, command: str | None = None,
                 elapsed_s: float | None = None, env: dict[str, Any] | None = None) -> Path:
    """Write ``report.md`` and ``results.json`` (with full provenance) into ``out_dir``; return ``out_dir``.

    ``env`` is the :func:`environment` taken when the run started (so the commit is the code that ran);
    taken now when omitted.
    """
    out_dir = Path(out_dir)
    command = command or command_line()
    env = env or environment()
    payload = {"title": report.title, "command": command, "config": config, **env,
               "elapsed_s": elapsed_s, "figures": report.figures, "results": report.results}
    atomic_write_text(out_dir / "results.json", to_json(payload))
    timing = [f"Wall-clock time of the run: {elapsed_s:.0f} s."] if elapsed_s is not None else []
    body = [f"# {report.title}", *timing, *report.sections, provenance_markdown(command, config, env)]
    atomic_write_text(out_dir / "report.md", "\n\n".join(body).rstrip() + "\n")
    return out_dir


def save_figure(fig: plt.Figure, out_dir: str | os.PathLike, name: str) -> str:
    """Save ``fig`` as ``out_dir/name`` (PNG, atomically), close it, and return ``name`` for the report."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(Path(out_dir) / name, buffer.getvalue())
    return name


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table; floats are shown with 3 significant digits."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
