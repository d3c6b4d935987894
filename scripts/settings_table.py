"""The README's settings tables, generated from the declared settings (medvlm.settings) of the
services, the client's connection and the page: `python -m scripts.settings_table README.md`
rewrites each table in place, after its marker; without a file it prints them."""

from __future__ import annotations

import sys

from medvlm.client import ConnectionSettings
from medvlm.settings import declared
from medvlm.web import WebSettings
from services.plumbing.settings import ALL, Settings

MARKER = "<!-- {name} settings table: python -m scripts.settings_table README.md -->"


def services_table() -> str:
    """The services' settings: flag, variable, default, services, what it trades."""
    rows = ["| flag | variable | default | services | what it does |", "|---|---|---|---|---|"]
    for s in declared(Settings):
        services = ", ".join(s.scope) if s.scope != ALL else "all"
        default = "per service" if s.name in ("port", "metrics_port") else f"`{s.default!r}`"
        rows.append(f"| `{s.flag}` | `{s.env}` | {default} | {services} | {s.help} |")
    return "\n".join(rows)


def program_table(cls: type) -> str:
    """One program's settings (the client's connection, the page): flag, variable, default, what it trades."""
    rows = ["| flag | variable | default | what it does |", "|---|---|---|---|"]
    rows += [f"| `{s.flag}` | `{s.env}` | `{s.default!r}` | {s.help} |" for s in declared(cls)]
    return "\n".join(rows)


def tables() -> dict[str, str]:
    """Each table by the marker it follows in the README."""
    return {
        MARKER.format(name="services"): services_table(),
        MARKER.format(name="connection"): program_table(ConnectionSettings),
        MARKER.format(name="page"): program_table(WebSettings),
    }


def update_readme(path: str) -> None:
    """Rewrite the table that follows each marker in a markdown file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for marker, table in tables().items():
        start = text.index(marker) + len(marker) + 1
        end = text.index("\n\n", start)
        text = text[:start] + table + text[end:]
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        update_readme(sys.argv[1])
    else:
        print("\n\n".join(f"{marker}\n{table}" for marker, table in tables().items()))
