"""Meta-train SMAT (or the dense PMF baseline): `python train.py --sparsity 0.9 --experts 8`.

With no other flag this uses the embedded procedural benchmark and the shipped tiny ViT (the
stand-in for DINO, pretrained once on a disjoint corpus: standin.py), meta-trains on CPU or GPU,
validates on ID validation classes (keeping the best model), and ends with the ID/OOD test table of
the model beside the frozen backbone (Pre) on the same episodes, with their paired difference. Read top to bottom: the run
directory and checkpoints, the backbone, the learning-rate schedule, then `meta_train` (the loop),
then the command line. `torchrun --nproc_per_node=N train.py ...` splits every meta-batch across N
processes. The method itself lives in smat.py; this file owns optimisers, devices and time.
"""

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import backbone as backbones
import data
import evaluate
import smat
from smat import SMAT, Config

CHECKPOINT_FORMAT = "smat-run/1"


class RunError(ValueError):
    """A run directory or checkpoint that cannot be used; the message is one line."""


class NonFiniteLoss(RuntimeError):
    """Training produced inf/nan; the message names the loss term and the step."""


# --- run directory and checkpoints -----------------------------------------------------------------


def atomic_save(obj: object, path: Path) -> None:
    """torch.save to a temporary file in the same directory, then rename: a reader (or a resumed run)
    sees the old file or the new one, never half of one, whenever the process is killed."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_checkpoint(path: Path) -> dict:
    """torch.load with weights_only=True: tensors and plain data only, never code."""
    if not path.is_file():
        raise RunError(f"{path} does not exist; a run directory holds checkpoint.pt (or best.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated file, foreign pickle, anything torch refuses
        first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise RunError(f"{path} is not a readable checkpoint ({first}); expected a file written by train.py")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{path} is not a SMAT run checkpoint; expected format {CHECKPOINT_FORMAT!r}")
    return state


def config_from_dict(values: dict) -> Config:
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise RunError(f"unknown configuration keys {unknown[:5]}; valid keys are the fields of smat.Config")
    return Config(**values)


def read_config(run_dir: Path) -> Config:
    """The Config in a run's config.json; a missing or unparsable file is one RunError line."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise RunError(f"{run_dir} is not a run directory; it must contain config.json (made by train.py)")
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RunError(f"{path} is not readable JSON ({error}); expected the config.json written by train.py")
    if not isinstance(values, dict):
        raise RunError(f"{path} holds a {type(values).__name__}, not the JSON object written by train.py")
    return config_from_dict(values)


def build_model(cfg: Config, backbone_spec: dict) -> SMAT:
    """The SMAT module for `cfg` on a ViT of `backbone_spec`, ready for a checkpoint's state dict
    (which holds θ_pre, so the ViT's own random weights are overwritten)."""
    return SMAT(backbones.VisionTransformer(backbones.ViTSpec(**backbone_spec)), cfg)


def load_run(run_dir: Path, device: str | torch.device = "cpu", which: Literal["best", "last"] = "best"):
    """(model, config, checkpoint) of a run: best.pt if present (and asked for), else checkpoint.pt."""
    run_dir = Path(run_dir)
    saved = read_config(run_dir).to_dict()
    path = run_dir / "best.pt" if which == "best" and (run_dir / "best.pt").is_file() else run_dir / "checkpoint.pt"
    state = read_checkpoint(path)
    cfg = config_from_dict(state["config"])
    # --resume may change only `episodes`, so best.pt from before a resume may differ from config.json there
    changed = [k for k, v in cfg.to_dict().items() if k != "episodes" and saved[k] != v]
    if changed:
        raise RunError(f"{path} was trained with another {', '.join(changed[:3])} than {run_dir / 'config.json'}; "
                       f"it is not this run's checkpoint")
    model = build_model(cfg, state["backbone_spec"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise RunError(f"{path} does not match its configuration ({str(error).splitlines()[0][:120]})")
    return model.to(device), cfg, state


# --- backbone: a pretrained stand-in for DINO, or DINO itself --------------------------------------


def resolve_backbone(cfg: Config) -> backbones.VisionTransformer:
    """The frozen θ_pre, from `--backbone`:

    - "tiny": the committed stand-in for DINO (weights/tiny.pt), pretrained once on a procedural
      corpus disjoint from every benchmark domain (standin.py, docs/benchmark.md);
    - "vit_small_patch16" / "vit_base_patch16": the official DINO weights (download), or
      "vit_small_patch16:PATH" for a local copy of them;
    - a path to a file written by backbone.save_backbone.
    """
    name, _, weights = cfg.backbone.partition(":")
    if name in backbones.PRESETS and name.startswith("vit_"):
        model = backbones.build_backbone(name)
        backbones.load_dino_weights(model, weights or "dino")
        return model
    if name in backbones.SHIPPED_WEIGHTS and not weights:
        return backbones.load_shipped(name)
    path = Path(cfg.backbone).expanduser()
    if not path.exists():
        valid = ", ".join(sorted(backbones.PRESETS))
        raise backbones.BackboneError(f"unknown backbone {cfg.backbone!r}; use one of {valid}, PRESET:WEIGHTS or a file")
    return backbones.load_backbone(path)[0]


# --- schedule and small helpers ------------------------------------------------------------------


def lr_scale(step: int, total_steps: int, warmup_fraction: float) -> float:
    """Linear warm-up, then cosine decay to 0 over the run.

    NOTE: the official trainer steps an epoch-wise cosine (5 warm-up, 50 total epochs) but stops at
    epoch 25; we decay over the whole run (docs/deviations.md).
    """
    warmup = max(1, round(warmup_fraction * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))


def episode_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """The random numbers of episode `index` (router noise, gate samples): a function of (seed, index),
    so a resumed or multi-process run draws exactly what an uninterrupted one would."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"device {device!r} asked for but CUDA is not available; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise RunError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


def autocast(cfg: Config, device: torch.device):
    """bf16 (or fp16) autocast on CUDA; CPU runs in fp32 (CPU bf16 matmuls are slower, not faster)."""
    enabled = device.type == "cuda" and cfg.precision != "fp32"
    dtype = torch.float16 if cfg.precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def protocol(cfg: Config, stage: Literal["train", "test"]) -> data.Protocol:
    if stage == "train":
        return data.Protocol(cfg.train_protocol, cfg.train_ways, cfg.train_shots, cfg.train_queries)
    return data.Protocol(cfg.test_protocol, cfg.test_ways, cfg.test_shots, cfg.test_queries)


def check_protocols(sources: list, cfg: Config) -> None:
    """Draw one episode plan per (domain, partition) the run will use, so that an impossible protocol
    (too many ways, too few images per class) fails before any work, not at the first validation."""
    for source in sources:
        needs = [("test", "test")] + ([("train", "train"), ("val", "test")] if source.split == "id" else [])
        for partition, stage in needs:
            try:
                data.sample_plan(source, partition, protocol(cfg, stage), np.random.default_rng(0))
            except data.DataError as error:
                raise data.DataError(f"domain {source.name}, {partition} classes: {error}") from None


def router_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy of the merging weights, mean over tasks: log M = uniform mixing, 0 = one expert."""
    return -(weights * weights.clamp_min(1e-12).log()).sum(-1).mean()


# --- the loop ---------------------------------------------------------------------------------------


def meta_train(
    cfg: Config,
    out_dir: Path,
    device: str = "auto",
    resume: bool = False,
    evaluate_at_end: bool = True,
    stop_after: int | None = None,
    cache_dir: Path | None = None,
    console: Console | None = None,
) -> Path:
    """Meta-train `cfg` into `out_dir`; returns the run directory. See the module docstring."""
    console = console or Console(stderr=False)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    main = rank == 0
    dev = pick_device(device)
    if world > 1 and cfg.meta_batch % world:
        raise RunError(f"meta_batch {cfg.meta_batch} must be a multiple of the {world} processes")
    cache_dir = Path(cache_dir) if cache_dir else data.default_cache_dir()

    # 1) Everything that can fail on bad input happens before the run directory is touched.
    sources = data.parse_data_spec(cfg.data, cfg.image_size, cache_dir, seed=0)
    id_sources = [s for s in sources if s.split == "id"]
    if not id_sources:
        raise data.DataError(f"--data {cfg.data!r} has no ID source to meta-train on; mark one with @id")
    check_protocols(sources, cfg)
    state = None
    if resume:
        state = read_checkpoint(out_dir / "checkpoint.pt")
        saved = config_from_dict(state["config"])
        if dataclasses.replace(saved, episodes=cfg.episodes) != cfg:
            raise RunError(f"{out_dir} was trained with another configuration; resume with the same flags")
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise RunError(f"{out_dir} already holds files; pass --resume {out_dir} or choose another --out")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(dev)

    torch.manual_seed(cfg.seed)
    if state is not None:
        model = build_model(cfg, state["backbone_spec"])
        model.load_state_dict(state["model"])
        backbone_spec = state["backbone_spec"]
    else:
        vit = resolve_backbone(cfg) if main or world == 1 else None
        if world > 1:  # rank 0 reads or downloads the weights; the others take them from it
            box = [vit.state_dict() if main else None, dataclasses.asdict(vit.spec) if main else None]
            dist.broadcast_object_list(box, src=0)
            vit = backbones.VisionTransformer(backbones.ViTSpec(**box[1]))
            vit.load_state_dict(box[0])
        backbone_spec = dataclasses.asdict(vit.spec)
        torch.manual_seed(cfg.seed)  # the same experts and router whatever loading the backbone drew
        model = SMAT(vit, cfg)
    model = model.to(dev)
    optimizer = smat.MetaOptimizer(model)
    scaler = torch.amp.GradScaler("cuda") if dev.type == "cuda" and cfg.precision == "fp16" else None
    total_steps = math.ceil(cfg.episodes / cfg.meta_batch)
    step, best_val, best_episode = 0, -1.0, -1
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, best_val, best_episode = state["step"], state["best_val"], state["best_episode"]
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(".*.tmp*"):  # left by a process killed while writing
            stale.unlink()
        atomic_write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", out_dir / "config.json")

    def last_good() -> str:
        path = out_dir / "checkpoint.pt"
        return f"the last good checkpoint is {path}" if path.is_file() else "no checkpoint had been written yet"

    def checkpoint() -> None:
        bad = [key for key, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:  # never replace the last good checkpoint with a broken model
            raise NonFiniteLoss(f"non-finite {bad[0]} at step {step} (after the optimiser step); {last_good()}")
        atomic_save(snapshot() | {"optimizer": optimizer.state_dict(),
                                  "scaler": scaler.state_dict() if scaler else None}, out_dir / "checkpoint.pt")

    def snapshot() -> dict:
        """The model and where the run stands: all of best.pt, and checkpoint.pt without the optimiser."""
        return {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "backbone_spec": backbone_spec,
                "model": model.state_dict(), "step": step, "episode": step * cfg.meta_batch,
                "best_val": best_val, "best_episode": best_episode}

    # 2) The loop: meta-batches of tasks, one optimiser step each [SMAT §3.10-3.11].
    mine = range(rank, cfg.meta_batch, world)  # this process's tasks within every meta-batch
    stream = data.TrainStream(id_sources, protocol(cfg, "train"), cfg.seed, cfg.image_size,
                              start=step * cfg.meta_batch + rank, stride=world)
    log_every = max(1, min(50, total_steps // 100))
    last_stop = total_steps if stop_after is None else min(total_steps, math.ceil(stop_after / cfg.meta_batch))
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} ep"),
               TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    started, start_episode, metrics_file = time.perf_counter(), step * cfg.meta_batch, out_dir / "metrics.jsonl"
    with stream, Progress(*columns, console=console, disable=not main) as bar:
        task = bar.add_task(cfg.method, total=total_steps * cfg.meta_batch, completed=step * cfg.meta_batch, stats="")
        while step < last_stop:
            outputs = []
            for index in mine:
                episode = next(stream).to(dev)
                model.tasks_seen.fill_(step * cfg.meta_batch + index)  # drives T_r, as the official counter
                with autocast(cfg, dev):
                    out = smat.meta_train_step(model, episode.support_images, episode.support_labels,
                                               episode.query_images, episode.query_labels, episode.n_way,
                                               episode_generator(cfg.seed, step * cfg.meta_batch + index, dev))
                loss = out.loss / cfg.meta_batch
                (scaler.scale(loss) if scaler else loss).backward()
                outputs.append(out)
            stats = {k: torch.stack([o.terms[k] for o in outputs]).mean() for k in outputs[0].terms}
            weights = torch.stack([o.weights for o in outputs])
            violation = torch.stack([o.violation for o in outputs]).sum(0) / cfg.meta_batch
            sparsity = torch.stack([o.hard_sparsity for o in outputs]).sum(0) / cfg.meta_batch
            if world > 1:  # gradients and dual statistics summed over processes = one big meta-batch
                for p in model.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                packed = torch.cat([violation, sparsity, torch.stack(list(stats.values()))])
                dist.all_reduce(packed)
                violation, sparsity = packed[: cfg.n_experts], packed[cfg.n_experts: 2 * cfg.n_experts]
                stats = dict(zip(stats, packed[2 * cfg.n_experts:] / world))
            bad = [name for name, value in stats.items() if not torch.isfinite(value)]  # one sync per step
            if bad:
                raise NonFiniteLoss(f"non-finite {bad[0]} at step {step} (episode {step * cfg.meta_batch}); "
                                    f"{last_good()}")
            optimizer.step(lr_scale(step, total_steps, cfg.warmup_fraction), violation, sparsity, scaler)
            step += 1
            episodes_done = step * cfg.meta_batch
            model.tasks_seen.fill_(episodes_done)
            if main and (step % log_every == 0 or step == last_stop):
                rate = (episodes_done - start_episode) / (time.perf_counter() - started)
                record = log_record(step, episodes_done, stats, sparsity, weights, model, cfg, rate)
                with open(metrics_file, "a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.update(task, completed=episodes_done, stats=short_stats(record))
            if episodes_done % cfg.val_every < cfg.meta_batch or step == total_steps:
                if main:
                    val = validate(model, id_sources, cfg, dev)
                    if val > best_val:
                        best_val, best_episode = val, episodes_done
                        atomic_save(snapshot(), out_dir / "best.pt")
                    with open(metrics_file, "a") as f:
                        f.write(json.dumps({"episode": episodes_done, "val_accuracy": val}) + "\n")
                    bar.update(task, description=f"{cfg.method} (val {val:.1f}%)")
            if main and (episodes_done % cfg.checkpoint_every < cfg.meta_batch or step in (last_stop, total_steps)):
                checkpoint()
            if world > 1:
                dist.barrier()
    if main and step == total_steps and evaluate_at_end:
        final_evaluation(out_dir, sources, dev, console)
    return out_dir


def log_record(step, episodes, stats, sparsity, weights, model, cfg, rate) -> dict:
    """One line of metrics.jsonl (docs/metrics.md says what each field means and healthy values)."""
    total_steps = math.ceil(cfg.episodes / cfg.meta_batch)
    record = {"step": step, "episode": episodes, "lr_scale": lr_scale(step - 1, total_steps, cfg.warmup_fraction)}
    record |= {k: round(v.item(), 5) for k, v in stats.items()}
    if cfg.uses_masks:
        record |= {
            "sparsity": [round(s, 4) for s in sparsity.tolist()],
            "sparsity_mean": round(sparsity.mean().item(), 4), "sparsity_std": round(sparsity.std(correction=0).item(), 4),
            "multiplier_mean": round(model.multipliers.mean().item(), 5),
            "router_entropy": round(router_entropy(weights).item(), 4),
            "router_temperature": round(smat.router_temperature(cfg, model.tasks_seen).item(), 4),
            "expected_density_mean": round(smat.expected_density(model.log_alpha.detach()).mean().item(), 4),
        }
    record["episodes_per_second"] = round(rate, 2)
    return record


def short_stats(r: dict) -> str:
    text = f"acc {r['accuracy']:.2f}"
    if "teacher_accuracy" in r:
        text += f" teacher {r['teacher_accuracy']:.2f}"
    if "sparsity_mean" in r:
        text += (f" sparsity {r['sparsity_mean']:.2f}±{r['sparsity_std']:.2f} λ {r['multiplier_mean']:.3f}"
                 f" H(w) {r['router_entropy']:.2f}")
    return text + f" {r['episodes_per_second']:.1f} ep/s"


def validate(model: SMAT, id_sources: list, cfg: Config, device) -> float:
    """Zero-shot accuracy on the ID domains' validation classes (fixed episodes), mean over domains."""
    results = evaluate.evaluate_model(model, id_sources, cfg, partition="val", episodes=cfg.val_episodes,
                                      seed=10_000, device=device)  # fixed validation episodes
    return results["id_avg"]


def final_evaluation(out_dir: Path, sources: list, device, console: Console) -> dict:
    """Test the best-on-validation model and the frozen backbone ("Pre") on the same episodes of every
    ID and OOD domain; write results.json / results.md, then print both with their paired difference."""
    model, cfg, _ = load_run(out_dir, device)
    run = {}
    for name, baseline in ((cfg.method, "model"), ("Pre", "pretrained")):
        run[name] = evaluate.evaluate_model(model, sources, cfg, partition="test", episodes=cfg.test_episodes,
                                            seed=0, device=device, baseline=baseline)  # seed 0, as evaluate.py
    evaluate.write_results(out_dir, run[cfg.method], {"Pre": run["Pre"]})
    results = evaluate.with_baselines(run[cfg.method], {"Pre": run["Pre"]})
    evaluate.print_table([run["Pre"], run[cfg.method]], ["Pre", cfg.method], console, results["paired"])
    return results


# --- the command line: parse, build a Config, call meta_train ------------------------------------

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
ERRORS = (smat.ConfigError, data.DataError, backbones.BackboneError, RunError)


@app.command()
def main(
    sparsity: Annotated[Optional[float], typer.Option(help="target fraction of zeros per expert, τ in [0, 1)")] = None,
    experts: Annotated[Optional[int], typer.Option(help="number of experts (≥ 1)")] = None,
    episodes: Annotated[Optional[int], typer.Option(help="meta-training episodes (tasks)")] = None,
    method: Annotated[Optional[str], typer.Option(help="smat or pmf (dense ProtoNet meta-tuning)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="run directory (default runs/METHOD-TIME)")] = None,
    seed: Annotated[Optional[int], typer.Option(help="random seed")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    data_spec: Annotated[Optional[str], typer.Option("--data", help="embedded, folder:PATH, torchvision:NAME:ROOT, h5:PATH/SOURCE; comma-joined, @id/@ood")] = None,
    backbone: Annotated[Optional[str], typer.Option(help="tiny, vit_small_patch16[:WEIGHTS], vit_base_patch16[:WEIGHTS] or a backbone file")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="continue the run in this directory")] = None,
    profile: Annotated[str, typer.Option(help="cpu (embedded, tiny ViT) or paper (ViT-S/16 DINO, Meta-Dataset)")] = "cpu",
    teacher: Annotated[Optional[bool], typer.Option("--teacher/--no-teacher", help="dense teacher + distillation")] = None,
    kl_pretrained: Annotated[Optional[bool], typer.Option("--kl-pretrained/--no-kl-pretrained", help="extra KL to the frozen model")] = None,
    mask_sampling: Annotated[Optional[str], typer.Option(help="stochastic (Louizos) or official (noise-free)")] = None,
    constraint_gates: Annotated[Optional[str], typer.Option(help="gates ŝ ≥ τ counts: test (default) or sampled")] = None,
    precision: Annotated[Optional[str], typer.Option(help="bf16, fp16 or fp32 (GPU autocast)")] = None,
    test_episodes: Annotated[Optional[int], typer.Option(help="test episodes per domain")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="episodes between resumable checkpoints")] = None,
    stop_after: Annotated[Optional[int], typer.Option(help="stop after this many episodes, resumable")] = None,
    evaluate_at_end: Annotated[bool, typer.Option("--evaluate/--no-evaluate", help="test table at the end")] = True,
    check_shapes: Annotated[bool, typer.Option("--check-shapes/--no-check-shapes", help="jaxtyping checks")] = True,
) -> None:
    """Meta-train SMAT (or PMF), then evaluate on ID and OOD test domains."""
    overrides = {"sparsity": sparsity, "n_experts": experts, "episodes": episodes, "method": method, "seed": seed,
                 "data": data_spec, "backbone": backbone, "teacher": teacher, "kl_to_pretrained": kl_pretrained,
                 "mask_sampling": mask_sampling, "constraint_gates": constraint_gates, "precision": precision, "test_episodes": test_episodes,
                 "checkpoint_every": checkpoint_every}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        cfg = make_config(profile, overrides, resume)
        if not check_shapes:
            import jaxtyping

            jaxtyping.config.update("jaxtyping_disable", True)
        out_dir = resume or out or Path("runs") / f"{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
        meta_train(cfg, Path(out_dir), device, resume=resume is not None, evaluate_at_end=evaluate_at_end,
                   stop_after=stop_after)
    except ERRORS as error:
        fail(str(error))
    except NonFiniteLoss as error:
        fail(str(error), code=1)


def make_config(profile: str, overrides: dict, resume: Path | None) -> Config:
    choices = {"method": ("smat", "pmf"), "mask_sampling": ("stochastic", "official"),
               "constraint_gates": ("test", "sampled"), "precision": ("bf16", "fp16", "fp32")}
    for name, valid in choices.items():
        if name in overrides and overrides[name] not in valid:
            raise smat.ConfigError(f"{name} = {overrides[name]!r} is not valid; use one of {', '.join(valid)}")
    if profile not in ("cpu", "paper"):
        raise smat.ConfigError(f"profile = {profile!r} is not valid; use cpu or paper")
    if resume is not None:
        if not (resume / "config.json").is_file():
            raise RunError(f"--resume {resume}: not a run directory (no config.json); pass a directory made by train.py")
        saved = read_config(resume)
        changed = {k: v for k, v in overrides.items() if k != "episodes" and getattr(saved, k) != v}
        if changed:
            raise RunError(f"--resume keeps the run's configuration; drop {', '.join(changed)} (only --episodes may change)")
        return dataclasses.replace(saved, **overrides)
    if overrides.get("method") == "pmf":
        overrides = smat.PMF_SWITCHES | overrides
    return Config(**overrides) if profile == "cpu" else Config.paper(**overrides)


def fail(message: str, code: int = 2) -> None:
    """One line on stderr and an exit code: the contract for bad input (no traceback)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


# click's UsageError (a missing or malformed value), whether typer vendors click or uses it: the base
# class of typer.BadParameter in both cases.
USAGE_ERROR = typer.BadParameter.__bases__[0]


def run_cli(application: typer.Typer) -> None:
    """Run a Typer app so that click's own usage errors (a missing value, `--experts two`) are one
    line and exit code 2 too, like every other bad input, instead of click's multi-line usage box."""
    try:
        code = application(standalone_mode=False)
    except USAGE_ERROR as error:
        typer.echo(f"error: {error.format_message()}", err=True)
        code = 2
    except typer.Abort:
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    import train  # run the importable module, not a second copy under __main__ (evaluate.py imports train)

    train.run_cli(train.app)
