"""One log format for every service: time, level, service, message."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(service: str) -> logging.Logger:
    level = os.environ.get("TOKENMILL_LOG_LEVEL", "INFO").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return logging.getLogger(f"tokenmill.{service}")
