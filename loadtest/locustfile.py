"""Locust users for tokenmill: gRPC (the gateway's tokenmill.v1.Inference) and HTTP (any OpenAI-compatible server).

    locust -f loadtest/locustfile.py --headless -u 8 -r 2 -t 1m --csv out/locust --host 127.0.0.1:50051 GrpcUser
    locust -f loadtest/locustfile.py --headless -u 8 -r 2 -t 1m --csv out/locust --host http://127.0.0.1:8000 OpenAIUser

(`tokenmill loadtest` runs this for you and writes the report.) With no user class named, the host picks one:
http(s):// → OpenAIUser, anything else → GrpcUser.

Each request is one prompt of the children's story set (services/judge/stories.py) sent as a chat message, either
unary (`Generate` / non-streaming chat completion) or streaming (`GenerateStream` / SSE), the share set by
--stream-ratio. Locust entries (the same names for both protocols; request type `grpc` or `http`):

  Generate              end-to-end time of a unary call
  GenerateStream        end-to-end time of a streaming call
  GenerateStream TTFT   time to the first streamed token (only when one arrived)

A failure is named by its status alone, so the failure table groups them: RESOURCE_EXHAUSTED, UNAVAILABLE,
DEADLINE_EXCEEDED, ... for gRPC; `HTTP 429 rate_limit_error`, TIMEOUT, CONNECTION_ERROR ... for HTTP. The
details go to the per-request CSV (`<--csv prefix>_requests.csv`, or --requests-csv): one row per finished
request, written by the same code that fires the Locust event, so the two always agree.

This file gathers the pieces: options.py (the custom options), recorder.py (the per-request record), hooks.py (the
test's life: start, progress, stop), grpc_user.py and openai_user.py (the two users).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout: `services` and `loadtest` live next to this folder
    sys.path.insert(0, str(ROOT))

from loadtest import hooks, options  # noqa: E402, F401  (their event listeners: the test's life, the options)
from loadtest.grpc_user import GrpcUser  # noqa: E402, F401  (Locust runs the User classes it finds here)
from loadtest.openai_user import OpenAIUser  # noqa: E402, F401
