"""Plumbing: a Config stored and read back — config.json, checkpoints' configs, --config files, old runs.

What a stored configuration promises (docs/reliability.md): every field present has its type, an
unknown field is refused, a field added since the file was written reads its default (one note line
names it: `note_filled_fields`), a renamed field keeps loading (`RENAMED_FIELDS`), and a format
newer than this code is refused; each problem is one RunError line naming the file and the key.
"""

import dataclasses
import difflib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal, get_args, get_origin

import torch
import typer

import smat
from cli import RunError, one_line, reason
from smat import Config

# The "config_format" entry of config.json and of every checkpoint's config: 1 (no entry) before it was
# recorded. A configuration lacking fields added since it was written reads their defaults (`read_config`
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


def read_json(path: Path, what: str) -> object:
    if not path.is_file():
        raise RunError(f"{path} is not a file; {what}")
    try:
        return json.loads(path.read_text())
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
