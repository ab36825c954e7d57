"""Per-step cost of LLR (each variant and base) against plain torch SGD / AdaGrad / Adam.

One training step = zero_grad, forward, loss, backward and the optimizer step (the finite-difference and exact
variants run the closure that the step needs). Every configuration is timed on the same model and batch, in
interleaved rounds (so machine noise hits all alike); the table reports median time per step and its ratio to
the plain base optimizer. Targets (issue 2): hessian_free ≤ 1.15×, finite_difference ≤ 2.2×, exact ≤ 3×.

    .venv/bin/python bench/llr_overhead.py            # the real run (quiet machine, a few minutes)
    .venv/bin/python bench/llr_overhead.py --smoke    # seconds; checks the script, numbers meaningless
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from triptych._io import atomic_write_text
from triptych.experiments.report import environment, markdown_table, provenance_markdown, to_json
from triptych.optim import LLR

TARGETS = {"hessian_free": 1.15, "finite_difference": 2.2, "exact": 3.0}
BASE_OPTIMIZERS = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "adam": torch.optim.Adam}


@dataclasses.dataclass
class Config:
    threads: int = 2
    rounds: int = 7  # interleaved timing rounds; the median over rounds is reported
    steps: int = 30  # training steps per configuration per round
    warmup: int = 5
    batch: int = 64
    mlp_width: int = 512
    cnn_channels: int = 32
    bases: tuple[str, ...] = ("sgd", "adagrad", "adam")
    seed: int = 0


def smoke_config() -> Config:
    return Config(rounds=2, steps=2, warmup=1, batch=8, mlp_width=32, cnn_channels=4, bases=("sgd", "adam"))


def make_mlp(width: int) -> nn.Module:
    """MNIST-sized MLP: (B, 1, 28, 28) → 10 logits."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10))


def make_cnn(channels: int) -> nn.Module:
    """Small CNN: (B, 1, 28, 28) → 10 logits, two conv blocks and a linear head."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * channels * 7 * 7, 10))


def optimizer_factories(bases: tuple[str, ...]) -> dict[str, tuple[str, str, Callable]]:
    """name → (base, variant or "plain", factory(params) -> optimizer)."""
    out: dict[str, tuple[str, str, Callable]] = {}
    for base in bases:
        lr = 1e-3 if base == "adam" else 1e-2
        out[f"torch {base}"] = (base, "plain", lambda p, b=base, lr=lr: BASE_OPTIMIZERS[b](p, lr=lr))
        for variant in TARGETS:
            out[f"LLR {variant} / {base}"] = (
                base, variant, lambda p, b=base, v=variant, lr=lr: LLR(p, lr=lr, variant=v, base=b))
    return out


def time_steps(model: nn.Module, opt: torch.optim.Optimizer, variant: str, x: torch.Tensor, y: torch.Tensor,
               steps: int) -> float:
    """Seconds per training step, averaged over ``steps`` consecutive steps."""
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward(create_graph=variant == "exact")
        return loss

    start = time.perf_counter()
    for _ in range(steps):
        if variant in ("plain", "hessian_free"):
            closure()
            opt.step()
        else:
            opt.step(closure)
    return (time.perf_counter() - start) / steps


def benchmark(config: Config) -> list[dict]:
    """Median seconds per step for every (model, optimizer) pair, interleaved over rounds."""
    torch.manual_seed(config.seed)
    x = torch.randn(config.batch, 1, 28, 28)
    y = torch.randint(0, 10, (config.batch,))
    models = {"MLP": lambda: make_mlp(config.mlp_width), "CNN": lambda: make_cnn(config.cnn_channels)}
    factories = optimizer_factories(config.bases)
    runs = {}
    for model_name, make_model in models.items():
        for name, (base, variant, factory) in factories.items():
            torch.manual_seed(config.seed)
            model = make_model()
            opt = factory(model.parameters())
            time_steps(model, opt, variant, x, y, config.warmup)
            runs[model_name, name] = (model, opt, base, variant, [])
    for _ in range(config.rounds):
        for model, opt, _, variant, times in runs.values():
            times.append(time_steps(model, opt, variant, x, y, config.steps))
    rows = []
    for (model_name, name), (_, _, base, variant, times) in runs.items():
        baseline = statistics.median(runs[model_name, f"torch {base}"][4])
        median = statistics.median(times)
        rows.append({"model": model_name, "optimizer": name, "base": base, "variant": variant,
                     "ms_per_step": 1e3 * median, "ratio": median / baseline,
                     "target": TARGETS.get(variant), "times_s": times})
    return rows


def render(rows: list[dict], config: Config, env: dict, command: str) -> str:
    def verdict(row: dict) -> str:
        if row["target"] is None:
            return ""
        return f"≤ {row['target']}× " + ("met" if row["ratio"] <= row["target"] else "**missed**")

    table = markdown_table(["model", "optimizer", "ms / step (median)", "ratio to plain base", "target"],
                           [[r["model"], r["optimizer"], r["ms_per_step"], r["ratio"], verdict(r)] for r in rows])
    return "\n\n".join([
        "# LLR per-step overhead",
        "Time of one full training step (zero_grad, forward, backward, optimizer step; the finite-difference and "
        "exact variants include the extra closure work they need), median over interleaved rounds, as a ratio "
        "to the same step with the plain torch optimizer of the same base. Synthetic MNIST-shaped batch.",
        table,
        provenance_markdown(command, config, env),
    ]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds; numbers meaningless")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for overhead.md/.json (default results/llr; --smoke writes only if given)")
    args = parser.parse_args(argv)
    config = smoke_config() if args.smoke else Config()
    config.threads = args.threads
    if args.rounds is not None:
        config.rounds = args.rounds
    torch.set_num_threads(config.threads)
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    command = "python bench/llr_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = benchmark(config)
    env = environment()
    markdown = render(rows, config, env, command.strip())
    print(markdown)
    out = args.out if args.out is not None or args.smoke else Path("results/llr")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "overhead.md", markdown)
        atomic_write_text(out / "overhead.json", to_json({"command": command.strip(), "config": config,
                                                          "environment": env, "rows": rows}))


if __name__ == "__main__":
    main()
