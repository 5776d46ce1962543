"""Generate reference/cli.md from the typer app (`stabilitybench.cli:app`) at build time.

Walks the command tree typer builds (click's classes, which typer may vendor: hence duck typing),
so every verb, argument, option, default and help text on the page is the one
`stabilitybench --help` prints.
"""

from __future__ import annotations

import enum
import typing
from typing import Any

import mkdocs_gen_files
import typer

from stabilitybench.cli import app


def _first_paragraph(text: str | None) -> str:
    return (text or "").strip().split("\n\n")[0].replace("\n", " ")


def _type_name(param: Any) -> str:
    """The value's type in words: an enum's choices, else the annotation's name."""
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if annotation is None:
        kind = getattr(param, "type", None)
        return getattr(kind, "name", "text") if kind is not None else "text"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " or ".join(f"`{member.value}`" for member in annotation)
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        (item,) = typing.get_args(annotation)[:1]
        return f"{ {'str': 'text'}.get(getattr(item, '__name__', ''), getattr(item, '__name__', item)) } (repeatable)"
    return {"Path": "path", "str": "text"}.get(
        getattr(annotation, "__name__", ""), getattr(annotation, "__name__", str(annotation))
    )


def _param_row(param: Any) -> str:
    if param.param_type_name == "argument":
        name = f"`{param.name.upper()}`"
        kind = "argument"
    else:
        names = [*param.opts, *param.secondary_opts]
        name = ", ".join(f"`{n}`" for n in names)
        kind = "flag" if getattr(param, "is_flag", False) else "option"
    type_name = _type_name(param)
    if getattr(param, "is_flag", False):
        type_name = "—"
    default = param.default
    if callable(default) or default is None or default == () or kind == "argument":
        default_text = "required" if param.required else "—"
    elif isinstance(default, bool):
        default_text = "on" if default else "off"
    else:
        default_text = f"`{getattr(default, 'value', default)}`"
    help_text = (getattr(param, "help", None) or "").replace("|", "&#124;").replace("\n", " ")
    return f"| {name} | {kind} | {type_name} | {default_text} | {help_text} |"


def _usage(path: list[str], command: Any) -> str:
    words = ["stabilitybench", *path]
    if hasattr(command, "commands"):
        return " ".join([*words, "COMMAND", "[OPTIONS]"])
    for param in command.params:
        if param.param_type_name == "argument":
            words.append(param.name.upper() if param.required else f"[{param.name.upper()}]")
    return " ".join([*words, "[OPTIONS]"])


def _command(path: list[str], command: Any, out: list[str]) -> None:
    if getattr(command, "hidden", False):
        return
    if path:
        out.append(f"\n## `{' '.join(path)}`\n")
        out.append(_first_paragraph(command.help) + "\n")
        out.append(f"```\n{_usage(path, command)}\n```\n")
        params = [p for p in command.params if p.name not in ("help",)]
        if params:
            out.append("| name | kind | type | default | help |")
            out.append("|---|---|---|---|---|")
            out.extend(_param_row(p) for p in params)
    if hasattr(command, "commands"):
        for name in command.commands:
            _command([*path, name], command.commands[name], out)


def main() -> None:
    root = typer.main.get_command(app)
    lines = [
        "# CLI reference",
        "",
        "Generated from the command-line app at build time (`stabilitybench.cli:app`); "
        "`stabilitybench VERB --help` prints the same. Every user error is one red line "
        "and exit code 2.",
        "",
        "Global options: "
        + ", ".join(f"`{opt}`" for p in root.params for opt in getattr(p, "opts", []))
        + ".",
    ]
    _command([], root, lines)
    with mkdocs_gen_files.open("reference/cli.md", "w") as page:
        page.write("\n".join(lines) + "\n")


main()
