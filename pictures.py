"""Pictures of runs: router weights, kept fraction, mask overlap (--plots), the sparsity sweep, --curves.

Plumbing: nothing here computes a result. Each function draws a results dict (evaluate.evaluate_model)
or a run's metrics.jsonl into a PNG written whole (rundir.write_atomically); matplotlib is an extra,
and a missing one is one EvaluateError line before any work.
"""

import json
import math
from pathlib import Path

import torch
from rich.console import Console
from torch import Tensor

import cli
import monitor
import rundir
from tables import EvaluateError, split_average


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or one clear line if the extra is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EvaluateError("pictures need matplotlib: pip install -e '.[plots]' from the repository root, "
                            "or drop --plots") from None
    return plt


def _save(figure, path: Path) -> None:
    try:
        rundir.write_atomically(Path(path), lambda tmp: figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    finally:
        pyplot().close(figure)


def _annotate(axes, image, matrix, fmt: str = "{:.2f}", fontsize: int = 6) -> None:
    """Each finite cell's value written on it, dark on cells the colour map draws light and light on dark."""
    for i, row in enumerate(torch.as_tensor(matrix, dtype=torch.float64).tolist()):
        for j, value in enumerate(row):
            if math.isfinite(value):
                red, green, blue, _ = image.cmap(image.norm(value))
                light = 0.299 * red + 0.587 * green + 0.114 * blue > 0.5
                axes.text(j, i, fmt.format(value), ha="center", va="center", fontsize=fontsize,
                          color="black" if light else "white")


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


def router_note(results: dict) -> str | None:
    """Why a results dict has no router heat map worth drawing (None: it has one): PMF has no router,
    and with one expert every task's weight is 1."""
    experts = len(next(iter(results["domains"].values()))["router_weights"])
    if results.get("method") != "smat":
        return f"no router_weights.png: {results.get('method')} has no router (one dense expert, w = 1 on every task)"
    if experts < 2:
        return "no router_weights.png: with one expert the router's weight is 1 on every task"
    return None


def plot_router_weights(results: dict, path: Path, log: Console | None = None) -> None:
    """Heatmap domains × experts of the router's merging weights, averaged over each domain's episodes;
    for a model without a router (`router_note`), one line on `log` (default stderr) instead."""
    note = router_note(results)
    if note is not None:
        cli.print_line(log or cli.console(stderr=True), note)
        return
    plt = pyplot()
    names = list(results["domains"])
    matrix = [results["domains"][d]["router_weights"] for d in names]
    experts = len(matrix[0])
    figure, axes = plt.subplots(figsize=(2.2 + 0.5 * experts, 1.0 + 0.22 * len(names)))
    image = axes.imshow(matrix, aspect="auto", cmap="viridis")
    axes.set_xticks(range(experts), [str(m) for m in range(experts)], fontsize=7)
    axes.set_yticks(range(len(names)), [f"{d} ({results['domains'][d]['split']})" for d in names], fontsize=7)
    axes.set_xlabel("expert", fontsize=8)
    axes.set_ylabel("domain (split)", fontsize=8)
    axes.set_title("router weight per domain", fontsize=9)
    figure.colorbar(image, ax=axes).set_label(f"mean merging weight w (uniform: 1/{experts} = {1 / experts:.3f})",
                                              fontsize=8)
    _save(figure, path)


def fitted_range(values: Tensor, step: float = 0.05) -> tuple[float, float]:
    """The finite values' range rounded outwards to `step`, within [0, 1] (a fraction's colour scale
    fitted to the data, so that kept fractions of 0.1-0.35 are not squeezed into a fifth of 0-1)."""
    finite = values[values.isfinite()]
    low = math.floor(finite.min().item() / step) * step if finite.numel() else 0.0
    high = math.ceil(finite.max().item() / step) * step if finite.numel() else 1.0
    if high - low < step:
        low, high = max(0.0, low - step), min(1.0, high + step)
    return round(max(0.0, low), 6), round(min(1.0, high), 6)


def plot_kept_fraction(results: dict, path: Path) -> None:
    """Per expert, a heatmap blocks × module types (qkv, proj, fc1, fc2, norms, embeddings) of the
    fraction of parameters its test mask keeps, pooled by parameter count (`kept_by_module`), annotated;
    one colour scale for all experts, fitted to the data (`fitted_range`)."""
    plt = pyplot()
    blocks, types, table = kept_by_module(results)
    low, high = fitted_range(table)
    n = table.shape[0]
    columns = min(n, 4)
    rows = math.ceil(n / columns)
    figure, grid = plt.subplots(rows, columns, squeeze=False, sharey=True, layout="constrained",
                                figsize=(0.9 + 0.55 * len(types) * columns, 0.8 + (0.28 * len(blocks) + 0.6) * rows))
    for m, axes in enumerate(grid.flat):
        if m >= n:
            axes.axis("off")
            continue
        image = axes.imshow(table[m].numpy(), aspect="auto", cmap="viridis", vmin=low, vmax=high)
        _annotate(axes, image, table[m].tolist(), fontsize=5 if len(blocks) > 8 else 7)
        axes.set_xticks(range(len(types)), types, fontsize=7)
        axes.set_yticks(range(len(blocks)), blocks, fontsize=7)
        axes.set_title(f"expert {m}", fontsize=8)
        axes.set_xlabel("module type", fontsize=7)
        if m % columns == 0:
            axes.set_ylabel("block", fontsize=7)
    figure.colorbar(image, ax=grid.ravel().tolist()).set_label(
        f"kept fraction (z > 0); scale {low:g}-{high:g}, fitted to the data", fontsize=8)
    figure.suptitle("fraction of parameters each expert's mask keeps, pooled by parameter count", fontsize=9)
    _save(figure, path)


def keep_rates(results: dict) -> Tensor:
    """Each expert's keep rate p_m, the fraction of all backbone parameters its test mask keeps (z > 0):
    1 - the hard sparsity of results["sparsity"], or, where a results file lacks it, the kept fractions
    pooled by parameter count."""
    if "per_expert" in (results.get("sparsity") or {}):
        return 1 - torch.tensor(results["sparsity"]["per_expert"], dtype=torch.float64)
    kept, counts = results["experts"]["kept_fraction"], results["experts"].get("parameters") or {}
    weights = torch.tensor([float(counts.get(n, 1)) for n in kept], dtype=torch.float64)
    return (weights[:, None] * torch.tensor(list(kept.values()), dtype=torch.float64)).sum(0) / weights.sum()


def chance_overlap(keep: Tensor) -> Tensor:
    """The Jaccard overlap |a ∧ b| / |a ∨ b| of evaluate.mask_overlap expected for two masks that keep
    the fractions p_a and p_b of P parameters independently of each other: a parameter is kept by both
    with probability p_a p_b and by either with p_a + p_b - p_a p_b, so for large P the overlap is
    p_a p_b / (p_a + p_b - p_a p_b) (0 where neither mask keeps anything)."""
    both = keep[:, None] * keep[None, :]
    return both / (keep[:, None] + keep[None, :] - both).clamp_min(1e-12)


def plot_mask_overlap(results: dict, path: Path, log: Console | None = None) -> None:
    """Experts × experts Jaccard overlap of the test masks, coloured by its excess over chance
    (`chance_overlap`: what independent masks with the same keep rates would share) on a scale centred
    on chance and spanning the whole possible range, -1 to 1; each cell shows the overlap itself.
    The diagonal (always 1) is left blank. With one expert there is no pair: one line on `log` instead."""
    overlap = torch.tensor(results["experts"]["overlap"], dtype=torch.float64)
    if len(overlap) < 2:
        cli.print_line(log or cli.console(stderr=True), "no mask_overlap.png: one expert has no other to overlap")
        return
    plt = pyplot()
    overlap.fill_diagonal_(float("nan"))
    chance = chance_overlap(keep_rates(results))
    n = overlap.shape[0]
    figure, axes = plt.subplots(figsize=(2.4 + 0.55 * n, 1.4 + 0.5 * n))
    colours = plt.get_cmap("RdBu_r").with_extremes(bad="white")
    image = axes.imshow((overlap - chance).numpy(), cmap=colours, vmin=-1, vmax=1)
    _annotate(axes, image, overlap.tolist(), fontsize=7 if n <= 8 else 5)
    labels = [str(m) for m in range(n)]
    axes.set_xticks(range(n), labels, fontsize=7)
    axes.set_yticks(range(n), labels, fontsize=7)
    axes.set_xlabel("expert", fontsize=8)
    axes.set_ylabel("expert", fontsize=8)
    off = chance[~torch.eye(n, dtype=torch.bool)]
    level = f"{off.min().item():.3f}" + ("" if off.max() - off.min() < 5e-4 else f"-{off.max().item():.3f}")
    axes.set_title(f"mask overlap |a∧b| / |a∨b| on each cell\nchance (independent masks, same keep rates): {level}",
                   fontsize=9)
    figure.colorbar(image, ax=axes).set_label("overlap − chance", fontsize=8)
    _save(figure, path)


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of RUN/metrics.jsonl that stand (rundir.standing: a record a killed session logged past
    where the next one resumed is dropped, so a log an earlier version left overlapping draws one line; a
    line cut short by a kill is skipped), accuracies in percent whichever format wrote them
    (monitor.in_percent), or an EvaluateError line."""
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
    records = [record for record, stands in zip(records, rundir.standing(records)) if stands]  # a killed session's tail
    if not records:
        raise EvaluateError(f"{path} holds no training records yet; draw the curves once the run has logged")
    return monitor.in_percent(records)


SMOOTHED = ("loss", "ce", "accuracy", "pretrained_accuracy", "router_entropy")  # one meta-batch each: noisy
WINDOW = 9  # log lines in the centred moving average of a smoothed curve


def moving_average(values: list[float], window: int = WINDOW) -> list[float]:
    """The centred moving average over `window` values, the window shrinking at both ends."""
    half = window // 2
    return [sum(values[max(0, i - half): i + half + 1]) / len(values[max(0, i - half): i + half + 1])
            for i in range(len(values))]


CURVE_PANELS = (("loss (nats)", ("loss", "ce")), ("query accuracy %", ("accuracy", "pretrained_accuracy")),
                ("sparsity per expert", ("sparsity",)), ("mean λ (multiplier_mean)", ("multiplier_mean",)),
                ("router entropy (nats)", ("router_entropy",)), ("validation accuracy %", ("val_accuracy",)))


def plot_curves(records: list[dict], path: Path, title: str = "", target: float | None = None) -> None:
    """Training curves of metrics.jsonl against episodes, one panel each of those the run logged
    (CURVE_PANELS; PMF logs three): loss and ce; accuracy against the frozen backbone's
    (pretrained_accuracy) on the same tasks; sparsity per expert; mean λ; router entropy; validation
    accuracy. Each training line is one meta-batch of a few tasks, so the noisy fields (SMOOTHED) are
    drawn as a centred moving average over WINDOW log lines with the raw values faint behind.
    `target`: the sparsity target τ, drawn as a dotted line."""
    plt = pyplot()
    train = [r for r in records if "loss" in r]
    panels = [(name, [f for f in fields if any(f in r for r in records)]) for name, fields in CURVE_PANELS]
    panels = [(name, fields) for name, fields in panels if fields]
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, grid = plt.subplots(rows, columns, squeeze=False, figsize=(4.4 * columns, 3.3 * rows))
    for axes, (name, fields) in zip(grid.flat, panels):
        smoothed, crowded = False, False
        for field, colour in zip(fields, ("tab:blue", "tab:orange")):
            rows_of = [r for r in (train if field != "val_accuracy" else records) if field in r]
            x = [r["episode"] for r in rows_of]
            if field == "sparsity":  # one line per expert
                crowded = len(rows_of[0][field]) > 8
                for m in range(len(rows_of[0][field])):
                    axes.plot(x, [r[field][m] for r in rows_of], linewidth=1, label=f"expert {m}")
                if target is not None:
                    axes.axhline(target, color="black", linestyle=":", linewidth=1, label="τ")
            elif field in SMOOTHED and len(rows_of) > 2:
                y = [r[field] for r in rows_of]
                axes.plot(x, y, color=colour, alpha=0.25, linewidth=0.8)
                axes.plot(x, moving_average(y), color=colour, linewidth=1.5, label=field)
                smoothed = True
            else:
                axes.plot(x, [r[field] for r in rows_of], color=colour, marker="o" if field == "val_accuracy" else None,
                          markersize=3, linewidth=1.2, label=field)
        if not crowded:
            axes.legend(fontsize=7)
        axes.set_title(name + (f"\nmoving average of {WINDOW} log lines, raw faint" if smoothed else ""), fontsize=9)
        axes.set_xlabel("training episodes", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.grid(alpha=0.3)
    for axes in list(grid.flat)[len(panels):]:
        axes.remove()
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
                # in the right margin, outside the axes, where no point of the sweep can be
                axes.annotate(f"{name} {split.upper()}", (1, level[0]), xycoords=axes.get_yaxis_transform(),
                              textcoords="offset points", xytext=(4, 0), fontsize=7, color=colour, va="center",
                              annotation_clip=False)
    axes.set_xlabel("target sparsity τ")
    axes.set_ylabel("accuracy % (± 95% CI over episodes)")
    axes.legend(fontsize=8, loc="best")
    _save(figure, path)
