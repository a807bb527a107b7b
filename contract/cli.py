"""Command-line flags generated from a config dataclass, so a new knob is one field, not seven edits.

Every field becomes `--field-name`; its type comes from the annotation (`int`, `float`, `str`, `bool`,
`tuple[int, ...]`, each optionally `| None`), its help text, choices and metavar from the field's metadata
(`field(metadata={"help": ..., "choices": ...})`), and `--help` shows its default. A flag that is not given
is left out of the result, so the dataclass's own default (or a preset) applies: the CLI never re-states
defaults. A boolean that is off by default is a plain switch `--x`; one that is on, or unset, takes
`--x` / `--no-x`; tuples take several values, space- or comma-separated.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

_SCALARS = {"int": int, "float": float, "str": str}


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr and exit status 2 (like every user error here);
    flags are never abbreviated (with many flags, a prefix silently picks the wrong one)."""

    def __init__(self, *args: Any, error_prefix: str | None = None, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.error_prefix = error_prefix

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(2, f"{self.error_prefix or self.prog + ': error'}: {message}\n")


def flag_name(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or f"--{field.name.replace('_', '-')}"


def _kind(field: dataclasses.Field) -> tuple[str, str | None]:
    """('int' | 'float' | 'str' | 'bool' | 'tuple', element type of a tuple) from the annotation's text."""
    text = str(field.type).replace("typing.", "").replace(" ", "")
    base = text.split("|")[0]
    if base.startswith("tuple["):
        return "tuple", base[len("tuple["):].split(",")[0]
    return base, None


def _default_text(field: dataclasses.Field) -> str:
    if field.metadata.get("default_help"):
        return field.metadata["default_help"]
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = field.default_factory()  # type: ignore[misc]
    else:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, tuple):
        return " ".join(map(str, value)) or "none"
    return str(value)


def _element(kind: str, flag: str):
    convert = _SCALARS[kind]

    def parse(text: str):
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes {kind} values, got {text!r}") from None
    return parse


class _SplitValues(argparse.Action):
    """`--x a b,c` -> (a, b, c); an empty list (`--x ''`) is an error, not "flag not given"."""

    def __init__(self, *args: Any, element=str, **kwargs: Any):
        self.element = element
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        items = [v.strip() for value in values for v in str(value).split(",") if v.strip()]
        if not items:
            parser.error(f"{option_string} needs at least one value")
        try:
            setattr(namespace, self.dest, tuple(self.element(v) for v in items))
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))


def add_config_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                         exclude: Iterable[str] = (), only: Iterable[str] | None = None) -> list[str]:
    """Add a flag for each field of dataclass `cls` (those in `only`, minus `exclude`); returns the field names."""
    exclude, keep = set(exclude), (None if only is None else list(only))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = [n for n in (keep if keep is not None else fields) if n not in exclude and not fields[n].metadata.get("no_cli")]
    for name in names:
        field = fields[name]
        flag, (kind, element) = flag_name(field), _kind(field)
        meta = field.metadata
        help_text = f"{meta.get('help', '')} (default: {_default_text(field)})".strip()
        common: dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS, help=help_text)
        if meta.get("metavar"):
            common["metavar"] = meta["metavar"]
        if kind == "bool" and field.default is False:  # off unless given: a plain switch
            common["help"] = meta.get("help", "")
            parser.add_argument(flag, action="store_true", **common)
        elif kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif kind == "tuple":
            parser.add_argument(flag, nargs="+", action=_SplitValues, element=_element(element or "str", flag),
                                **common)
        else:
            if meta.get("choices"):  # shown, but checked by the config, whose message names the closest choice
                common.setdefault("metavar", "{" + ",".join(map(str, meta["choices"])) + "}")
            parser.add_argument(flag, type=_SCALARS.get(kind, str), **common)
    return names


def given(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The fields among `names` whose flags were given on the command line."""
    return {name: getattr(args, name) for name in names if hasattr(args, name)}
