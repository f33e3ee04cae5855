"""Run directories: their files, written whole and read back checked, shared by train.py and evaluate.py.

Plumbing. A run directory (made by train.py) holds config.json, data.json (the classes of every
partition of every source, recorded when the run starts), checkpoint.pt (the last state, resumable),
best.pt (the best model on validation), metrics.jsonl and, after testing, results.json / .md / .csv.
This module keeps what both command lines promise about them:

- one process at a time: a run directory is claimed (`RunDirectory`) for a run's lifetime;
- nothing half-written: every file is written to a temporary name and renamed (`atomic_save`);
- nothing logged twice: a resumed run cuts metrics.jsonl back to its checkpoint (`cut_log`);
- nothing read back unchecked: keys, types, shapes and finiteness of config.json, data.json and the
  checkpoints are checked before use (`read_checkpoint`, `check_classes`; config.json through
  configs.py, where runs written before a Config field existed read its default);
- a problem is one RunError line; cli.py turns it into `error: ...` and exit code 2.

It imports neither command line, so imports run one way:
train.py -> evaluate.py -> rundir.py -> configs.py -> cli.py -> smat.py, data.py, backbone.py.
"""

import dataclasses
import fcntl
import json
import os
import re
import time
from pathlib import Path
from typing import Literal

import torch

import backbone as backbones
import data
import smat
from cli import RunError, reason
from configs import check_fields, config_from_dict, read_config, read_json, type_problem, value_text
from smat import SMAT, Config

CHECKPOINT_FORMAT = "smat-run/1"  # the "format" entry of every checkpoint.pt and best.pt
DATA_FORMAT = "smat-data/1"  # the "format" entry of data.json
PICTURES = ("router_weights.png", "kept_fraction.png", "mask_overlap.png")  # evaluate.py --plots, in each run
# Every file of fixed name this program writes into a run directory (evaluate.py's pictures and
# --curves included); evaluate.py's own results are results-*.json / .md / .csv (EVALUATION_FILE).
RUN_FILES = ("config.json", "data.json", "checkpoint.pt", "best.pt", "metrics.jsonl", "results.json", "results.md",
             "results.csv", *PICTURES, "training_curves.png")
EVALUATION_FILE = re.compile(r"(results|comparison)-[\w.+-]+\.(json|md|csv)")
LOCK_FILE = ".lock"


# --- writing files so that a killed process never leaves half of one ----------------------------


def temporary(path: Path) -> Path:
    """Where `path` is written before the rename: `.NAME.tmpPID` beside it. The stale-file sweep of a
    run directory removes exactly these names (for the names in RUN_FILES and EVALUATION_FILE), nothing else."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def is_temporary(name: str) -> bool:
    """Whether `name` is a temporary file this program writes into a run directory."""
    match = re.fullmatch(r"\.(.+)\.tmp\d+", name)
    return bool(match) and (match.group(1) in RUN_FILES or bool(EVALUATION_FILE.fullmatch(match.group(1))))


def write_atomically(path: Path, write) -> None:
    """`write(temporary)`, then rename onto `path`: a reader (or a resumed run) sees the old file or the
    new one, never half of one, whenever the process is killed. A failure (a full disk, a folder in
    the way) removes the temporary file and is one RunError line naming `path`."""
    path, tmp = Path(path), temporary(Path(path))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(error, (OSError, RuntimeError)):  # torch.save reports a failed write as RuntimeError
            raise RunError(f"cannot write {path} ({reason(error)})") from None
        raise


def atomic_save(obj: object, path: Path) -> None:
    """torch.save through a temporary file (write_atomically)."""
    write_atomically(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text: str, path: Path) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text))


# --- metrics.jsonl cut back to where a resumed run continues ------------------------------------


def standing(records: list[dict], until: int | None = None) -> list[bool]:
    """Which records of an append-only log of sessions (metrics.jsonl) stand. A killed process logs on
    past its last checkpoint, and the next session, which starts there, logs those episodes again: so a
    record whose episode lies past a later session's "start" record does not stand, nor, with `until`
    (where a resumed run continues), one past `until`. A record without an integer episode stands."""
    limit, keep = until if until is not None else float("inf"), []
    for record in reversed(records):  # a record must not lie past any later session's start
        episode = record.get("episode")
        keep.append(type(episode) is not int or episode <= limit)
        if type(episode) is int and "start" in record:
            limit = min(limit, episode)
    return keep[::-1]


def _json_object(line: bytes) -> dict:
    try:
        value = json.loads(line)
    except ValueError:  # not JSON, or not text
        return {}
    return value if isinstance(value, dict) else {}


def cut_log(path: Path, episode: int) -> None:
    """Cut the log at `path` (metrics.jsonl) back to `episode`, where a resumed run continues: the
    records that do not stand (`standing`) and a last line a killed process left half-written go, every
    other line stays byte for byte, so each episode is logged once and in order. Rewritten whole
    (write_atomically), and only when something goes; a missing log stays missing."""
    path = Path(path)
    if not path.is_file():
        return
    text = path.read_bytes()
    lines = [line + b"\n" for line in text.split(b"\n")[:-1]]  # the part after the last newline is half a line
    kept = b"".join(line for line, keep in zip(lines, standing([_json_object(line) for line in lines], episode))
                    if keep)
    if kept != text:
        write_atomically(path, lambda tmp: tmp.write_bytes(kept))


# --- claiming a run directory: one process at a time ------------------------------------------------


def check_target_directory(path: Path, flag: str) -> None:
    """Refuse, before any work, a directory that could not be created or written: a file or device in
    its place or above it, a name longer than the file system allows, a parent that is not writable."""
    path = Path(path)
    limit = 255
    for part in path.parts:
        if len(os.fsencode(part)) > limit:
            raise RunError(f"{flag} {path}: the name {part[:24]}... has {len(os.fsencode(part))} bytes, more than "
                           f"the {limit} a file name may have; choose a shorter name")
    if path.exists():
        if not path.is_dir():
            raise RunError(f"{flag} {path} exists and is not a directory; pass a directory (created if missing)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise RunError(f"{flag} {path} is not writable; choose a directory you can write to")
        return
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise RunError(f"{flag} {path}: {ancestor} is a file, so no directory can be made under it")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise RunError(f"{flag} {path} cannot be created: {ancestor} is not writable")


def given_twice(paths: list[Path]) -> Path | None:
    """The first of `paths` (command-line arguments) that names the same file or folder as another, or None."""
    resolved = [Path(p).resolve() for p in paths]
    return next((p for p, r in zip(paths, resolved) if resolved.count(r) > 1), None)


def check_run_files(run_dir: Path, names=RUN_FILES) -> None:
    """Every run file present in `run_dir` must be a plain file (a folder in its place is refused
    before any work, not found when the work is written)."""
    for name in names:
        path = Path(run_dir) / name
        if path.exists() and not path.is_file():
            raise RunError(f"{path} is not a file; remove it (a run directory holds {name} as a file)")


class RunDirectory:
    """`with RunDirectory(path, fresh) as run_dir:` claims `path` for one process until the block ends.

    The claim is an exclusive flock on `path/.lock` (which holds the process id, for the message a
    second claimant gets): the kernel drops it when the process ends, however it ends, so a lock left
    by a killed run is free and the next claimant takes it over. A second live claimant gets one
    RunError line. `fresh` (a new run) also needs `path` empty or absent; it is created, parents
    included, and `RunDirectory.new` picks an unused name. Stale temporary files of this program
    (`is_temporary`) are removed once the claim holds.

    Until `start(files)` writes the run's first files, the run has not begun: if the block fails
    (bad input, a full disk, Ctrl-C), what it wrote and the directories it created are removed, so
    nothing half-made blocks a re-run. After `start`, the directory is the run's and is kept.
    """

    def __init__(self, path: Path, fresh: bool, create: bool = True) -> None:
        self.path, self.fresh, self.create = Path(path), fresh, create
        self.created: list[Path] = []  # directories this claim made, outermost first
        self.owned = False  # a fresh claim found the directory empty: what is in it now is this run's
        self.started, self.fd = False, None

    @classmethod
    def new(cls, parent: Path, stem: str) -> "RunDirectory":
        """A fresh claim on an unused name under `parent`: STEM, else STEM-2, STEM-3 ... The directory is
        made here, exclusively, so two runs started in the same second get two directories."""
        parent = Path(parent)
        check_target_directory(parent, "runs directory")
        made = [p for p in [parent, *parent.parents] if not p.exists()]
        try:
            for directory in reversed(made):
                directory.mkdir(exist_ok=True)
            for n in range(1, 10_000):
                path = parent / (stem if n == 1 else f"{stem}-{n}")
                try:
                    path.mkdir()
                except FileExistsError:
                    continue
                claim = cls(path, fresh=True)
                claim.created = [*made, path]
                return claim
        except OSError as error:
            raise RunError(f"cannot make a run directory under {parent} ({reason(error)}); pass --out") from None
        raise RunError(f"no free run directory name {stem}-N under {parent}; pass --out")

    def __enter__(self) -> Path:
        try:
            if self.create:
                self._make_directories()
            self._lock()
            if self.fresh:
                others = sorted(p.name for p in self.path.iterdir() if p.name != LOCK_FILE and not is_temporary(p.name))
                if others:
                    raise RunError(f"{self.path} already holds files ({', '.join(others[:3])}); pass --resume "
                                   f"{self.path} to continue that run or choose another --out")
                self.owned = True
            for stale in self.path.iterdir():  # left by a process killed while writing
                if is_temporary(stale.name) and stale.is_file():
                    stale.unlink()
        except BaseException as error:
            self._undo()
            if isinstance(error, OSError):
                raise RunError(f"cannot use {error.filename or self.path} as a run directory ({reason(error)})") from None
            raise
        return self.path

    def start(self, files: dict[str, str]) -> None:
        """Write the run's first files (name -> text); from here on the directory is the run's."""
        for name, text in files.items():
            atomic_write_text(text, self.path / name)
        self.started = True

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self.started:
            self._undo()
        else:
            self._unlock()

    def _make_directories(self) -> None:
        missing = [p for p in [self.path, *self.path.parents] if not p.exists()]
        for directory in reversed(missing):
            try:
                directory.mkdir()
            except FileExistsError:  # another run made it meanwhile: the lock decides between us
                continue
            self.created.append(directory)

    def _lock(self) -> None:
        path = self.path / LOCK_FILE
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunError(f"{self.path} is in use by process {holder} (a run or an evaluation; lock file "
                               f"{path}); wait for it to end or write elsewhere (--out)") from None
            except OSError:  # a file system without locks: reported by __enter__
                os.close(fd)
                raise
            try:  # the file we locked must still be the one at `path`: a finishing run removes it
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        # A forked child (a DataLoader worker) shares the locked file description; were it to keep it,
        # the lock would outlive a killed run while the orphaned worker winds down. Children drop it.
        os.register_at_fork(after_in_child=self._forget_in_child)

    def _forget_in_child(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # this process's copy only: the parent still holds the lock
            self.fd = None

    def _unlock(self) -> None:
        if self.fd is not None:
            try:
                (self.path / LOCK_FILE).unlink(missing_ok=True)  # while still holding it; see _lock
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None

    def _undo(self) -> None:
        """Remove what this claim wrote in a directory it found empty, and the directories it made.
        Best effort: the error that brought us here is the one to report."""
        try:
            if self.owned:
                for path in self.path.iterdir():
                    if path.name in RUN_FILES or is_temporary(path.name):
                        path.unlink()
        except OSError:
            pass
        self._unlock()
        try:
            for directory in reversed(self.created):
                directory.rmdir()
        except OSError:
            pass
        self.created = []


def variant(cfg: Config) -> dict[str, object]:
    """The method's settings (smat.Config's first block, `method` to `kl_to_pretrained`) where `cfg`
    differs from its method's defaults in the nearer profile: {} for the default SMAT and PMF runs,
    {"router_top_k": 2} for a top-k run. Results and default run names show it."""
    names = [f.name for f in dataclasses.fields(Config)]
    method_fields = names[names.index("method") + 1: names.index("meta_batch")]
    pmf = smat.PMF_SWITCHES if cfg.method == "pmf" else {}
    profiles = [Config(**pmf, **(smat.PMF_CPU_LRS if pmf else {})), Config.paper(**pmf)]
    differences = [{k: getattr(cfg, k) for k in method_fields if getattr(cfg, k) != getattr(p, k)} for p in profiles]
    return min(differences, key=len)


def variant_label(cfg: Config) -> str:
    """The method and its variant for a file name: "smat", "smat-router_top_k2", "smat-no_teacher"."""
    shown = [(f"no_{k}" if v is False else k) if isinstance(v, bool) else f"{k}{v}" for k, v in variant(cfg).items()]
    return "-".join([cfg.method, *shown])


def default_run_name(cfg: Config) -> str:
    return f"{variant_label(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}"


# --- checking what is read back: keys, types, shapes, finiteness ----------------------------------


def _tensor_problem(value: object, expected: torch.Tensor) -> str | None:
    if not isinstance(value, torch.Tensor):
        return f"holds {value_text(value)}, not a tensor; the file is damaged"
    if value.shape != expected.shape or value.dtype != expected.dtype or value.layout != torch.strided:
        return f"is {value.dtype} {tuple(value.shape)}, expected {expected.dtype} {tuple(expected.shape)}; the file is damaged"
    if value.is_floating_point() and not torch.isfinite(value).all():
        return "holds non-finite values (NaN or infinity); its run diverged or the file is damaged"
    return None


def check_model_state(state: object, cfg: Config, spec: dict, where: str) -> None:
    """The model state of a checkpoint against the model `cfg` and `spec` describe (built on the meta
    device: shapes only, no memory): every key, no other, each of the right shape and dtype, finite."""
    try:
        with torch.device("meta"):
            expected = build_model(cfg, spec).state_dict()
    except Exception as error:  # a spec no ViT can have: zero patch size, heads not dividing dim ...
        raise RunError(f"{where}: backbone_spec {value_text(spec)} does not describe a ViT ({reason(error)})") from None
    if not isinstance(state, dict):
        raise RunError(f"{where}: model holds {value_text(state)}, not a state dict of tensors")
    missing, unexpected = [k for k in expected if k not in state], [str(k) for k in state if k not in expected]
    if missing or unexpected:
        raise RunError(f"{where}: the model tensors do not fit its configuration (missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]})")
    for key, value in expected.items():
        problem = _tensor_problem(state[key], value)
        if problem:
            raise RunError(f"{where}: model tensor {key} {problem}")


def read_checkpoint(path: Path) -> dict:
    """A checkpoint.pt or best.pt, checked before anything uses it. torch.load with weights_only=True
    (tensors and plain data only, never code); then the format, the configuration (config_from_dict),
    the backbone spec and every model tensor (check_model_state)."""
    path = Path(path)
    if not path.exists():
        raise RunError(f"{path} does not exist; a run directory holds checkpoint.pt (or best.pt)")
    if not path.is_file():
        raise RunError(f"{path} is not a file; expected a checkpoint written by train.py")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated file, foreign pickle, anything torch refuses
        raise RunError(f"{path} is not a readable checkpoint ({reason(error)}); expected a file written by train.py")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{path} is not a SMAT run checkpoint; expected format {CHECKPOINT_FORMAT!r}")
    for key in ("config", "backbone_spec", "model"):
        if key not in state:
            raise RunError(f"{path} lacks its {key}; the file is damaged or was not written by train.py")
    cfg = config_from_dict(state["config"], f"{path} config")
    spec = check_fields(backbones.ViTSpec, state["backbone_spec"], f"{path} backbone_spec")
    check_model_state(state["model"], cfg, spec, str(path))
    return state


def check_resumable(state: dict, path: Path) -> None:
    """What a resumed run reads from a checkpoint besides the model: where the run stands (step,
    episode, best_val, best_episode, each of its type and consistent) and an optimiser state."""
    cfg = config_from_dict(state["config"], f"{path} config")
    for key, kind, minimum in (("step", int, 0), ("episode", int, 0), ("best_val", float, None),
                               ("best_episode", int, -1)):
        if key not in state:
            raise RunError(f"{path} lacks {key}, which a resumed run needs; the file is damaged")
        valid = type_problem(kind, state[key]) or (
            f">= {minimum}" if minimum is not None and state[key] < minimum else None)
        if valid:
            raise RunError(f"{path}: {key} = {value_text(state[key])} is not valid; it must be {valid}")
    if state["episode"] != state["step"] * cfg.meta_batch or state["episode"] > cfg.episodes:
        raise RunError(f"{path}: episode {state['episode']} does not match step {state['step']} of meta-batches "
                       f"of {cfg.meta_batch} within {cfg.episodes} episodes; the file is damaged")
    if not isinstance(state.get("optimizer"), dict):
        raise RunError(f"{path} lacks the optimiser state a resumed run needs; the file is damaged")


def restore_optimizer(optimizer: smat.MetaOptimizer, state: dict, where: str) -> None:
    """Load a checkpoint's optimiser state after checking it fits: one entry per optimiser, the same
    hyper-parameters as the configuration's (the learning rate is set anew every step), and every
    state tensor the shape of its parameter and finite."""
    saved = state.get("optimizer")
    if not isinstance(saved, dict) or set(saved) != set(optimizer.optimizers):
        raise RunError(f"{where}: the optimiser state has entries {sorted(map(str, saved or {}))[:4]}, expected "
                       f"{sorted(optimizer.optimizers)}; the file is damaged")
    fresh = {name: [dict(g) for g in opt.param_groups] for name, opt in optimizer.optimizers.items()}
    try:
        optimizer.load_state_dict(saved)
    except Exception as error:  # KeyError, ValueError, TypeError ...: whatever torch finds first
        raise RunError(f"{where}: the optimiser state does not fit this run ({reason(error)})") from None
    for name, opt in optimizer.optimizers.items():
        for group, before in zip(opt.param_groups, fresh[name]):
            changed = [k for k in before if k not in ("params", "lr", "initial_lr") and k in group and group[k] != before[k]]
            if changed:
                raise RunError(f"{where}: the {name} optimiser was saved with {changed[0]} = "
                               f"{value_text(group.get(changed[0]))}, the configuration says {value_text(before[changed[0]])}")
            for parameter in group["params"]:
                for key, value in opt.state.get(parameter, {}).items():
                    bad = isinstance(value, torch.Tensor) and (
                        (value.dim() > 0 and value.shape != parameter.shape)
                        or (value.is_floating_point() and not torch.isfinite(value).all()))
                    if bad or not (value is None or isinstance(value, (torch.Tensor, int, float))):
                        raise RunError(f"{where}: the {name} optimiser's {key} does not fit its parameter "
                                       f"{tuple(parameter.shape)} or is not finite; the file is damaged")


# --- the classes of every partition, recorded when a run starts (data.json) ------------------------


def class_manifest(sources: list) -> dict:
    """Per source, its split and, per partition, its class names and images per class."""
    return {s.name: {"split": s.split, **{p: {"classes": s.class_names(p), "images": s.class_sizes(p)}
                                          for p in data.PARTITIONS}} for s in sources}


def manifest_text(sources: list) -> str:
    return json.dumps({"format": DATA_FORMAT, "sources": class_manifest(sources)}) + "\n"


def read_manifest(path: Path) -> dict:
    values = read_json(path, "expected the data.json written by train.py")
    sources = values.get("sources") if isinstance(values, dict) and values.get("format") == DATA_FORMAT else None
    ok = isinstance(sources, dict) and all(
        isinstance(s, dict) and s.get("split") in ("id", "ood") and all(
            isinstance(s.get(p), dict) and isinstance(s[p].get("classes"), list) and isinstance(s[p].get("images"), list)
            and len(s[p]["classes"]) == len(s[p]["images"]) and all(type(c) is str for c in s[p]["classes"])
            and all(type(n) is int for n in s[p]["images"]) for p in data.PARTITIONS)
        for s in sources.values())
    if not ok:
        raise RunError(f"{path} is not a data.json of format {DATA_FORMAT!r}; the file is damaged")
    return sources


def check_classes(run_dir: Path, sources: list, every_source: bool) -> None:
    """Refuse data whose classes differ from those the run recorded in data.json: a class folder added
    or removed reshuffles a seeded class split and would turn test classes into training classes.
    Every recorded source is compared partition by partition (class names, then images per class);
    `every_source` (resuming) also needs the same set of sources. A run without data.json (written
    before it existed) is not checked."""
    path = Path(run_dir) / "data.json"
    if not path.exists():
        return
    recorded, now = read_manifest(path), class_manifest(sources)
    if every_source and set(recorded) != set(now):
        raise RunError(f"--data now has the sources {sorted(now)}, the run was trained on {sorted(recorded)} "
                       f"({path}); resume with the same data")
    for name in sorted(now.keys() & recorded.keys()):
        was, is_ = recorded[name], now[name]
        if was["split"] != is_["split"]:
            raise RunError(f"domain {name} is @{is_['split']} here but was @{was['split']} when the run started "
                           f"({path}), so its partitions differ (an @ood domain tests every class, the trained ones "
                           f"too); mark it @{was['split']} as the run did")
        home = {c: p for p in data.PARTITIONS for c in was[p]["classes"]}
        for partition in ("test", "val", "train"):
            old, new = was[partition], is_[partition]
            if old["classes"] != new["classes"]:
                added = [f"{c} (was {home.get(c, 'absent')})" for c in sorted(set(new["classes"]) - set(old["classes"]))]
                removed = sorted(set(old["classes"]) - set(new["classes"]))
                raise RunError(f"domain {name}, {partition} classes differ from those recorded in {path}: added "
                               f"{added[:3]}, removed {removed[:3]}; the data changed since the run started, and a "
                               f"changed class split mixes training and test classes: restore the data (or fix "
                               f"the split with a splits.json)")
            if old["images"] != new["images"]:
                k = next(i for i, (a, b) in enumerate(zip(old["images"], new["images"])) if a != b)
                raise RunError(f"domain {name}, {partition} class {new['classes'][k]} has {new['images'][k]} images, "
                               f"{old['images'][k]} when the run started ({path}); restore the data")


# --- building a model and loading a run ------------------------------------------------------------


def build_model(cfg: Config, backbone_spec: dict) -> SMAT:
    """The SMAT module for `cfg` on a ViT of `backbone_spec`, ready for a checkpoint's state dict
    (which holds θ_pre, so the ViT's own random weights are overwritten)."""
    return SMAT(backbones.VisionTransformer(backbones.ViTSpec(**backbone_spec)), cfg)


def load_run(run_dir: Path, device: str | torch.device = "cpu", which: Literal["best", "last"] = "best"):
    """(model, config, checkpoint) of a run: best.pt if present (and asked for), else checkpoint.pt.
    Both files are checked (read_config, read_checkpoint) before the model is built."""
    run_dir = Path(run_dir)
    saved = read_config(run_dir).to_dict()
    best = run_dir / "best.pt"
    path = best if which == "best" and best.exists() else run_dir / "checkpoint.pt"  # a folder named best.pt is an error
    state = read_checkpoint(path)
    cfg = config_from_dict(state["config"], f"{path} config")
    # earlier versions let --resume change `episodes`, so a best.pt from before such a resume differs there
    changed = [k for k, v in cfg.to_dict().items() if k != "episodes" and saved[k] != v]
    if changed:
        raise RunError(f"{path} was trained with another {', '.join(changed[:3])} than {run_dir / 'config.json'}; "
                       f"it is not this run's checkpoint")
    model = build_model(cfg, state["backbone_spec"])
    model.load_state_dict(state["model"])  # checked by read_checkpoint: the keys, shapes and dtypes fit
    return model.to(device), cfg, state
