"""Settings of the services, the client and the page: each declared once as a field of a frozen
dataclass, given as a flag or a MEDVLM_* variable, parsed once (flag, then variable, then default).

    @dataclasses.dataclass(frozen=True)
    class PageSettings:
        port: int = setting(8050, "Port of the page; 0 picks a free one.", env="MEDVLM_WEB_PORT")

    parser = argparse.ArgumentParser()
    add_flags(parser, PageSettings)                  # --port, help "... [MEDVLM_WEB_PORT; default 8050]"
    settings = parse(PageSettings, parser.parse_args())

A field's type is its default's (str, int, float or bool; a bool is --name/--no-name). A variable's
text is parsed whatever it is, the empty string included ("" is False for a bool). Errors name the
variable, and the value only where the setting is not secret. This module imports nothing of the
project, so the client and the page, which ship in the wheel without services/, use it as the
services do.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

_KIND_NAMES = {int: "an integer", float: "a number", bool: "a boolean", str: "a string"}


class SettingError(ValueError):
    """A setting's value could not be read; the message names the setting."""


@dataclasses.dataclass(frozen=True)
class Setting:
    """One declared setting: the field it fills, its flag and variable, its type, default and help."""

    name: str
    flag: str
    env: str
    kind: type
    default: Any
    help: str
    secret: bool
    scope: tuple[str, ...]

    @property
    def flag_help(self) -> str:
        """The help line of --help: what it does and trades, then its variable and default."""
        return f"{self.help} [{self.env}; default {self.default!r}]"

    def from_text(self, raw: str) -> Any:
        """The value of the variable's text, or SettingError naming the variable."""
        try:
            return _parse_bool(raw) if self.kind is bool else self.kind(raw)
        except ValueError:
            shown = "" if self.secret else f": {raw!r}"
            raise SettingError(f"{self.env}: not {_KIND_NAMES.get(self.kind, self.kind.__name__)}{shown}") from None


def setting(default: Any, help: str, *, env: str = "", secret: bool = False, scope: tuple[str, ...] = ()) -> Any:
    """Declare a setting as a dataclass field. `help` says what it does and what it trades; `env`
    replaces the variable MEDVLM_<FIELD NAME>; `secret` keeps the value out of error messages;
    `scope` names the programs that take it (the services' settings: which services)."""
    if type(default) not in _KIND_NAMES:
        raise TypeError(f"a setting's default is a str, int, float or bool, not {type(default).__name__}")
    return dataclasses.field(default=default, metadata={
        "setting": {"help": help, "env": env, "secret": secret, "scope": tuple(scope)}})


def declared(cls: type, scope: str | None = None) -> list[Setting]:
    """The settings a dataclass declares, in field order; with `scope`, those whose scope holds it."""
    found = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("setting")
        if meta is None or (scope is not None and scope not in meta["scope"]):
            continue
        found.append(Setting(
            name=f.name, flag="--" + f.name.replace("_", "-"), env=meta["env"] or "MEDVLM_" + f.name.upper(),
            kind=type(f.default), default=f.default, help=meta["help"], secret=meta["secret"], scope=meta["scope"],
        ))
    return found


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, scope: str | None = None) -> None:
    """A flag per declared setting, with its variable and default in the help. A flag not given
    is None in the namespace, so parse() can tell it from one given with the default's value."""
    for s in declared(cls, scope):
        help_text = s.flag_help.replace("%", "%%")  # argparse formats help with %: "10 %" must stay text
        if s.kind is bool:
            parser.add_argument(s.flag, dest=s.name, default=None, action=argparse.BooleanOptionalAction,
                                help=help_text)
        else:
            parser.add_argument(s.flag, dest=s.name, type=s.kind, default=None, help=help_text)


def read(cls: type, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None,
         scope: str | None = None) -> dict[str, Any]:
    """The values given for a dataclass's settings: a flag's, else its variable's. A setting given
    neither is left out, so the dataclass's default applies. Raises SettingError."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for s in declared(cls, scope):
        flag_value = getattr(args, s.name, None) if args is not None else None
        if flag_value is not None:
            values[s.name] = flag_value
        elif s.env in environ:
            values[s.name] = s.from_text(environ[s.env])
    return values


def parse(cls: type, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None,
          scope: str | None = None, **fixed: Any) -> Any:
    """The frozen settings: flags (from add_flags), then MEDVLM_* variables, then defaults; `fixed`
    fills fields that are not settings. Raises SettingError naming a bad variable."""
    return cls(**fixed, **read(cls, args, environ, scope))


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(text)
