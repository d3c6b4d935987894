"""Settings: flags beat MEDVLM_* variables beat defaults, parsed once into a frozen object, by one
mechanism (medvlm.settings) for the services, the client and the page; the README's settings table
is generated from them."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys

import pytest

from conftest import ROOT
from medvlm.client import ConnectionSettings
from medvlm.client._settings import add_connection_flags, settings_from
from medvlm.settings import SettingError, add_flags, declared, parse, setting
from medvlm.web import WebSettings
from medvlm.web.__main__ import parse as parse_page
from services.plumbing.settings import ALL, GATEWAY, TEXT, VISION, Settings, build_parser, parse_settings


@dataclasses.dataclass(frozen=True)
class Example:
    """Settings of one made-up program, declared as the services', the client's and the page's are."""

    name: str = "medvlm"
    workers: int = setting(2, "Threads. More use more cores.")
    ratio: float = setting(0.5, "A fraction. Higher trades this for that.")
    verbose: bool = setting(False, "Log more.")
    port: int = setting(8050, "Port.", env="MEDVLM_EXAMPLE_PORT")
    password: str = setting("", "A secret.", secret=True)
    gateway_only: int = setting(1, "Only in one scope.", scope=("gateway",))


def example_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_flags(parser, Example)
    return parser


def test_a_flag_beats_its_variable_which_beats_the_default():
    env = {"MEDVLM_WORKERS": "5", "MEDVLM_RATIO": "0.25", "MEDVLM_VERBOSE": "on", "MEDVLM_EXAMPLE_PORT": "9"}
    given = parse(Example, example_parser().parse_args(["--workers", "7", "--no-verbose"]), env)
    assert (given.workers, given.ratio, given.verbose, given.port) == (7, 0.25, False, 9)
    assert parse(Example, example_parser().parse_args([]), {}) == Example()
    assert parse(Example, None, {"MEDVLM_WORKERS": "3"}).workers == 3  # variables alone, no command line
    # a flag given with the default's value still beats the variable
    assert parse(Example, example_parser().parse_args(["--workers", "2"]), {"MEDVLM_WORKERS": "5"}).workers == 2
    assert parse(Example, None, {"MEDVLM_PORT": "1"}).port == 8050  # its variable is the declared one only
    assert parse(Example, None, {}, name="other").name == "other"  # fields that are not settings
    with pytest.raises(dataclasses.FrozenInstanceError):
        given.workers = 1  # type: ignore[misc]


def test_a_bad_value_names_its_setting_and_never_shows_a_secret():
    with pytest.raises(SettingError, match=r"^MEDVLM_WORKERS: not an integer: 'many'$"):
        parse(Example, None, {"MEDVLM_WORKERS": "many"})
    with pytest.raises(SettingError, match="^MEDVLM_RATIO: not a number"):
        parse(Example, None, {"MEDVLM_RATIO": "half"})
    with pytest.raises(SettingError, match="^MEDVLM_VERBOSE: not a boolean: 'maybe'"):
        parse(Example, None, {"MEDVLM_VERBOSE": "maybe"})
    assert isinstance(SettingError("x"), ValueError)  # the client's callers catch ValueError

    @dataclasses.dataclass(frozen=True)
    class Secret:
        pin: int = setting(0, "A secret number.", secret=True)

    with pytest.raises(SettingError) as caught:
        parse(Secret, None, {"MEDVLM_PIN": "12ab34"})
    assert str(caught.value) == "MEDVLM_PIN: not an integer" and "12ab34" not in str(caught.value)
    with pytest.raises(TypeError):
        setting(None, "a default of no type")


def test_the_declaration_gives_flag_variable_help_and_scope():
    (port,) = (s for s in declared(Example) if s.name == "port")
    assert (port.flag, port.env, port.kind, port.default) == ("--port", "MEDVLM_EXAMPLE_PORT", int, 8050)
    assert "name" not in {s.name for s in declared(Example)}  # a field without setting() is not one
    assert [s.name for s in declared(Example, "vision")] == []
    assert [s.name for s in declared(Example, "gateway")] == ["gateway_only"]
    text = " ".join(example_parser().format_help().split())  # as wrapped lines read
    assert "Threads. More use more cores. [MEDVLM_WORKERS; default 2]" in text
    assert "--verbose, --no-verbose" in text


def test_one_declaration_feeds_services_client_and_page(monkeypatch):
    """The same mechanism reads all three: the same variable gives the gateway and the page the same
    limit, and a bad one stops both naming it; every help line has the same shape."""
    for cls, scopes in ((Settings, ALL), (ConnectionSettings, (None,)), (WebSettings, (None,))):
        settings = declared(cls)
        assert settings and all(s.env.startswith("MEDVLM_") and s.help.strip() for s in settings), cls
        for scope in scopes:
            names = [s.flag for s in declared(cls, scope)]
            assert len(names) == len(set(names)), (cls, scope)
    # the page's parser holds its settings and the client's: no flag or field is in both
    page = {s.name for s in declared(WebSettings)}
    assert not page & {s.name for s in declared(ConnectionSettings)}

    env = {"MEDVLM_MAX_IMAGE_BYTES": "1000", "MEDVLM_MAX_IMAGES": "3", "MEDVLM_TARGET": "gw:443"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    gateway = parse_settings(GATEWAY, [], env)
    args, web = parse_page([])
    assert (web.max_image_bytes, web.max_images) == (gateway.max_image_bytes, gateway.max_images) == (1000, 3)
    assert settings_from(args).target == settings_from(None, env).target == "gw:443"
    args, web = parse_page(["--max-images", "4", "--port", "0"])
    assert (web.max_images, web.port, settings_from(args, env).target) == (4, 0, "gw:443")

    monkeypatch.setenv("MEDVLM_MAX_IMAGE_BYTES", "big")
    with pytest.raises(SystemExit, match="MEDVLM_MAX_IMAGE_BYTES"):
        parse_settings(GATEWAY, [], {"MEDVLM_MAX_IMAGE_BYTES": "big"})
    with pytest.raises(SystemExit):
        parse_page([])
    parser = argparse.ArgumentParser()
    add_connection_flags(parser)
    with pytest.raises(ValueError, match="MEDVLM_RETRY_ATTEMPTS"):
        settings_from(parser.parse_args([]), {"MEDVLM_RETRY_ATTEMPTS": "x"})


def test_the_page_reads_its_own_variables(monkeypatch, capsys):
    monkeypatch.setenv("MEDVLM_WEB_PORT", "8123")
    monkeypatch.setenv("MEDVLM_LOG_LEVEL", "debug")
    _, web = parse_page([])
    assert (web.host, web.port, web.log_level) == ("127.0.0.1", 8123, "debug")
    assert parse_page(["--port", "8124"])[1].port == 8124
    monkeypatch.setenv("MEDVLM_WEB_HOST", "0.0.0.0")
    with pytest.raises(SystemExit):
        parse_page([])
    assert "loopback only" in capsys.readouterr().err
    monkeypatch.setenv("MEDVLM_WEB_HOST", "::1")
    monkeypatch.setenv("MEDVLM_WEB_PORT", "eighty")
    with pytest.raises(SystemExit):
        parse_page([])
    assert "MEDVLM_WEB_PORT: not an integer" in capsys.readouterr().err


def test_every_help_renders(capsys):
    """argparse formats help with %: a help that says "10 %" must not break --help."""
    for service in ALL:
        assert "MEDVLM_MAX_BATCH" in build_parser(service).format_help() or service == GATEWAY
    assert "over 10 % above" in " ".join(build_parser(VISION).format_help().split())


def test_the_mechanism_imports_nothing_of_the_project():
    """The wheel (client, page) and the serving images hold it beside no other project code."""
    tree = ast.parse((ROOT / "medvlm" / "settings.py").read_text())
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert {m.split(".")[0] for m in modules} <= set(sys.stdlib_module_names) | {"__future__"}


def test_settings_flags_beat_variables_and_defaults():
    env = {"MEDVLM_MAX_TEXTS": "7", "MEDVLM_BUNDLE": "/b", "MEDVLM_ALLOW_BENCHMARK": "yes", "MEDVLM_PORT": "9"}
    settings = parse_settings(TEXT, ["--port", "1234"], env)
    assert (settings.port, settings.max_texts, settings.bundle, settings.allow_benchmark) == (1234, 7, "/b", True)
    assert parse_settings("gateway", [], {}).port == 50050
    assert parse_settings("gateway", [], {}).max_message_bytes == 64 << 20
    assert parse_settings(VISION, [], {"MEDVLM_BUNDLE": "/b"}).max_message_bytes == 32 << 20
    with pytest.raises(SystemExit):
        parse_settings(VISION, [], {})  # no bundle
    with pytest.raises(SystemExit):
        parse_settings(TEXT, [], {"MEDVLM_BUNDLE": "/b", "MEDVLM_MAX_TEXTS": "many"})
    assert parse_settings("gateway", [], {}).event_loop == "uvloop"
    assert parse_settings("gateway", [], {"MEDVLM_EVENT_LOOP": "asyncio"}).event_loop == "asyncio"
    with pytest.raises(SystemExit, match="--event-loop"):
        parse_settings("gateway", ["--event-loop", "trio"], {})
    assert parse_settings(VISION, ["--bundle", "/b"], {}).engine_calls == 1
    assert parse_settings(VISION, ["--bundle", "/b"], {"MEDVLM_ENGINE_CALLS": "2"}).engine_calls == 2
    with pytest.raises(SystemExit, match="--engine-calls"):
        parse_settings(TEXT, ["--bundle", "/b", "--engine-calls", "0"], {})
    with pytest.raises(dataclasses_frozen_error()):
        settings.port = 1  # type: ignore[misc]


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_readme_settings_tables_are_current():
    """The services', the connection's and the page's tables, each right after its marker."""
    from scripts.settings_table import tables

    readme = (ROOT / "README.md").read_text()
    assert len(tables()) == 3
    for marker, table in tables().items():
        assert f"{marker}\n{table}\n\n" in readme, f"regenerate: python -m scripts.settings_table README.md ({marker})"
    assert "| `--max-images` | `MEDVLM_MAX_IMAGES` | `16` |" in readme  # the page's, from WebSettings
    assert "| `--token-file` | `MEDVLM_TOKEN_FILE` | `''` |" in readme  # the connection's
