"""Settings: flags beat MEDVLM_* variables beat defaults, parsed once into a frozen object; the
README's settings table is generated from them."""

from __future__ import annotations

import pytest

from conftest import ROOT
from services.plumbing.settings import TEXT, VISION, parse_settings


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


def test_readme_settings_table_is_current():
    from scripts.settings_table import markdown_table

    assert markdown_table() in (ROOT / "README.md").read_text(), (
        "regenerate: python -m scripts.settings_table README.md")
