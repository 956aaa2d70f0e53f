"""`lowrank-rlhf config`: every recipe key with its type, default, allowed values and help, from the dataclasses.

The help strings live beside the fields in config.py (`opt(default, help, choices, low, high)`); this renders them
as markdown, so docs/config.md cannot drift from the code (tests/test_config.py regenerates it and compares).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from ..config import ConfigError, RecipeConfig

MARKER = "<!-- written by `lowrank-rlhf config --out docs/config.md`; edit the help in lowrank_rlhf/config.py -->"


def _type_name(tp) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args and typing.get_origin(tp) is not None:
        return f"{_type_name(args[0])} or null"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "" or value is None:
        return "(empty)" if value == "" else "null"
    return str(value)


def _allowed(meta: dict) -> str:
    if meta.get("choices"):
        return " | ".join(str(c) for c in meta["choices"])
    low, high = meta.get("low"), meta.get("high")
    if low is None and high is None:
        return ""
    if high is None:
        return f">= {low:g}"
    return f"[{'-inf' if low is None else f'{low:g}'}, {high:g}]"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def reference() -> str:
    """The markdown reference: one table per recipe section, in the order of RecipeConfig."""
    hints = typing.get_type_hints(RecipeConfig)
    lines = [MARKER, "", "# Recipe reference", "",
             "Every key a recipe YAML (or a `key=value` override on the command line) may set. Unknown keys, wrong "
             "types and values outside the allowed ones are refused with one line naming the key.", "",
             "| key | type | default | allowed | what |", "|---|---|---|---|---|"]
    sections = []
    for f in dataclasses.fields(RecipeConfig):
        if dataclasses.is_dataclass(hints[f.name]):
            sections.append(f)
            continue
        lines.append(f"| `{f.name}` | {_type_name(hints[f.name])} | `{_default(f)}` | {_cell(_allowed(f.metadata))} "
                     f"| {_cell(f.metadata.get('help', ''))} |")
    for section in sections:
        cls = hints[section.name]
        lines += ["", f"## `{section.name}:` {section.metadata.get('help', '')}", "",
                  "| key | type | default | allowed | what |", "|---|---|---|---|---|"]
        section_hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            lines.append(f"| `{section.name}.{f.name}` | {_type_name(section_hints[f.name])} | `{_default(f)}` | "
                         f"{_cell(_allowed(f.metadata))} | {_cell(f.metadata.get('help', ''))} |")
    return "\n".join(lines) + "\n"


def write_reference(out: Path) -> Path:
    """Write the reference to `out`; a file there that this command did not write is refused, not replaced."""
    if out.exists() and MARKER not in out.read_text(errors="replace")[:400]:
        raise ConfigError(f"config --out: {out} exists and was not written by this command; choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(reference())
    tmp.replace(out)
    return out
