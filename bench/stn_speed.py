"""Speed of triptych's spatial transformers against kornia, and of an ST-CNN training step against the plain CNN.

Part 1 times forward + backward (gradients to the image and to the transform parameters) of one warp, grid
generation included, for each transform family: triptych (``*_grid`` + ``sample``) against kornia's equivalent
(``warp_affine``, ``warp_perspective``, ``get_tps_transform`` + ``warp_image_tps``) and, for the affine family,
plain ``F.affine_grid`` + ``F.grid_sample``. Part 2 times one training step (forward, cross-entropy, backward, the
updates of ``triptych reproduce stn --full``'s optimisers: SGD with momentum, and Adam for a localisation net) of
every distorted-MNIST model, ST models against the plain model of their family at the same input size.

Contestants run interleaved (their order rotates every repeat) and each reports the median over repeats; the
tables give ratios, which survive a noisy shared machine better than absolute times. Targets: every family at least
as fast as kornia (kornia time / triptych time >= 1), an ST-CNN step at most 1.3x the CNN step.

    .venv/bin/python bench/stn_speed.py              # writes results/stn/speed.md and speed.json
    .venv/bin/python bench/stn_speed.py --smoke      # seconds; writes to a temporary folder
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from triptych._io import atomic_write_text
from triptych.experiments.report import command_line, environment, markdown_table, provenance_markdown, to_json
from triptych.experiments.stn import make_config, make_optimizers
from triptych.spatial import (
    affine_grid,
    attention_grid,
    build_model,
    projective_grid,
    sample,
    tps_control_points,
    tps_grid,
)

try:
    import kornia.geometry.transform as kornia_transform
except ImportError:  # kornia is in the optional `bench` extra
    kornia_transform = None

WARP_TARGET = 1.0  # kornia time / triptych time must be at least this
STEP_TARGET = 1.3  # ST-CNN step time / CNN step time must be at most this
INPUT_GRAD = " (input gradient)"  # suffix of a plain model timed with the gradient w.r.t. its input as well


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and 2 repeats, to check the script runs")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (recorded)")
    parser.add_argument("--batch", type=int, default=256, help="images per warp and per training step")
    parser.add_argument("--warp-size", type=int, default=60, help="side of the warped images (part 1)")
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per contestant (part 1)")
    parser.add_argument("--step-repeats", type=int, default=7, help="timed repeats per model (part 2)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default results/stn, or a temporary folder with --smoke)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.warp_size, args.repeats, args.step_repeats = 8, 28, 2, 2
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "triptych-stn-speed-smoke" if args.smoke else Path("results/stn")
    return args


def median_times(contestants: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median wall time (seconds) of each callable, run interleaved with a rotating order."""
    names = list(contestants)
    for _ in range(warmup):
        for name in names:
            contestants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            contestants[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


# --------------------------------------------------------------------------------------------------------------
# Part 1: one warp, forward + backward
# --------------------------------------------------------------------------------------------------------------

def _forward_backward(warp: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], image: torch.Tensor,
                      params: torch.Tensor) -> Callable[[], object]:
    def run():
        return torch.autograd.grad(warp(image, params).sum(), (image, params))
    return run


def _pixel_from_normalised(size: int) -> torch.Tensor:
    """Corner-aligned (align_corners=True) normalised -> pixel coordinates, ``(3, 3)``."""
    half = (size - 1) / 2
    return torch.tensor([[half, 0.0, half], [0.0, half, half], [0.0, 0.0, 1.0]])


def _to_3x3(theta: torch.Tensor) -> torch.Tensor:
    return torch.cat([theta, torch.tensor([[[0.0, 0.0, 1.0]]]).expand(theta.shape[0], 1, 3)], dim=1)


def warp_contestants(batch: int, size: int) -> dict[str, dict[str, Callable[[], object]]]:
    """For each family: {contestant: forward+backward closure}, all warping the same images by the same transform.

    Everything uses ``align_corners=True``, kornia's default for the matrix warps; kornia takes pixel-space
    source->destination matrices, converted once outside the timed region.
    """
    image = torch.rand(batch, 1, size, size, requires_grad=True)
    dsize = (size, size)
    pixel = _pixel_from_normalised(size)
    ours: dict[str, dict[str, Callable[[], object]]] = {}

    theta = (torch.eye(2, 3) + 0.1 * torch.randn(batch, 2, 3)).requires_grad_(True)
    dst_from_src = torch.linalg.inv(pixel @ _to_3x3(theta.detach()) @ torch.linalg.inv(pixel))
    ours["affine"] = {
        "triptych": _forward_backward(lambda x, t: sample(x, affine_grid(t, dsize, align_corners=True),
                                                          align_corners=True), image, theta),
        "torch": _forward_backward(lambda x, t: F.grid_sample(
            x, F.affine_grid(t, (batch, 1, size, size), align_corners=True), align_corners=True), image, theta),
    }
    if kornia_transform is not None:
        ours["affine"]["kornia"] = _forward_backward(
            lambda x, m: kornia_transform.warp_affine(x, m, dsize, align_corners=True), image,
            dst_from_src[:, :2].contiguous().requires_grad_(True))

    attention = torch.tensor([1.0, 0.0, 0.0]) + torch.tensor([0.2, 0.1, 0.1]) * torch.randn(batch, 3)
    attention.requires_grad_(True)
    ours["attention"] = {"triptych": _forward_backward(
        lambda x, p: sample(x, attention_grid(p, dsize, align_corners=True), align_corners=True), image, attention)}
    if kornia_transform is not None:
        def kornia_attention(x, p):  # kornia has no attention warp: its affine warp of [[s, 0, tx], [0, s, ty]]
            scale, zero = p[:, 0], torch.zeros_like(p[:, 0])
            src_from_dst = torch.stack([torch.stack([scale, zero, p[:, 1]], 1), torch.stack([zero, scale, p[:, 2]], 1),
                                        torch.stack([zero, zero, torch.ones_like(scale)], 1)], 1)
            matrix = torch.linalg.inv(pixel @ src_from_dst @ torch.linalg.inv(pixel))[:, :2]
            return kornia_transform.warp_affine(x, matrix, dsize, align_corners=True)
        ours["attention"]["kornia"] = _forward_backward(kornia_attention, image, attention)

    homography = (torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0]) + 0.05 * torch.randn(batch, 8)).requires_grad_(True)
    src_from_dst = torch.cat([homography.detach(), torch.ones(batch, 1)], 1).view(batch, 3, 3)
    ours["projective"] = {"triptych": _forward_backward(
        lambda x, p: sample(x, projective_grid(p, dsize, align_corners=True), align_corners=True), image, homography)}
    if kornia_transform is not None:
        dst_from_src = torch.linalg.inv(pixel @ src_from_dst @ torch.linalg.inv(pixel)).requires_grad_(True)
        ours["projective"]["kornia"] = _forward_backward(
            lambda x, m: kornia_transform.warp_perspective(x, m, dsize, align_corners=True), image, dst_from_src)

    rest = tps_control_points()
    targets = (rest + 0.05 * torch.randn(batch, 16, 2)).requires_grad_(True)
    ours["tps"] = {"triptych": _forward_backward(
        lambda x, c: sample(x, tps_grid(c, dsize, align_corners=True), align_corners=True), image, targets)}
    if kornia_transform is not None:
        def kornia_tps(x, c):
            kernel_weights, affine_weights = kornia_transform.get_tps_transform(rest.expand_as(c), c)
            return kornia_transform.warp_image_tps(x, c, kernel_weights, affine_weights, align_corners=True)
        ours["tps"]["kornia"] = _forward_backward(kornia_tps, image, targets)
    return ours


# --------------------------------------------------------------------------------------------------------------
# Part 2: one training step
# --------------------------------------------------------------------------------------------------------------

def step_contestants(batch: int, input_size: int, names: list[str]) -> dict[str, Callable[[], object]]:
    """{model name: one training step of the ``--full`` recipe on a fixed random batch}.

    A name ending in :data:`INPUT_GRAD` is the plain model whose step also computes the gradient w.r.t. its input,
    as it must behind any trainable layer such as a transformer.
    """
    images = torch.rand(batch, 1, input_size, input_size)
    labels = torch.randint(0, 10, (batch,))
    recipe = make_config("full")
    contestants = {}
    for name in names:
        model = build_model(name.removesuffix(INPUT_GRAD), input_size)
        optimizers, _ = make_optimizers(model, recipe)
        inputs = images.clone().requires_grad_(name.endswith(INPUT_GRAD))

        def step(model=model, optimizers=optimizers, inputs=inputs):
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            inputs.grad = None
            F.cross_entropy(model(inputs), labels).backward()
            for optimizer in optimizers:
                optimizer.step()
        contestants[name] = step
    return contestants


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}

    warps = {}
    for family, contestants in warp_contestants(args.batch, args.warp_size).items():
        seconds = median_times(contestants, args.repeats)
        warps[family] = {"median_ms": {k: 1e3 * v for k, v in seconds.items()},
                         "kornia_over_triptych": seconds["kornia"] / seconds["triptych"] if "kornia" in seconds
                         else None,
                         "torch_over_triptych": seconds["torch"] / seconds["triptych"] if "torch" in seconds
                         else None}
        print(f"{family:10s} " + "  ".join(f"{k} {1e3 * v:8.2f} ms" for k, v in seconds.items()), flush=True)

    steps = {}
    sizes = [28] if args.smoke else [28, 42, 60]
    families = {"CNN": ["CNN", "CNN" + INPUT_GRAD, "ST-CNN Aff", "ST-CNN Proj", "ST-CNN TPS"],
                "FCN": ["FCN", "FCN" + INPUT_GRAD, "ST-FCN Aff", "ST-FCN Proj", "ST-FCN TPS"]}
    for size in sizes:
        for plain, names in families.items():
            seconds = median_times(step_contestants(args.batch, size, names), args.step_repeats, warmup=1)
            for name in names:
                steps.setdefault(str(size), {})[name] = {"median_ms": 1e3 * seconds[name],
                                                         "over_plain": seconds[name] / seconds[plain]}
            print(f"{size}: " + "  ".join(f"{n} {1e3 * s:8.1f} ms" for n, s in seconds.items()), flush=True)

    env = environment()
    results = {"config": config, "environment": env, "warps": warps, "steps": steps,
               "targets": {"warp_kornia_over_triptych_at_least": WARP_TARGET,
                           "st_cnn_step_over_cnn_at_most": STEP_TARGET}}
    write(args.out, results, command_line(), config, env, args)
    return results


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**no**")


def write(out: Path, results: dict, command: str, config: dict, env: dict, args: argparse.Namespace) -> None:
    warp_rows = []
    for family, row in results["warps"].items():
        ms, ratio = row["median_ms"], row["kornia_over_triptych"]
        warp_rows.append([family, ms["triptych"], ms.get("kornia", "—"), ms.get("torch", "—"),
                          "—" if ratio is None else ratio, _met(None if ratio is None else ratio >= WARP_TARGET)])
    step_rows = []
    for size, models in results["steps"].items():
        for name, row in models.items():
            target = _met(row["over_plain"] <= STEP_TARGET) if name.startswith("ST-CNN") else "—"
            step_rows.append([size, name, row["median_ms"], row["over_plain"], target])
    kornia_note = "" if kornia_transform is not None else "\nkornia is not installed: its columns are empty.\n"
    text = "\n\n".join([
        "# Spatial transformers: speed",
        provenance_markdown(command, config, env),
        f"## Warps: forward + backward, batch {args.batch}, {args.warp_size}x{args.warp_size}, 1 channel\n\n"
        "Median over interleaved repeats; gradients to the image and the transform parameters; grid generation "
        "included; align_corners=True throughout (kornia's default). Ratio = kornia time / triptych time "
        f"(target >= {WARP_TARGET}). kornia's TPS solves its system on every call and centres its kernels on the "
        "targets; triptych precomputes what depends only on the control lattice.\n" + kornia_note + "\n" +
        markdown_table(["family", "triptych ms", "kornia ms", "torch ms", "kornia / triptych", "target met"],
                       warp_rows),
        f"## Training step of the `--full` recipe, cross-entropy, batch {args.batch}\n\n"
        "SGD with momentum for the classifier, Adam for the localisation net (`make_optimizers`). "
        "Ratio = model time / plain model time of the family at the same input size "
        f"(target for ST-CNN <= {STEP_TARGET}). At 42 and 60 the ST models classify the 2x average-pooled "
        "transformer output, so they can be faster than the plain model. The plain model's \"(input gradient)\" row "
        "also computes the gradient w.r.t. its input, which any trainable layer in front of it needs: at 28×28 that "
        "input gradient of the first convolution, not the transformer, is most of the ST-CNN's extra time.\n\n" +
        markdown_table(["input", "model", "step ms", "/ plain", "target met"], step_rows),
    ]) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "speed.md", text)
    atomic_write_text(out / "speed.json", to_json(results))
    print(f"wrote {out / 'speed.md'} and {out / 'speed.json'}")


if __name__ == "__main__":
    main()
