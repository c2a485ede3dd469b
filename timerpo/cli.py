"""Command-line flags from a dataclass, the one way train.py, eval.py and data_gen.py read their flags.

An entry point declares its settings as one dataclass; each field carries its doc (and choices) in its
metadata (`flag`, or train.py's paper()/option()). `add_flags` makes one flag per field, --field-name, typed
by the field's annotation, its --help line built from the doc and the default. A usage error is one
`error: ...` line on stderr and exit code 2 (`usage_error`; argparse's own errors also exit 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from dataclasses import field

# Field metadata passed through to argparse.add_argument as they are.
ARGPARSE_KEYS = ("required", "nargs", "const", "metavar")


def flag(value, doc: str, choices: tuple | None = None, **metadata):
    """A dataclass field that is a flag: default `value`, help `doc`, optional `choices`. Further metadata:
    required / nargs / const / metavar go to argparse; one_of="name" puts the flag in a group of which exactly
    one must be given."""
    return field(default=value, metadata={"doc": doc, "choices": choices, **metadata})


def default_help(f: dataclasses.Field) -> str:
    """A field's --help line: its doc, then its default unless that is None or False (nothing given)."""
    doc = f.metadata["doc"]
    return doc if f.default is None or f.default is False else f"{doc} [default: {f.default}]"


def add_flags(parser: argparse.ArgumentParser, cls: type, help_of=default_help, suppress: bool = False,
              titles: dict | None = None, extra: dict | None = None) -> None:
    """One flag per field of the dataclass `cls`, in field order (those of `titles` last).

    A bool field is a switch (store_true). Other annotations give the value's type: `T | None` is T, `list[T]`
    is T (with nargs from the metadata), and in `bool | T` the bool is the flag given without a value (nargs and
    const from the metadata or `extra`). The metavar is the type's name (INT, FLOAT, STR) unless there are
    choices. help_of(field) writes each help line. suppress: flags not given stay out of the namespace
    (argparse.SUPPRESS) instead of taking the field's default. titles: {base dataclass of cls: title}; the
    fields inherited from it get an argument group of that title in --help. extra: {field name: argparse
    keywords} for flags that need more than the metadata says.
    """
    types, extra = typing.get_type_hints(cls), extra or {}
    groups = {base: parser.add_argument_group(title) for base, title in (titles or {}).items()}
    exclusive = {}  # one_of name -> its argparse group
    grouped = {g.name: base for base in groups for g in dataclasses.fields(base)}  # field name -> its group's base
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name in grouped):  # the groups' flags last
        meta = f.metadata
        target = groups[grouped[f.name]] if f.name in grouped else parser
        if meta.get("one_of"):
            if meta["one_of"] not in exclusive:
                exclusive[meta["one_of"]] = parser.add_mutually_exclusive_group(required=True)
            target = exclusive[meta["one_of"]]
        keywords = {k: meta[k] for k in ARGPARSE_KEYS if k in meta} | extra.get(f.name, {})
        keywords |= {"default": argparse.SUPPRESS if suppress else f.default, "help": help_of(f)}
        kind = value_type(types[f.name])
        name = "--" + f.name.replace("_", "-")
        if kind is bool and "nargs" not in keywords:
            target.add_argument(name, action="store_true", **keywords)
            continue
        choices = meta.get("choices")
        keywords.setdefault("metavar", None if choices else kind.__name__.upper())
        target.add_argument(name, type=kind, choices=choices, **keywords)


def value_type(annotation) -> type:
    """The type a flag's value is read as: int for `int | None`, str for `list[str]` and for `bool | str`."""
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0]
    args = [t for t in typing.get_args(annotation) if t is not type(None)]  # a Union: T | None, bool | T
    if len(args) == 1:
        return value_type(args[0])
    return next((t for t in args if t is not bool), bool) if args else annotation


def usage_error(err, tool: str = "") -> int:
    """A setting, file or model that cannot be used: one line `error: <err>` on stderr (after `tool: ` when
    given), and exit code 2, as argparse gives its own errors."""
    print(f"{tool + ': ' if tool else ''}error: {err}", file=sys.stderr)
    return 2
