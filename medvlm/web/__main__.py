"""`python -m medvlm.web`: serve the page on loopback and log its URL. `--help` lists the settings."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import socket
import sys
from collections.abc import Sequence

import uvicorn

from medvlm.client._settings import add_connection_flags, settings_from
from medvlm.settings import SettingError, add_flags
from medvlm.settings import parse as parse_settings
from medvlm.web.app import WebSettings, create_app

class JsonFormatter(logging.Formatter):
    """One JSON object per line, like the services' logs."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"timestamp": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
                           "level": record.levelname.lower(), "service": "web", "logger": record.name,
                           "event": record.getMessage()})


def parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, WebSettings]:
    """The page's settings and the namespace the connection's flags are in: flags, then MEDVLM_*
    variables, then defaults."""
    parser = argparse.ArgumentParser(prog="python -m medvlm.web", description=__doc__)
    add_flags(parser, WebSettings)
    add_connection_flags(parser)
    args = parser.parse_args(argv)
    try:
        settings = parse_settings(WebSettings, args)
    except SettingError as exc:
        parser.error(str(exc))
    try:
        loopback = settings.host == "localhost" or ipaddress.ip_address(settings.host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        parser.error(f"--host {settings.host}: the page listens on loopback only (127.0.0.1 or ::1)")
    if settings.max_image_bytes < 1 or settings.max_images < 1 or settings.max_image_pixels < 1:
        parser.error("--max-image-bytes, --max-images and --max-image-pixels must be positive")
    return args, settings


def main(argv: Sequence[str] | None = None) -> int:
    args, settings = parse(argv)
    try:
        connection = settings_from(args)
    except ValueError as exc:
        print(f"medvlm.web: {exc}", file=sys.stderr)
        return 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)

    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host.strip("[]"), settings.port))
    sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them, so the URL works at once
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if family == socket.AF_INET6 else host}:{port}/"
    logging.getLogger("medvlm.web").info("listening on %s, gateway %s", url, connection.target)
    # access_log off: our own middleware logs method, path, status and latency, nothing else.
    config = uvicorn.Config(create_app(connection, settings), log_config=None, access_log=False, ws="none",
                            lifespan="on", timeout_graceful_shutdown=5, server_header=False)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: uvicorn has shut down by now
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
