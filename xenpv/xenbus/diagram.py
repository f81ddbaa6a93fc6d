"""Render the transition tables as Mermaid or Graphviz text (docs/xenbus.md embeds them).

One edge per row that does something (rows that only wait are left out).  The label is
the input (``be=InitWait`` for a peer state, ``close`` for a local event), the guard in
brackets and the actions after a slash.  Rows that apply to several inputs with the same
effect are merged into one edge.
"""

from __future__ import annotations

from xenpv.xenbus.machine import (
    BACKEND_TABLE,
    FRONTEND_DIRECT_TABLE,
    FRONTEND_EARLY_TABLE,
    FRONTEND_TABLE,
    Input,
    Local,
    Table,
)
from xenpv.xenbus.states import XenbusState

__all__ = ["TABLES", "edges", "render_dot", "render_mermaid", "update_generated"]

#: Tables by the name the CLI and the docs use.
TABLES: dict[str, tuple[Table, str]] = {
    "frontend": (FRONTEND_TABLE, "be"),
    "frontend-direct": (FRONTEND_DIRECT_TABLE, "be"),
    "frontend-early": (FRONTEND_EARLY_TABLE, "be"),
    "backend": (BACKEND_TABLE, "fe"),
}


def _input(inp: Input, peer: str) -> str:
    if isinstance(inp, Local):
        return inp.value
    return f"{peer}={inp.name}"


def edges(table: Table, peer: str) -> list[tuple[str, str, str]]:
    """``(from, to, label)`` for every row with an effect, inputs merged, in table order."""
    merged: dict[tuple[str, str, str], list[str]] = {}
    for (own, inp), rows in table.items():
        for row in rows:
            if row.next is None and not row.actions:
                continue
            target = (row.next if row.next is not None else own).name
            guard = f" [{row.guard.value}]" if row.guard is not None else ""
            acts = ", ".join(str(a) for a in row.actions)
            tail = f"{guard}" + (f" / {acts}" if acts else "")
            key = (own.name, target, tail)
            merged.setdefault(key, []).append(_input(inp, peer))
    return [(src, dst, " | ".join(ins) + tail) for (src, dst, tail), ins in merged.items()]


def render_mermaid(name: str) -> str:
    """Mermaid ``stateDiagram-v2`` text of table ``name`` (see :data:`TABLES`)."""
    table, peer = TABLES[name]
    lines = ["stateDiagram-v2", f"    [*] --> {XenbusState.Initialising.name}"]
    for src, dst, label in edges(table, peer):
        dst_name = "[*]" if dst == XenbusState.Unknown.name else dst
        lines.append(f"    {src} --> {dst_name}: {label.replace(':', ' ')}")
    return "\n".join(lines) + "\n"


def render_dot(name: str) -> str:
    """Graphviz ``digraph`` text of table ``name`` (see :data:`TABLES`)."""
    table, peer = TABLES[name]
    lines = [f'digraph "{name}" {{', "    rankdir=LR;", "    node [shape=box];"]
    for src, dst, label in edges(table, peer):
        text = label.replace('"', '\\"')
        lines.append(f'    {src} -> {dst} [label="{text}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


_BEGIN = "<!-- generated: xenbus diagram {name} -->"
_END = "<!-- end generated -->"


def update_generated(text: str) -> str:
    """Rewrite every generated diagram section of a Markdown document.

    A section starts with ``<!-- generated: xenbus diagram NAME -->`` and ends with
    ``<!-- end generated -->``; its body becomes a fenced Mermaid block of table NAME.
    Run ``python -m xenpv.xenbus.diagram docs/xenbus.md`` after changing a table.
    """
    out: list[str] = []
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        stripped = line.strip()
        for name in TABLES:
            if stripped == _BEGIN.format(name=name):
                out.append("```mermaid\n" + render_mermaid(name) + "```\n")
                while i < len(lines) and lines[i].strip() != _END:
                    i += 1
                break
    return "".join(out)


if __name__ == "__main__":  # pragma: no cover
    import sys

    for doc in sys.argv[1:]:
        with open(doc, encoding="utf-8") as f:
            old = f.read()
        new = update_generated(old)
        if new != old:
            with open(doc, "w", encoding="utf-8") as f:
                f.write(new)
