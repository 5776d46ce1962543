"""Generate reference/spec.md from the code at build time.

- the audit spec's fields from the pydantic models' JSON schema (`stabilitybench.audit.spec`);
- a guard's fields from `GuardConfig` (defaults and the comments beside them);
- the perturbation catalogue from the perturbation registry (`Param.allowed()`, `models`);
- the detectors from the detector registry.
"""

from __future__ import annotations

import ast
import inspect
import json
from dataclasses import MISSING, fields
from typing import Any

import mkdocs_gen_files

from stabilitybench.audit import spec as spec_module
from stabilitybench.guard.config import ACTIONS, GUARDED_KINDS, GuardConfig


def _cell(text: Any) -> str:
    return str(text).replace("|", "&#124;").replace("\n", " ")


def _type(schema: dict[str, Any], defs: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})" if name in defs else name
    if "anyOf" in schema:
        return " or ".join(_type(s, defs) for s in schema["anyOf"])
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    if "enum" in schema:
        return " or ".join(f"`{v}`" for v in schema["enum"])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list of {_type(schema.get('items', {}), defs)}"
    if kind == "object" and "additionalProperties" in schema:
        extra = schema["additionalProperties"]
        return "mapping" if extra is True else f"mapping of {_type(extra, defs)}"
    return {
        "integer": "int",
        "number": "float",
        "string": "str",
        "boolean": "bool",
        "null": "null",
        "object": "mapping",
    }.get(kind, kind)


def _limits(schema: dict[str, Any]) -> str:
    words = []
    for key, text in (
        ("minimum", "≥"),
        ("exclusiveMinimum", ">"),
        ("maximum", "≤"),
        ("exclusiveMaximum", "<"),
        ("minLength", "length ≥"),
        ("minItems", "items ≥"),
    ):
        for part in [schema, *schema.get("anyOf", [])]:
            if key in part:
                words.append(f"{text} {part[key]}")
    return ", ".join(words)


def _model_table(title: str, model: type, lines: list[str]) -> None:
    schema = model.model_json_schema()
    defs = schema.get("$defs", {})
    lines.append(f"\n### {title}\n")
    doc = inspect.cleandoc(model.__doc__ or "")
    if doc:
        lines.append(doc.replace("\n", " ") + "\n")
    required = set(schema.get("required", []))
    lines.append("| field | type | default | limits |")
    lines.append("|---|---|---|---|")
    for name, prop in schema.get("properties", {}).items():
        default = (
            "required"
            if name in required
            else (f"`{json.dumps(prop['default'])}`" if "default" in prop else "—")
        )
        lines.append(
            f"| `{name}` | {_cell(_type(prop, defs))} | {_cell(default)} | {_cell(_limits(prop))} |"
        )
    if schema.get("additionalProperties") is False:
        lines.append("\nUnknown keys are errors.")


def _field_comments(cls: type) -> dict[str, str]:
    """The `# comment` beside each field of a dataclass, read from its source."""
    source = inspect.getsource(cls)
    comments: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line = source.splitlines()[node.lineno - 1]
            if "#" in line:
                comments[node.target.id] = line.split("#", 1)[1].strip()
    return comments


def _guards(lines: list[str]) -> None:
    lines.append("\n## Guards (`guards:`)\n")
    lines.append(
        "Each entry of the optional `guards:` axis is `none` (unguarded) or a mapping with these "
        f"fields. Actions: {', '.join(f'`{a}`' for a in ACTIONS)}. Workload kinds that host a "
        f"guard: {', '.join(f'`{k}`' for k in GUARDED_KINDS)}.\n"
    )
    comments = _field_comments(GuardConfig)
    lines.append("| field | default | meaning |")
    lines.append("|---|---|---|")
    for field in fields(GuardConfig):
        default = "required" if field.default is MISSING else f"`{json.dumps(field.default)}`"
        lines.append(f"| `{field.name}` | {default} | {_cell(comments.get(field.name, ''))} |")


def _perturbations(lines: list[str]) -> None:
    from stabilitybench.perturbations import registry

    lines.append("\n## Perturbations (`perturbations:`)\n")
    lines.append(
        "Each entry is `none` (the baseline), a mapping `{kind: …, at: …, …}`, or a list of "
        "mappings (several perturbations in one run). Every kind takes `at` (an int optimizer "
        "step, or a float in (0, 1): a fraction of the run), `duration` (optimizer steps, ≥ 1; "
        "one-shot kinds only 1) and an optional `label`; environment kinds also take "
        "`duration_env_steps`; kinds with a ramp field also take `ramp: none | linear | "
        "geometric`.\n"
    )
    lines.append("| kind | dimension | needs | parameters | ramp field | what it models |")
    lines.append("|---|---|---|---|---|---|")
    for name, cls in sorted(registry().items(), key=lambda kv: (kv[1].dimension, kv[0])):
        params = "; ".join(
            f"`{p}`: {spec.allowed()}" + ("" if spec.required else f" (default {spec.default!r})")
            for p, spec in cls.params.items()
        ) or ("— (acts once)" if cls.one_shot else "—")
        ramp = (
            "—"
            if cls.ramp_field is None or cls.one_shot
            else f"`{cls.ramp_field}` ({cls.ramp_mode})"
        )
        lines.append(
            f"| `{name}` | {cls.dimension} | {cls.adapter or '—'} | {_cell(params)} | {ramp} "
            f"| {_cell(cls.models)} |"
        )


def _detectors(lines: list[str]) -> None:
    lines.append("\n## Detectors\n")
    lines.append(
        "The names a guard's `detector:` and `stabilitybench monitor evaluate` use. Fitted "
        "detectors learn from healthy runs (`monitor fit`); the others need no fit.\n"
    )
    lines.append("| name | what it is | source | fitted |")
    lines.append("|---|---|---|---|")
    from stabilitybench.detectors import detector_classes

    for name, cls in detector_classes().items():
        lines.append(
            f"| `{name}` | {_cell(cls.title)} | {_cell(cls.citation)} | "
            f"{'yes' if getattr(cls, 'fitted', False) else 'no'} |"
        )


def main() -> None:
    lines = [
        "# Audit spec reference",
        "",
        "Generated from the code at build time: the tables below are the pydantic models' JSON "
        "schema (`stabilitybench.audit.spec`), the guard settings (`GuardConfig`) and the "
        "perturbation and detector registries. The [audits guide](../guides/audits.md) explains "
        "how the pieces fit together.",
        "",
        "## The spec",
    ]
    _model_table("AuditSpec", spec_module.AuditSpec, lines)
    lines.append(
        "\n`workloads` entries are validated by the model of their `kind` below; a kind added "
        "with `register_workload` checks its own extra keys."
    )
    for name, model in spec_module.BUILTIN_SPECS.items():
        _model_table(f"{model.__name__} (`kind: {name}`)", model, lines)
    _model_table("EvalSpec", spec_module.EvalSpec, lines)
    _model_table("CollapseSettings", spec_module.CollapseSettings, lines)
    _model_table("WarningSettings", spec_module.WarningSettings, lines)
    _guards(lines)
    _perturbations(lines)
    _detectors(lines)
    with mkdocs_gen_files.open("reference/spec.md", "w") as page:
        page.write("\n".join(lines) + "\n")


main()
