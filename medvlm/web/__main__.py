"""`python -m medvlm.web`: serve the page on loopback and log its URL. `--help` lists the settings."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence

import uvicorn

from medvlm.client._settings import add_connection_flags, settings_from
from medvlm.web.app import WebSettings, create_app

_OWN = {  # field -> (variable, help)
    "host": ("MEDVLM_WEB_HOST", "Address the page listens on: loopback only, since the page is plain HTTP "
                                "without authentication (reach it remotely through an SSH tunnel)."),
    "port": ("MEDVLM_WEB_PORT", "Port of the page; 0 picks a free one (the URL is logged)."),
    "max_image_bytes": ("MEDVLM_MAX_IMAGE_BYTES", "Largest uploaded image in bytes; the same variable sets "
                                                  "the gateway's limit, so both agree."),
    "max_images": ("MEDVLM_MAX_IMAGES", "Most images in one similarity upload (the gateway's limit)."),
    "max_image_pixels": ("MEDVLM_MAX_IMAGE_PIXELS", "Largest decoded image in pixels for the window preview "
                                                    "(the vision encoder's limit, same variable)."),
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, like the services' logs."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"timestamp": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
                           "level": record.levelname.lower(), "service": "web", "logger": record.name,
                           "event": record.getMessage()})


def parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, WebSettings]:
    parser = argparse.ArgumentParser(prog="python -m medvlm.web", description=__doc__)
    defaults = WebSettings()
    for field, (variable, help_text) in _OWN.items():
        default = getattr(defaults, field)
        raw = os.environ.get(variable)
        try:
            value = type(default)(raw) if raw else default
        except ValueError:
            parser.error(f"{variable}: not a {type(default).__name__}: {raw!r}")
        parser.add_argument("--" + field.replace("_", "-"), type=type(default), default=value,
                            help=f"{help_text} [{variable}; default {default!r}]")
    parser.add_argument("--log-level", default=os.environ.get("MEDVLM_LOG_LEVEL", "info"),
                        help="debug, info, warning or error [MEDVLM_LOG_LEVEL]")
    add_connection_flags(parser)
    args = parser.parse_args(argv)
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        parser.error(f"--host {args.host}: the page listens on loopback only (127.0.0.1 or ::1)")
    if args.max_image_bytes < 1 or args.max_images < 1 or args.max_image_pixels < 1:
        parser.error("--max-image-bytes, --max-images and --max-image-pixels must be positive")
    return args, WebSettings(host=args.host, port=args.port, max_image_bytes=args.max_image_bytes,
                             max_images=args.max_images, max_image_pixels=args.max_image_pixels)


def main(argv: Sequence[str] | None = None) -> int:
    args, settings = parse(argv)
    try:
        connection = settings_from(args)
    except ValueError as exc:
        print(f"medvlm.web: {exc}", file=sys.stderr)
        return 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler], force=True)

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
