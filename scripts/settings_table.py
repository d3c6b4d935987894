"""The README's settings table, generated from the Settings dataclass:
`python -m scripts.settings_table README.md` rewrites it in place; without a file it prints it."""

from __future__ import annotations

import dataclasses
import sys

from services.plumbing.settings import ALL, Settings, _env_name, _flag_name

TABLE_MARKER = "<!-- settings table: python -m scripts.settings_table README.md -->"


def markdown_table() -> str:
    """The settings as the README's table: flag, variable, default, services, what it trades."""
    rows = ["| flag | variable | default | services | what it does |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(Settings):
        if "help" not in f.metadata:
            continue
        services = ", ".join(f.metadata["services"]) if f.metadata["services"] != ALL else "all"
        default = "per service" if f.name in ("port", "metrics_port") else f"`{f.default!r}`"
        rows.append(f"| `{_flag_name(f.name)}` | `{_env_name(f.name)}` | {default} | {services} | {f.metadata['help']} |")
    return "\n".join(rows)


def update_readme(path: str) -> None:
    """Rewrite the table that follows TABLE_MARKER in a markdown file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start = text.index(TABLE_MARKER) + len(TABLE_MARKER) + 1
    end = text.index("\n\n", start)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text[:start] + markdown_table() + text[end:])


if __name__ == "__main__":
    if len(sys.argv) > 1:
        update_readme(sys.argv[1])
    else:
        print(markdown_table())
