"""Progress and metrics: training's bar, metrics.jsonl, plain lines, TensorBoard, W&B; evaluation's stages.

Plumbing: nothing here changes what is trained. train.py's loop calls `Monitor.log` after a meta-update
and `Monitor.validated` after a validation, and `Monitor.tested` after the final test; evaluations
report their episodes through `Stages`
(`episode_bar` draws them); docs/metrics.md says what every field of metrics.jsonl
means and what a healthy value looks like. `run` is runstate.Run (the model, the config, where the run
stands).
"""

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import cli
import smat
import tables
from cli import RunError


METRICS_FORMAT = 2  # in every start record: format 2 logs accuracies in percent (format 1, no marker: fractions)
PERCENT_FIELDS = ("accuracy", "teacher_accuracy", "teacher_lead", "pretrained_accuracy")  # smat.py's fractions


class Monitor:
    """The progress bar (rank 0 only) and metrics.jsonl (docs/metrics.md says what each field means).
    When the console is not a terminal (nohup, SLURM, CI, a pipe) there is no bar: rank 0 prints one
    plain line per log step and per validation instead (`plain_line`). With `tensorboard`, every
    record also goes to RUN/tensorboard/ as scalars grouped train/, val/, system/ (`tensorboard_scalars`);
    with `wandb` (a W&B project), the same scalars go to Weights & Biases. Used as a context manager
    around the training (`training`, which shows the bar) and the final test (`tested`)."""

    COLUMNS = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} ep"),
               TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn())

    def __init__(self, run, main: bool, console: Console, setting: dict, tensorboard: bool = False,
                 wandb: str | None = None) -> None:
        self.run, self.file, self.main, self.setting = run, run.out_dir / "metrics.jsonl", main, setting
        self.every = max(1, min(50, run.total_steps // 100))  # steps between metrics lines
        self.started, self.start_episode = time.perf_counter(), run.episodes_done
        self.console, self.plain = console, main and not console.is_terminal
        self.bar = Progress(*self.COLUMNS, console=console, disable=not main or self.plain)
        self.stages = Stages(self.bar, f"{run.cfg.method}: ", stats="")  # validation's own line
        self.tensorboard, self.project = tensorboard and main, wandb if main else None
        self.board, self.wandb = None, None

    def __enter__(self) -> "Monitor":
        if self.project:  # first: the one that can fail (no login, no network)
            self.wandb = wandb_run(self.project, self.run)
        if self.tensorboard:  # a resumed run drops what a killed session logged after its checkpoint (or
            # after episode 0, for one killed before its first checkpoint; a fresh run has nothing to drop)
            folder = self.run.out_dir / "tensorboard"
            first = not folder.exists()  # the run's first session with --tensorboard, fresh or resumed
            self.board = summary_writer()(str(folder), purge_step=self.run.episodes_done + 1)
            if first:
                write_hparams(self.board, self.run.cfg)
        if self.main:  # how this (possibly resumed) session runs: precision as resolved on this device
            self._append({"episode": self.run.episodes_done, "start": self.setting, "metrics_format": METRICS_FORMAT})
        return self

    def __exit__(self, error_type, *_) -> None:
        if self.board is not None:
            self.board.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=0 if error_type is None else 1)

    @contextmanager
    def training(self) -> Iterator[None]:
        """The progress bar, shown while the loop runs (the final test draws its own)."""
        cfg = self.run.cfg
        self.started = time.perf_counter()  # episodes_per_second counts training, not W&B's start-up
        with self.bar:
            self.task = self.bar.add_task(cfg.method, total=self.run.total_steps * cfg.meta_batch,
                                          completed=self.run.episodes_done, stats="")
            yield

    def tested(self, results: dict) -> None:
        """The final test's accuracies (`test_scalars`) to TensorBoard and W&B, at the last episode."""
        scalars = test_scalars(results)
        if self.board is not None:
            for tag, value in scalars.items():
                self.board.add_scalar(tag, value, global_step=self.run.episodes_done)
            self.board.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=self.run.episodes_done)
            self.wandb.summary.update(scalars)

    def log_due(self) -> bool:
        return self.run.step % self.every == 0 or self.run.step == self.run.last_step

    def log(self, batch: smat.MetaBatch, lr: float) -> None:
        """A metrics line for the meta-batch just done; `lr`: the schedule's factor it used."""
        run = self.run
        rate = (run.episodes_done - self.start_episode) / (time.perf_counter() - self.started)
        record = log_record(run, batch, rate, lr)
        self._append(record)
        self.bar.update(self.task, completed=run.episodes_done, stats=short_stats(record))
        if self.plain:
            self._print(plain_line(run, record))

    def validated(self, val: float) -> None:
        self.stages.close()
        self._append({"episode": self.run.episodes_done, "val_accuracy": val})
        self.bar.update(self.task, description=f"{self.run.cfg.method} (val {val:.1f}%)")
        if self.plain:
            total = self.run.total_steps * self.run.cfg.meta_batch
            self._print(f"{self.run.cfg.method} episode {self.run.episodes_done}/{total} validation accuracy {val:.2f}%")

    def _print(self, line: str) -> None:
        cli.print_line(self.console, line)

    def _append(self, record: dict) -> None:
        with open(self.file, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = tensorboard_scalars(record)
        if self.board is not None and scalars:
            for tag, value in scalars.items():
                self.board.add_scalar(tag, value, global_step=record["episode"])
            self.board.flush()  # a crash or Ctrl-C keeps what the curves showed
        if self.wandb is not None and scalars:
            self.wandb.log(scalars, step=record["episode"])


SYSTEM = ("episodes_per_second", "peak_memory_gib")  # how fast and in how much memory, not what is learnt
NOT_CURVES = ("step", "episode", "start", "metrics_format")  # the x-axis and a session's start record


def tensorboard_scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as grouped TensorBoard (and W&B) tags: a validation field as val/NAME
    without its val_ prefix, throughput and memory as system/NAME, every other number as train/NAME,
    a per-expert list as GROUP/NAME/expert_M; NOT_CURVES are skipped."""
    scalars = {}
    for key, value in record.items():
        if key in NOT_CURVES:
            continue
        tag = ("val/" + key.removeprefix("val_") if key.startswith("val_")
               else ("system/" if key in SYSTEM else "train/") + key)
        if isinstance(value, list):
            scalars |= {f"{tag}/expert_{m}": float(v) for m, v in enumerate(value)}
        elif isinstance(value, (int, float)):
            scalars[tag] = float(value)
    return scalars


def test_scalars(results: dict) -> dict[str, float]:
    """The final test as test/DOMAIN (mean accuracy, %) and test/id_avg, test/ood_avg (and near/far where
    the run has them): the tags TensorBoard's hparams table and W&B's summary show beside the Config."""
    scalars = {f"test/{name}": float(domain["mean"]) for name, domain in results["domains"].items()}
    return scalars | {f"test/{key}": float(results[key]) for key in tables.AVERAGES if results.get(key) is not None}


def hparams(cfg: smat.Config) -> dict[str, bool | int | float | str]:
    """Every Config field as a scalar hyper-parameter (TensorBoard's hparams take no None or list: as text)."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in cfg.to_dict().items()}


def write_hparams(board, cfg: smat.Config) -> None:
    """The Config as TensorBoard hparams of this run, with val/accuracy and the test averages as its metrics
    (the hparams table reads their values from the scalars of the same names)."""
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    metrics = {"val/accuracy": 0.0} | {f"test/{key}": 0.0 for key in tables.AVERAGES}
    for summary in hparams_summaries(hparams(cfg), metrics):
        board.file_writer.add_summary(summary)


def summary_writer() -> type:
    """torch's SummaryWriter, which needs the optional tensorboard package (one RunError line without it)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RunError("--tensorboard needs the tensorboard package: pip install -e '.[tensorboard]', "
                       "or drop --tensorboard (evaluate.py --curves draws metrics.jsonl without it)") from None
    return SummaryWriter


def wandb_module(project: str | None = None):
    """The optional wandb package (one RunError line without it, or for an empty `project` name)."""
    if project is not None and not project.strip():
        raise RunError("--wandb needs a Weights & Biases project name, e.g. --wandb smat; or drop --wandb")
    try:
        import wandb
    except ImportError:
        raise RunError("--wandb needs the wandb package: pip install -e '.[wandb]' from the repository root, "
                       "or drop --wandb") from None
    return wandb


def wandb_run(project: str, run):
    """A W&B run in `project` named after the run directory, its files under RUN/wandb/, the Config as
    its config. Its id is a function of the directory's path, so a resumed run continues its W&B run."""
    run_id = hashlib.sha256(str(run.out_dir.resolve()).encode()).hexdigest()[:16]
    try:
        return wandb_module().init(project=project, name=run.out_dir.name, dir=str(run.out_dir),
                                   config=hparams(run.cfg), id=run_id, resume="allow")
    except Exception as error:  # wandb's own errors (no API key, no network) share no base class to catch
        raise RunError(f"--wandb {project}: Weights & Biases could not start a run ({cli.reason(error)}); "
                       f"log in with `wandb login`, or set WANDB_MODE=offline, or drop --wandb") from None


def log_record(run, batch: smat.MetaBatch, rate: float, lr: float) -> dict:
    """One line of metrics.jsonl (docs/metrics.md says what each field means and healthy values)."""
    cfg, model, sparsity = run.cfg, run.model, batch.sparsity
    record = {"step": run.step, "episode": run.episodes_done,
              "lr_scale": lr}
    record |= {k: round(100 * v.item(), 3) if k in PERCENT_FIELDS else round(v.item(), 5)  # percent, as val and test
               for k, v in batch.stats.items()}
    if cfg.has_masks:
        record |= {
            "sparsity": [round(s, 4) for s in sparsity.tolist()],
            "sparsity_mean": round(sparsity.mean().item(), 4), "sparsity_std": round(sparsity.std(correction=0).item(), 4),
            "multiplier_mean": round(model.multipliers.mean().item(), 5),
            "router_entropy": round(router_entropy(batch.weights).item(), 4),
            "router_temperature": round(smat.router_temperature(cfg, model.tasks_seen).item(), 4),
            "expected_density_mean": round(smat.expected_density(model.log_alpha.detach()).mean().item(), 4),
        }
    record["episodes_per_second"] = round(rate, 2)
    if model.delta.is_cuda:  # the most this process has held at once, this session
        record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(model.delta.device) / 2**30, 3)
    return record


def in_percent(records: list[dict]) -> list[dict]:
    """metrics.jsonl's records with every accuracy in percent: a session whose start record carries no
    metrics_format (written before format 2) logged PERCENT_FIELDS as fractions, so they are scaled
    from its start record to the next one; a file with no start record at all is that old too."""
    converted, scale = [], 100
    for record in records:
        if "start" in record:
            marker = record.get("metrics_format")
            scale = 1 if isinstance(marker, int) and marker >= 2 else 100
        converted.append(record | {k: v * scale for k, v in record.items()
                                   if k in PERCENT_FIELDS and isinstance(v, (int, float))})
    return converted


def plain_line(run, record: dict) -> str:
    """One log step as a plain line: "smat episode 120/800 (15%) ETA 0:01:30 loss 1.2 ce 1.1 acc ..."."""
    total, rate = run.total_steps * run.cfg.meta_batch, record["episodes_per_second"]
    text = f"{run.cfg.method} episode {record['episode']}/{total} ({100 * record['episode'] / max(total, 1):.0f}%)"
    if rate > 0:
        left = round((total - record["episode"]) / rate)
        text += f" ETA {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"
    return text + f" loss {record['loss']:.4f} ce {record['ce']:.4f} " + short_stats(record)


def short_stats(r: dict) -> str:
    text = f"acc {r['accuracy']:.1f}%"
    if "teacher_accuracy" in r:
        text += f" teacher {r['teacher_accuracy']:.1f}%"
    if "sparsity_mean" in r:
        text += (f" sparsity {r['sparsity_mean']:.2f}±{r['sparsity_std']:.2f} λ {r['multiplier_mean']:.3f}"
                 f" H(w) {r['router_entropy']:.2f}")
    return text + f" {r['episodes_per_second']:.1f} ep/s"


def router_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy of the merging weights, mean over tasks: log M = uniform mixing, 0 = one expert."""
    return -(weights * weights.clamp_min(1e-12).log()).sum(-1).mean()


# --- evaluation's progress: a bar on a terminal, a line per finished stage in a log --------------------


def episode_bar(console: Console) -> Progress:
    """A progress display for evaluations that vanishes when done; off unless `console` is a terminal
    (a log file gets the results, not frames of a bar)."""
    return Progress(*Progress.get_default_columns(), console=console, transient=True, disable=not console.is_terminal)


class Stages:
    """evaluate_model's `progress`: one line of `bar` for the stage under way ("smat: lr search
    aircraft", then "smat: test aircraft" ...), replacing the last one; `fields` fill the bar's own
    columns. Where the bar is off (a batch job's log), each finished stage is one plain line on `log`
    if given. Used as a context manager, the last stage ends with the block."""

    def __init__(self, bar: Progress, prefix: str = "", log: Console | None = None, **fields) -> None:
        self.bar, self.prefix, self.log, self.fields = bar, prefix, log, fields
        self.task, self.stage, self.done, self.started = None, "", 0, 0.0

    def __call__(self, stage: str, total: int) -> Callable[[], None]:
        """Start `stage` of `total` episodes; returns the function to call after each episode."""
        self.close()
        self.task = self.bar.add_task(self.prefix + stage, total=total, **self.fields)
        self.stage, self.done, self.started = stage, 0, time.perf_counter()
        return self._tick

    def _tick(self) -> None:
        self.done += 1
        self.bar.advance(self.task)

    def close(self, finished: bool = True) -> None:
        if self.task is None:
            return
        if finished and self.log is not None and self.bar.disable:
            cli.print_line(self.log, f"{self.prefix}{self.stage}: {self.done} episodes in "
                                        f"{time.perf_counter() - self.started:.0f} s")
        self.bar.remove_task(self.task)
        self.task = None

    def __enter__(self) -> "Stages":
        return self

    def __exit__(self, error_type, *_) -> None:
        self.close(finished=error_type is None)
