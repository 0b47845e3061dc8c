"""Turn a config dataclass into typer options, so every field is a documented CLI option.

Why generate instead of hand-writing: a field added to a config shows up in `--help` with its help
text, its type and its default, and unknown options fail at parse time.
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Any, Callable, Literal, get_args, get_origin

import typer


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def config_params(cls: type, *, skip: tuple[str, ...] = (), overrides: dict[str, Any] | None = None) -> list[inspect.Parameter]:
    """typer-ready `inspect.Parameter`s for the fields of dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    overrides = overrides or {}
    params = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        default = overrides.get(f.name, default)
        help_text = f.metadata.get("help", "")
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"help": help_text, "show_default": True}
        if get_origin(tp) is Literal:
            ann: Any = tp  # typer renders Literal as a choice
        elif tp is bool:
            ann = bool
            flag = f"{flag}/--no-{f.name.replace('_', '-')}"
        elif get_origin(tp) is list:
            ann = list[get_args(tp)[0]]
            default = list(default) if default else None
        else:
            ann = Optional_(tp) if optional else tp
        params.append(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=typer.Option(default, flag, **kw), annotation=ann)
        )
    return params


def Optional_(tp: Any) -> Any:
    return typing.Optional[tp]


def build_config(cls: type, values: dict[str, Any]) -> Any:
    """Instantiate `cls` from parsed CLI values (lists normalised, None lists -> empty)."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        v = values[f.name]
        if isinstance(f.default, Path) and isinstance(v, str):
            v = Path(v)
        if v is None and f.default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            v = f.default_factory()  # type: ignore[misc]
        kwargs[f.name] = v
    return cls(**kwargs)


def command_from_config(
    app: typer.Typer,
    name: str,
    cls: type,
    run: Callable[[Any], Any],
    *,
    help: str,
    extra: list[inspect.Parameter] | None = None,
    skip: tuple[str, ...] = (),
    overrides: dict[str, Any] | None = None,
) -> None:
    """Register `snd <name>` whose options are the fields of `cls` (+ `extra`), calling run(cfg, **extra)."""
    params = config_params(cls, skip=skip, overrides=overrides)
    extra = extra or []
    extra_names = {p.name for p in extra}

    def _cmd(**kwargs: Any) -> Any:
        cfg = build_config(cls, {k: v for k, v in kwargs.items() if k not in extra_names})
        return run(cfg, **{k: kwargs[k] for k in extra_names})

    _cmd.__signature__ = inspect.Signature(extra + params)  # type: ignore[attr-defined]
    _cmd.__name__ = name.replace("-", "_")
    _cmd.__doc__ = help
    _cmd.snd_config = cls  # type: ignore[attr-defined]  # which config a command parses (tests/test_docs.py)
    app.command(name, help=help)(_cmd)
