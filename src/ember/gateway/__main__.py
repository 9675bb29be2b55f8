"""`python -m ember.gateway`: the gateway's three listeners, configured by EMBER_* settings."""

from __future__ import annotations

import asyncio
import logging
import sys

from ember.gateway.server import serve
from ember.settings import SettingsError, get_settings


def main() -> int:
    try:
        settings = get_settings()
    except SettingsError as exc:
        print(f"ember gateway: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(serve(settings))
    except OSError as exc:
        logging.getLogger("ember.gateway").error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
