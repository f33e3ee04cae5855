"""Pictures of runs: router weights, kept fraction, mask overlap (--plots), the sparsity sweep, --curves.

Plumbing: nothing here computes a result. Each function draws a results dict (evaluate.evaluate_model)
or a run's metrics.jsonl into a PNG written whole (rundir.write_atomically); matplotlib is an extra,
and a missing one is one EvaluateError line before any work.
"""

import json
import math
from pathlib import Path

import torch
from torch import Tensor

import monitor
import rundir
from tables import EvaluateError, split_average

PICTURES = ("router_weights.png", "kept_fraction.png", "mask_overlap.png")  # --plots, in each run directory


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or one clear line if the extra is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EvaluateError("pictures need matplotlib: pip install 'smat-reference[plots]', or drop --plots")
    return plt


def _save(figure, path: Path) -> None:
    try:
        rundir.write_atomically(Path(path), lambda tmp: figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    finally:
        pyplot().close(figure)


def _heatmap(matrix: list[list[float]], rows: list[str], columns: list[str], title: str, path: Path,
             xlabel: str = "", ylabel: str = "") -> None:
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(1.2 + 0.5 * len(columns), 1.0 + 0.22 * len(rows)))
    image = axes.imshow(matrix, aspect="auto", cmap="viridis")
    axes.set_xticks(range(len(columns)), columns, fontsize=7)
    axes.set_yticks(range(len(rows)), rows, fontsize=7)
    axes.set_xlabel(xlabel, fontsize=8)
    axes.set_ylabel(ylabel, fontsize=8)
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes)
    _save(figure, path)


def _annotate(axes, matrix, fmt: str = "{:.2f}", fontsize: int = 6) -> None:
    """Each finite cell's value written on it, dark on light cells and light on dark ones."""
    values = torch.as_tensor(matrix, dtype=torch.float64)
    finite = values[values.isfinite()]
    middle = (finite.min() + finite.max()).item() / 2 if finite.numel() else 0.0
    for i, row in enumerate(values.tolist()):
        for j, value in enumerate(row):
            if math.isfinite(value):
                axes.text(j, i, fmt.format(value), ha="center", va="center", fontsize=fontsize,
                          color="black" if value > middle else "white")


MODULE_TYPES = ("embed", "qkv", "proj", "fc1", "fc2", "norms", "other")


def module_of(name: str) -> tuple[str, str]:
    """(block, module type) of a backbone tensor named as DINO/timm name them: "blocks.3.attn.qkv.weight"
    -> ("block 3", "qkv"); patch, position and class embeddings -> ("embeddings", "embed"); the final
    norm -> ("final norm", "norms")."""
    parts = name.split(".")
    if parts[0] in ("cls_token", "pos_embed", "patch_embed", "reg_token", "dist_token"):
        return "embeddings", "embed"
    block = f"block {parts[1]}" if parts[0] == "blocks" and len(parts) > 2 else ("final norm" if "norm" in parts[0] else "other")
    kind = next((k for k in ("qkv", "proj", "fc1", "fc2") if k in parts[2:]), None)
    return block, kind or ("norms" if any("norm" in p for p in parts) else "other")


def kept_by_module(results: dict) -> tuple[list[str], list[str], Tensor]:
    """(blocks, module types, experts × blocks × types kept fraction) from results["experts"]: the
    tensors of each (block, type) pooled, each weighted by its parameter count (equal weights for a
    results file without "parameters"); NaN where a block has no tensor of that type."""
    kept, counts = results["experts"]["kept_fraction"], results["experts"].get("parameters") or {}
    groups: dict[tuple[str, str], list[str]] = {}
    for name in kept:
        groups.setdefault(module_of(name), []).append(name)
    blocks = list(dict.fromkeys(block for block, _ in groups))
    types = [t for t in MODULE_TYPES if any(kind == t for _, kind in groups)]
    n_experts = len(next(iter(kept.values())))
    table = torch.full((n_experts, len(blocks), len(types)), float("nan"), dtype=torch.float64)
    for (block, kind), names in groups.items():
        weights = torch.tensor([float(counts.get(n, 1)) for n in names], dtype=torch.float64)
        fractions = torch.tensor([kept[n] for n in names], dtype=torch.float64)  # tensors × experts
        table[:, blocks.index(block), types.index(kind)] = (weights[:, None] * fractions).sum(0) / weights.sum()
    return blocks, types, table


def plot_router_weights(results: dict, path: Path) -> None:
    """Heatmap domains × experts of the router's merging weights, averaged over each domain's episodes."""
    names = list(results["domains"])
    matrix = [results["domains"][d]["router_weights"] for d in names]
    labels = [f"{d} ({results['domains'][d]['split']})" for d in names]
    _heatmap(matrix, labels, [str(m) for m in range(len(matrix[0]))], "router weight per domain", path,
             xlabel="expert", ylabel="domain (split)")


def plot_kept_fraction(results: dict, path: Path) -> None:
    """Per expert, a heatmap blocks × module types (qkv, proj, fc1, fc2, norms, embeddings) of the
    fraction of parameters its test mask keeps, pooled by parameter count (`kept_by_module`), annotated."""
    plt = pyplot()
    blocks, types, table = kept_by_module(results)
    n = table.shape[0]
    columns = min(n, 4)
    rows = math.ceil(n / columns)
    figure, grid = plt.subplots(rows, columns, squeeze=False, sharey=True, layout="constrained",
                                figsize=(0.9 + 0.55 * len(types) * columns, 0.8 + (0.28 * len(blocks) + 0.6) * rows))
    for m, axes in enumerate(grid.flat):
        if m >= n:
            axes.axis("off")
            continue
        image = axes.imshow(table[m].numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
        _annotate(axes, table[m].tolist(), fontsize=5 if len(blocks) > 8 else 7)
        axes.set_xticks(range(len(types)), types, fontsize=7)
        axes.set_yticks(range(len(blocks)), blocks, fontsize=7)
        axes.set_title(f"expert {m}", fontsize=8)
        axes.set_xlabel("module type", fontsize=7)
        if m % columns == 0:
            axes.set_ylabel("block", fontsize=7)
    figure.colorbar(image, ax=grid.ravel().tolist(), label="kept fraction (z > 0), by parameter count")
    figure.suptitle("fraction of parameters each expert's mask keeps", fontsize=9)
    _save(figure, path)


def plot_mask_overlap(results: dict, path: Path) -> None:
    """Experts × experts Jaccard overlap of the test masks, the diagonal (always 1) left blank so that
    the colour scale spans the off-diagonal values, each written on its cell."""
    plt = pyplot()
    overlap = torch.tensor(results["experts"]["overlap"], dtype=torch.float64)
    overlap.fill_diagonal_(float("nan"))
    n = overlap.shape[0]
    figure, axes = plt.subplots(figsize=(1.6 + 0.55 * n, 1.0 + 0.5 * n))
    colours = plt.get_cmap("viridis").with_extremes(bad="white")
    image = axes.imshow(overlap.numpy(), cmap=colours)
    _annotate(axes, overlap.tolist(), fontsize=7 if n <= 8 else 5)
    labels = [str(m) for m in range(n)]
    axes.set_xticks(range(n), labels, fontsize=7)
    axes.set_yticks(range(n), labels, fontsize=7)
    axes.set_xlabel("expert", fontsize=8)
    axes.set_ylabel("expert", fontsize=8)
    axes.set_title("mask overlap |a∧b| / |a∨b| (diagonal = 1, left blank)", fontsize=9)
    figure.colorbar(image, ax=axes, label="Jaccard overlap")
    _save(figure, path)


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of RUN/metrics.jsonl (a line cut short by a kill is skipped), accuracies in percent
    whichever format wrote them (monitor.in_percent), or an EvaluateError line."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise EvaluateError(f"cannot read {path} ({type(error).__name__}); --curves needs a run directory "
                            f"made by train.py") from None
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("episode"), (int, float)):
            records.append(record)
    if not records:
        raise EvaluateError(f"{path} holds no training records yet; draw the curves once the run has logged")
    return monitor.in_percent(records)


def plot_curves(records: list[dict], path: Path, title: str = "", target: float | None = None) -> None:
    """Training curves of metrics.jsonl against episodes, one panel each: loss and ce; accuracy against
    the frozen backbone's (pretrained_accuracy) on the same tasks; sparsity per expert; mean λ;
    router entropy; validation accuracy. A panel whose fields the run did not log (PMF) says so.
    `target`: the sparsity target τ, drawn as a dotted line."""
    plt = pyplot()
    train = [r for r in records if "loss" in r]
    figure, grid = plt.subplots(2, 3, figsize=(13, 6.5))
    panels = [("loss", ("loss", "ce")), ("query accuracy %", ("accuracy", "pretrained_accuracy")),
              ("sparsity per expert", ("sparsity",)), ("mean λ (multiplier_mean)", ("multiplier_mean",)),
              ("router entropy (nats)", ("router_entropy",)), ("validation accuracy %", ("val_accuracy",))]
    for axes, (name, fields) in zip(grid.flat, panels):
        drawn = False
        for field in fields:
            rows = [r for r in (train if field != "val_accuracy" else records) if field in r]
            if not rows:
                continue
            x = [r["episode"] for r in rows]
            if field == "sparsity":  # one line per expert
                for m in range(len(rows[0][field])):
                    axes.plot(x, [r[field][m] for r in rows], linewidth=1, label=f"expert {m}")
                if target is not None:
                    axes.axhline(target, color="black", linestyle=":", linewidth=1, label="τ")
            else:
                axes.plot(x, [r[field] for r in rows], marker="o" if field == "val_accuracy" else None,
                          markersize=3, linewidth=1.2, label=field)
            drawn = True
        if not drawn:
            axes.text(0.5, 0.5, "not logged by this run", ha="center", va="center", transform=axes.transAxes)
        elif field != "sparsity" or len(rows[0][field]) <= 8:
            axes.legend(fontsize=7)
        axes.set_title(name, fontsize=9)
        axes.set_xlabel("training episodes", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.grid(alpha=0.3)
    figure.suptitle(title or "training curves (metrics.jsonl)", fontsize=10)
    figure.tight_layout()
    _save(figure, path)


def draw_curves(run_dirs: list[Path], out: Path | None) -> list[Path]:
    """training_curves.png of every run, in the run directory or OUT/<run name>/; checks every run first."""
    pyplot()
    if out is not None:
        rundir.check_target_directory(out, "--out")
    records = [read_metrics(r) for r in run_dirs]
    targets = [Path(r) if out is None else Path(out) / Path(r).name for r in run_dirs]
    for target in targets:
        rundir.check_run_files(target, ("training_curves.png",))
    for run_dir, target, record in zip(run_dirs, targets, records):
        try:
            tau = float(json.loads((Path(run_dir) / "config.json").read_text())["sparsity"])
        except (OSError, ValueError, KeyError, TypeError):
            tau = None  # the line is a guide only: the curves need metrics.jsonl alone
        target.mkdir(parents=True, exist_ok=True)
        plot_curves(record, target / "training_curves.png", f"{Path(run_dir).name}: training curves (metrics.jsonl)", tau)
    return [t / "training_curves.png" for t in targets]


def plot_sparsity_sweep(sweep: dict[float, dict], path: Path, references: dict[str, dict] | None = None) -> None:
    """ID and OOD average accuracy (± 95% CI over episodes) against the target sparsity τ, one point
    per τ; `sweep` maps τ to a results dict (one run, or average_runs of several seeds).
    `references` (e.g. {"Pre": ..., "PMF": ...}) are drawn as labelled horizontal lines per split."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(5.5, 3.8))
    taus = sorted(sweep)
    for split, colour in (("id", "tab:blue"), ("ood", "tab:orange")):
        points = [(tau, split_average(sweep[tau], split)) for tau in taus]
        points = [(tau, value) for tau, value in points if value is not None]
        if not points:
            continue
        axes.errorbar([t for t, _ in points], [v[0] for _, v in points], yerr=[v[1] for _, v in points],
                      fmt="o-", capsize=3, color=colour, label=f"SMAT, {split.upper()} average")
        for (name, reference), style in zip((references or {}).items(), (":", "--", "-.")):
            level = split_average(reference, split)
            if level is not None:
                axes.axhline(level[0], linestyle=style, color=colour, linewidth=1)
                axes.annotate(f"{name} {split.upper()}", (taus[-1], level[0]), textcoords="offset points",
                              xytext=(4, 0), fontsize=7, color=colour, va="center")
    axes.set_xlabel("target sparsity τ")
    axes.set_ylabel("accuracy % (± 95% CI over episodes)")
    axes.legend(fontsize=8, loc="center left")
    _save(figure, path)
