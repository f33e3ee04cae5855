"""Plumbing: train.py's flags made into a Config — the profiles, --config and --set, --resume's rules, --help.

A named flag of `train.main` is a parameter named after its Config field; that name is the one place
that ties them: `config_flags` adds the field's default in each profile to the flag's help and
`given_fields` hands its value on. `config_overrides` joins --config FILE (the base), --set and the
named flags (which must agree where both set a field); `make_config` builds the run's Config from a
profile and the overrides (or, with --resume, the run's own); Config checks every value.
"""

import dataclasses
import inspect
from pathlib import Path
from typing import Literal, get_args

import typer
from rich.markup import escape

import cli
import configs
import readers
import smat
from cli import RunError
from configs import read_config
from smat import Config

# --help shows each profile's defaults; a flag left out keeps the profile's value (or, with --resume, the run's)
PROFILES = {"cpu": Config(), "paper": Config.paper()}
CONFIG_FIELDS = [f.name for f in dataclasses.fields(Config)]
FLAG_NAMES: dict[str, str] = {}  # a Config field -> its named flag ("--experts", "--teacher/--no-teacher"): config_flags


def shown(value) -> str:
    """A value as --help shows it: on/off for a switch, a long one cut (the paper's ten data sources)."""
    text = ("on" if value else "off") if isinstance(value, bool) else str(value)
    return text if len(text) <= 40 else text[:36] + "…"


# --method's help, from its type and what PMF switches: "smat or pmf (..., SMAT with n_experts 1, ...)"
METHOD_HELP = (f"{' or '.join(get_args(smat.Method))} (pmf, dense ProtoNet meta-tuning: SMAT with "
               + ", ".join(f"{k} {shown(v)}" for k, v in smat.PMF_SWITCHES.items() if k != "method") + ")")


def option(*names: str, help: str, **kwargs):
    """A flag of `main`; where its parameter is named after a Config field, `config_flags` adds that
    field's default in each profile to its help and `main` passes its value on as an override."""
    return typer.Option(*names, help=help, show_default=False, **kwargs)


def config_flags(command):
    """The one place that ties a flag to a Config field: the parameter's name. `--experts` is the
    parameter `n_experts`, so its --help shows n_experts' defaults (`profile_defaults`), and
    `given_fields` hands its value to the Config."""
    for name, parameter in inspect.signature(command).parameters.items():
        if name in CONFIG_FIELDS:
            info = parameter.annotation.__metadata__[0]
            # in Annotated, typer takes a leading "--experts" (parsed as the default) as the flag's name
            decls = [d for d in (info.default, *info.param_decls) if isinstance(d, str) and d.startswith("-")]
            FLAG_NAMES[name] = decls[0] if decls else "--" + name.replace("_", "-")
            info.help = f"{info.help} {escape(f'[default: {profile_defaults(name)}]')}"  # brackets as text
    return command


def given_fields(flags: dict) -> dict:
    """The Config fields among `main`'s parameters that the command line set (a flag left out is None)."""
    return {name: value for name, value in flags.items() if name in CONFIG_FIELDS and value is not None}


def profile_defaults(field: str) -> str:
    """A field's default for --help: "0.9" where the profiles agree, else "cpu 800, paper 50000";
    then its value under --method pmf where PMF switches it ("1 with --method pmf")."""
    values = {name: shown(getattr(cfg, field)) for name, cfg in PROFILES.items()}
    text = values["cpu"] if len(set(values.values())) == 1 else ", ".join(f"{k} {v}" for k, v in values.items())
    if field in smat.PMF_SWITCHES and field != "method":
        text += f"; {shown(smat.PMF_SWITCHES[field])} with --method pmf"
    if field in smat.PMF_CPU_LRS:
        text += f"; cpu {shown(smat.PMF_CPU_LRS[field])} with --method pmf"
    return text


def check_flags(resume: Path | None, out: Path | None, profile: str | None) -> None:
    """Flags that contradict each other: never silently ignore one."""
    if resume is not None and out is not None and Path(out).resolve() != Path(resume).resolve():
        raise RunError(f"--resume {resume} continues the run in its own directory; drop --out {out}")
    if resume is not None and profile is not None:
        raise RunError("--resume keeps the run's configuration; drop --profile")


def config_overrides(config_file: Path | None, settings: list[str], named: dict | None = None) -> dict:
    """Config fields from --config FILE (JSON, TOML or YAML: configs.read_config_file), --set KEY=VALUE
    (each value converted by its field's type) and the named flags (`named`, from `given_fields`),
    checked as config.json is (configs.check_fields: unknown keys, types, choices); Config itself checks
    the ranges. The file is the base the command line changes (one note line names what it changed);
    a field the command line sets twice with different values (`--set n_experts=4 --experts 8`) is
    refused, never silently decided. A problem is one RunError line."""
    values = configs.read_config_file(config_file) if config_file is not None else {}
    given: dict = {}
    said: dict[str, str] = {}  # field -> how the command line set it, for the error naming both
    fields = {f.name: f.type for f in dataclasses.fields(Config)}
    for setting in settings:
        key, equals, raw = (part.strip() for part in setting.partition("="))
        if not equals or not key:
            raise RunError(f"--set {setting!r}: use KEY=VALUE with a Config field as KEY, e.g. --set inner_lr=0.01")
        if key not in fields:
            raise RunError(f"--set {key}: unknown Config field; valid keys are the fields of smat.Config "
                           f"(e.g. {', '.join(list(fields)[:6])} ...)" + configs.closest_field(key, list(fields)))
        kind = fields[key]
        try:
            if kind is bool:
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(raw)
                value: object = raw.lower() in ("true", "1", "yes")
            else:
                value = int(raw) if kind is int else float(raw) if kind is float else raw
        except ValueError:
            raise RunError(f"--set {key}={raw}: not a valid {getattr(kind, '__name__', kind)}") from None
        _set_once(given, said, key, configs.check_fields(Config, {key: value}, "--set")[key], f"--set {key}={raw}")
    for key, value in (named or {}).items():
        _set_once(given, said, key, value, flag_text(key, value))
    changed = [f"{key} {configs.value_text(values[key])} -> {configs.value_text(value)}"
               for key, value in given.items() if key in values and values[key] != value]
    if changed:
        typer.echo(cli.one_line(f"note: the command line changes --config {config_file}: {', '.join(changed)}"), err=True)
    return values | given


def _set_once(given: dict, said: dict[str, str], key: str, value: object, how: str) -> None:
    """Record that the command line sets `key` to `value` (`how`: "--experts 8"); another value already
    set for it is one RunError line naming both."""
    if key in given and given[key] != value:
        raise RunError(f"{key} is set twice with different values: {said[key]} and {how}; give it once")
    given[key], said[key] = value, said.get(key, how)


def flag_text(field: str, value: object) -> str:
    """How train.py's named flag for `field` reads with `value`: "--experts 8", "--no-teacher"."""
    on, _, off = FLAG_NAMES.get(field, "--" + field.replace("_", "-")).partition("/")
    if isinstance(value, bool):
        return on if value or not off else off
    return f"{on} {value}"


def make_config(profile: Literal["cpu", "paper"], overrides: dict, resume: Path | None) -> Config:
    """The run's Config: the profile's values with `overrides`, or with --resume the run's own, unchanged
    (`episodes` too: the learning-rate schedule spans them). Config checks every value (ranges, choices)."""
    if resume is not None:
        if not (resume / "config.json").is_file():
            raise RunError(f"--resume {resume}: not a run directory (no config.json); pass a directory made by train.py")
        saved = read_config(resume)
        changed = {k: v for k, v in overrides.items() if getattr(saved, k) != v}
        if list(changed) == ["episodes"]:
            new, old = changed["episodes"], saved.episodes
            raise RunError(f"--resume {resume} --episodes {new}: the run's learning rate warms up, then decays to 0 at "
                           f"episode {old} (a cosine over its {old} episodes), and another length would change the rate "
                           f"of every episode left, or restart it on a finished run; resume without --episodes, or "
                           f"train {new} episodes in a new run: python train.py --config {resume / 'config.json'} "
                           f"--episodes {new}")
        if changed:
            raise RunError(f"--resume keeps the run's configuration; drop {', '.join(changed)}")
        return saved
    if overrides.get("method") == "pmf":
        overrides = smat.PMF_SWITCHES | (smat.PMF_CPU_LRS if profile == "cpu" else {}) | overrides
    cfg = Config(**overrides) if profile == "cpu" else Config.paper(**overrides)
    readers.check_marked(cfg.data)  # a new run's sources; a resumed one keeps what it was trained on
    return cfg
