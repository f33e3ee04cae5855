"""Plumbing: a Config stored and read back — config.json, checkpoints' configs, --config files, old runs.

What a stored configuration promises (docs/reliability.md): every field present has its type, an
unknown field is refused, a field added since the file was written reads its default (one note line
names it: `note_filled_fields`), a renamed field keeps loading (`RENAMED_FIELDS`), and a format
newer than this code is refused; each problem is one RunError line naming the file and the key.
A --config file is JSON, TOML or YAML (`read_config_file`); a YAML file may use the official code's
nested keys (`OFFICIAL_KEYS`, `OFFICIAL_FIXED`, `OFFICIAL_IGNORED`; docs/configs.md).
"""

import dataclasses
import difflib
import json
import math
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Literal, get_args, get_origin

import torch
import typer
import yaml

import smat
from cli import RunError, one_line, reason
from smat import Config

# The "config_format" entry of config.json and of every checkpoint's config: 1 (no entry) before it was
# recorded. A configuration lacking fields added since it was written reads their defaults (`note_filled_fields`
# says which in one note line); one of a newer format is refused.
CONFIG_FORMAT = 2


def value_text(value: object) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value) if not isinstance(value, torch.Tensor) else f"a tensor of shape {tuple(value.shape)}"
    return text if len(text) <= 60 else text[:57] + "..."


def type_problem(kind: object, value: object) -> str | None:
    """What `value` should be for a dataclass field of type `kind`, or None if it is fine. bool is an
    int in Python: True is no integer here; an integer is a valid float."""
    if get_origin(kind) is Literal:
        choices = get_args(kind)
        return None if any(type(value) is type(c) and value == c for c in choices) else \
            "one of " + ", ".join(map(str, choices))
    if kind is bool:
        return None if type(value) is bool else "true or false"
    if kind is int:
        return None if type(value) is int else "an integer"
    if kind is float:
        return None if type(value) in (int, float) and math.isfinite(value) else "a finite number"
    if kind is str:
        return None if type(value) is str else "a string"
    return None


def check_fields(cls: type, values: object, where: str) -> dict:
    """`values` as keyword arguments of the dataclass `cls`, checked: a dict of its fields only (every
    field without a default among them), each of its field's type. Returns `values`; a problem is one
    RunError line naming `where`, the key, the value and what is valid."""
    if not isinstance(values, dict):
        raise RunError(f"{where} holds {value_text(values)}, not an object of {cls.__name__} fields")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in values if k not in fields)
    if unknown:
        raise RunError(f"{where} has unknown keys {unknown[:5]}; valid keys are the fields of {cls.__name__}"
                       + closest_field(unknown[0], list(fields)))
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING]
    if missing:
        raise RunError(f"{where} lacks the keys {missing[:5]}; it was not written by this version of train.py")
    for name, value in values.items():
        valid = type_problem(fields[name].type, value)
        if valid:
            raise RunError(f"{where}: {name} = {value_text(value)} is not valid; it must be {valid}")
    return values


# Config fields renamed since earlier runs were written: old key -> (new key, its value from the old
# values). A run made before the rename loads as the same configuration.
RENAMED_FIELDS: dict[str, tuple[str, Callable[[dict], object]]] = {
    "router_anneal_tasks": ("router_anneal_fraction", lambda old: old["router_anneal_tasks"] / old["episodes"]),
}


def _renamed(values: object) -> object:
    """`values` with renamed keys replaced, where the old key and what its conversion reads are sound."""
    if not isinstance(values, dict):
        return values
    for old, (new, convert) in RENAMED_FIELDS.items():
        if old in values and new not in values and all(type(values.get(k)) is int for k in (old, "episodes")) \
                and values["episodes"] > 0:
            values = {k: v for k, v in values.items() if k != old} | {new: convert(values)}
    return values


def config_record(cfg: Config) -> dict:
    """What config.json and every checkpoint hold: the format, then every field of `cfg`."""
    return {"config_format": CONFIG_FORMAT, **cfg.to_dict()}


def config_fields(values: object, where: str) -> object:
    """A config.json's (or a --config file's) fields: without its "config_format" entry, which must be
    a format this version reads, and with renamed fields under their new names (RENAMED_FIELDS)."""
    if not isinstance(values, dict) or "config_format" not in values:
        return _renamed(values)
    version = values["config_format"]
    if type(version) is not int or not 1 <= version <= CONFIG_FORMAT:
        raise RunError(f"{where}: config_format = {value_text(version)} is not valid; this version of train.py reads "
                       f"formats 1 to {CONFIG_FORMAT} (a newer one was written by newer code: update it)")
    return _renamed({k: v for k, v in values.items() if k != "config_format"})


def config_from_dict(values: object, where: str = "the configuration") -> Config:
    """The Config of a config.json or a checkpoint: every field present has its type (an unknown field
    is refused), a field added since it was written reads its default (`filled_fields` names them),
    then Config's own checks (ranges, choices), all as one RunError line naming `where`."""
    values = check_fields(Config, config_fields(values, where), where)
    try:
        return Config(**values)
    except smat.ConfigError as error:
        raise RunError(f"{where}: {error}") from None


def filled_fields(values: object) -> list[str]:
    """The Config fields a stored configuration lacks (written before they were added), in field order."""
    present = config_fields(values, "") if isinstance(values, dict) else {}
    return [f.name for f in dataclasses.fields(Config) if f.name not in present]


def first_repeated(keys: list) -> int | None:
    """The index of the first key that repeats an earlier one, or None."""
    return next((i for i, key in enumerate(keys) if key in keys[:i]), None)


def _once(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are all different (json.loads would keep the last of a repeated key)."""
    twice = first_repeated([key for key, _ in pairs])
    if twice is not None:
        raise ValueError(f"the key {pairs[twice][0]!r} is given twice")
    return dict(pairs)


def read_json(path: Path, what: str) -> object:
    if not path.is_file():
        raise RunError(f"{path} is not a file; {what}")
    try:
        return json.loads(path.read_text(), object_pairs_hook=_once)  # a key twice: which one was meant?
    except (OSError, ValueError) as error:
        raise RunError(f"{path} is not readable JSON ({reason(error)}); {what}") from None


def read_config(run_dir: Path) -> Config:
    """The Config in a run's config.json; a missing, unparsable or mistyped file is one RunError line.
    Fields added since the run was written read their defaults (`note_filled_fields` names them)."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise RunError(f"{run_dir} is not a run directory; it must contain config.json (made by train.py)")
    return config_from_dict(read_json(path, "expected the config.json written by train.py"), str(path))


def note_filled_fields(run_dir: Path) -> None:
    """One note line on stderr naming the fields a run's config.json lacks and the defaults they read.
    The command lines say it once the run has passed every check (a refused run gets only its error
    line): evaluate.py after its table, train.py --resume just before the run goes on."""
    path = Path(run_dir) / "config.json"
    values = read_json(path, "expected the config.json written by train.py")
    filled = filled_fields(values)
    if filled:
        cfg = config_from_dict(values, str(path))
        shown = ", ".join(f"{name} = {value_text(getattr(cfg, name))}" for name in filled)
        typer.echo(one_line(f"note: {path} was written before the fields {', '.join(filled)}; they read their "
                            f"defaults ({shown})"), err=True)


def closest_field(key: str, names: list[str]) -> str:
    """ " (did you mean n_experts?)" for a key close to a field's name (`experts`, `inner-lr`), else ""."""
    spelled = key.replace("-", "_").lower()
    close = [n for n in names if n == spelled or n.endswith("_" + spelled)] or difflib.get_close_matches(spelled, names, 1)
    return f" (did you mean {close[0]}?)" if close else ""


# --- --config files: JSON, TOML, YAML, and the official code's YAML keys ---------------------------------

TASKS_PER_EPOCH = 2000  # the official trainer's epoch on Meta-Dataset: 2000 tasks


def _same(value: object) -> object:
    return value


def _epochs(value: object) -> object:
    if type(value) is not int:
        raise ValueError("an integer number of epochs")
    return value * TASKS_PER_EPOCH


def _one_of(choices: dict[object, object]) -> Callable[[object], object]:
    def convert(value: object) -> object:
        if not isinstance(value, (str, bool)) or value not in choices:
            raise ValueError("one of " + ", ".join(map(str, choices)))
        return choices[value]
    return convert


def _h5_sources(value: object) -> object:
    if not isinstance(value, list) or not value or not all(isinstance(name, str) for name in value):
        raise ValueError("a list of Meta-Dataset source names")
    return ",".join(f"h5:metadataset_h5/{name}@id" for name in value)  # the paper profile's layout


# The official code's YAML keys (configs/md_smat_vits_dino.yaml, nested sections as dotted paths) that
# set a Config field: key -> (field, its value from the official one). docs/configs.md lists them.
OFFICIAL_KEYS: dict[str, tuple[str, Callable[[object], object]]] = {
    "meta_learner.model": ("method", _one_of({"SPARSE_INTERPOLATED_EXPERTS": "smat"})),
    "meta_learner.sparsity.num_experts": ("n_experts", _same),
    "meta_learner.sparsity.target": ("sparsity", _same),
    "meta_learner.inner_lr.lr": ("inner_lr", _same),
    "meta_learner.dense_teacher.lr": ("teacher_lr", _same),
    "meta_learner.dense_teacher.T": ("distill_temperature", _same),
    "meta_learner.dense_teacher.lam": ("distill_weight", _same),
    "meta_learner.outer_lr.mask_lr": ("mask_lr", _same),
    "meta_learner.outer_lr.lagrangian_lr": ("multiplier_lr", _same),
    "optimizer.lr": ("delta_lr", _same),
    "optimizer.momentum": ("delta_momentum", _same),
    "optimizer.max_grad_norm": ("mask_clip", _same),
    "train.max_epoch": ("episodes", _epochs),
    "train.batchsize": ("meta_batch", _same),
    "train.image_size": ("image_size", _same),
    "train.fp16": ("precision", _one_of({True: "fp16", False: "fp32"})),
    "train.datasets": ("data", _h5_sources),
    "base_learner.backbone": ("backbone", _one_of({"ViT_Small_DINO": "vit_small_patch16",
                                                   "ViT_Base_DINO_torchhub": "vit_base_patch16"})),
    "logging.val_freq": ("val_every", _epochs),
    "logging.save_freq": ("checkpoint_every", _epochs),
}
# Official keys for what this implementation always does: accepted with this value, refused with another.
OFFICIAL_FIXED: dict[str, object] = {
    "meta_learner.first_order": True, "meta_learner.zero_trick": False, "meta_learner.freeze_outer": [],
    "meta_learner.freeze_inner": [], "meta_learner.sparsity.structured": False,
    "meta_learner.sparsity.on_bias": True, "meta_learner.sparsity.sparsify_where": ["sp_mod"],
    "meta_learner.sparsity.fix_embeddings": False, "base_learner.head": "cosine", "base_learner.bias": False,
    "train.finetune": "end2end", "train.gradient_surgery": False, "train.source_info": False,
    "optimizer.name": "SGD", "optimizer.nesterov": False,
}
# Official keys with no effect on meta-training, in the official code or here (logging, settings its
# code never reads): ignored by design. docs/configs.md says why for each.
OFFICIAL_IGNORED: tuple[str, ...] = (
    "logging.print_freq", "logging.exp_dir", "meta_learner.num_inner_steps", "meta_learner.dense_teacher.num_steps",
    "meta_learner.sparsity.penalty_strength", "meta_learner.sparsity.update_mask",
    "meta_learner.sparsity.straight_through_relu", "meta_learner.sparsity.sample_mask_per_step",
    "meta_learner.sparsity.stochastic_mask", "meta_learner.inner_lr.structured", "meta_learner.inner_lr.learnable",
    "meta_learner.inner_lr.mask_inner_lr_multiplier", "meta_learner.inner_lr.per_param_group",
    "meta_learner.outer_lr.lr", "meta_learner.outer_lr.inner_lr_lr", "base_learner.feature_dim",
    "base_learner.output_dim", "base_learner.keep_bn_stats", "train.max_patience", "train.num_ways",
    "train.num_shots", "train.num_queries", "test.datasets", "test.max_tasks", "test.num_ways", "test.num_shots",
    "test.num_queries", "scheduler.sched", "scheduler.warmup_lr", "scheduler.min_lr", "scheduler.decay_epochs",
    "scheduler.warmup_epochs", "scheduler.cooldown_epochs", "scheduler.patience_epochs", "scheduler.decay_rate",
    "optimizer.weight_decay",
)


class _YamlLoader(yaml.SafeLoader):
    """YAML as researchers write it: `lr: 1e-4` is a number (YAML 1.1 would read the string "1e-4"), and
    a key given twice in one mapping is an error, not a silent choice of the last value."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=True) for key, _ in node.value]
        twice = first_repeated(keys)
        if twice is not None:
            raise yaml.constructor.ConstructorError(None, None, f"the key {keys[twice]!r} is given twice",
                                                    node.value[twice][0].start_mark)
        return super().construct_mapping(node, deep)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _flattened(values: dict, prefix: str = "") -> dict:
    """A nested YAML mapping as dotted keys: {"optimizer": {"lr": 1e-4}} -> {"optimizer.lr": 1e-4}."""
    flat: dict = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        flat |= _flattened(value, name + ".") if isinstance(value, dict) else {name: value}
    return flat


def official_fields(values: object, where: str) -> object:
    """A YAML file's values as Config fields: a field's own name stays; an official key (nested sections
    as dotted paths) becomes its field, converted (OFFICIAL_KEYS); a fixed one must hold this
    implementation's value (OFFICIAL_FIXED); an ignored one is dropped (OFFICIAL_IGNORED). Any other key,
    a wrong value, or one field set twice with different values is one RunError line."""
    if not isinstance(values, dict):
        return values
    fields = {f.name: f.type for f in dataclasses.fields(Config)}
    out: dict = {}
    source: dict[str, str] = {}
    for key, value in _flattened(values).items():
        if key in fields or key == "config_format":
            field, converted = key, value
        elif key in OFFICIAL_KEYS:
            field, convert = OFFICIAL_KEYS[key]
            try:
                converted = convert(value)
            except ValueError as error:
                raise RunError(f"{where}: {key} = {value_text(value)} is not valid; it must be {error} "
                               f"(it sets {field})") from None
            problem = type_problem(fields[field], converted)
            if problem:
                raise RunError(f"{where}: {key} = {value_text(value)} is not valid; it must be {problem} (it sets {field})")
        elif key in OFFICIAL_FIXED:
            if value != OFFICIAL_FIXED[key]:
                raise RunError(f"{where}: {key} = {value_text(value)} has no counterpart here; this implementation "
                               f"always runs as {key} = {value_text(OFFICIAL_FIXED[key])} (docs/configs.md)")
            continue
        elif key in OFFICIAL_IGNORED:
            continue
        else:
            known = list(fields) + list(OFFICIAL_KEYS) + list(OFFICIAL_FIXED) + list(OFFICIAL_IGNORED)
            raise RunError(f"{where}: {key} is neither a Config field nor an official key this implementation "
                           f"reads (docs/configs.md)" + closest_field(key, known))
        if field in out and out[field] != converted:
            raise RunError(f"{where} sets {field} twice: {source[field]} = {value_text(out[field])} and {key} = "
                           f"{value_text(value)}; keep one")
        out[field], source[field] = converted, key
    return out


def _yaml_reason(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or reason(error)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def read_config_file(path: Path) -> dict:
    """The Config fields of a --config file: JSON, TOML (.toml) or YAML (.yaml, .yml: project field names
    or the official code's keys, `official_fields`), checked as config.json is (`check_fields`)."""
    path, where = Path(path), f"--config {path}"
    kind = {".toml": "TOML", ".yaml": "YAML", ".yml": "YAML"}.get(path.suffix.lower(), "JSON")
    try:
        text = path.read_text()
        values = tomllib.loads(text) if kind == "TOML" else \
            yaml.load(text, Loader=_YamlLoader) if kind == "YAML" else json.loads(text, object_pairs_hook=_once)
    except yaml.YAMLError as error:
        raise RunError(f"{where}: not a readable YAML file of Config fields ({_yaml_reason(error)})") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise RunError(f"{where}: not a readable {kind} file of Config fields ({reason(error)})") from None
    if kind == "YAML":
        values = official_fields(values, where)
    return check_fields(Config, config_fields(values, where), where)
