"""The Locust options of tokenmill's users (Locust's custom arguments) and the think time they set."""

from __future__ import annotations

import random

from locust import User, events


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--max-tokens", type=int, default=256, help="max_tokens of every request.")
    parser.add_argument("--temperature", type=float, default=0.7, help="Sampling temperature (0 = greedy).")
    parser.add_argument("--ignore-eos", action="store_true", default=False,
                        help="Generate exactly max_tokens (tokenmill and vLLM honour it).")
    parser.add_argument("--stream-ratio", type=float, default=0.5,
                        help="Share of requests that stream (GenerateStream / SSE); the rest are unary.")
    parser.add_argument("--wait-min", type=float, default=0.0, help="Least think time between a user's requests, s.")
    parser.add_argument("--wait-max", type=float, default=0.0, help="Most think time between a user's requests, s.")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="Deadline of one request, s.")
    parser.add_argument("--prompt-seed", type=int, default=0, help="Seed of the prompt order.")
    parser.add_argument("--model-name", default="",
                        help="Model field of requests (HTTP: default the first of /v1/models).")
    parser.add_argument("--api-key", default="", is_secret=True, env_var="TOKENMILL_API_KEY",
                        help="Sent as 'authorization: Bearer <key>'.")
    parser.add_argument("--requests-csv", default="", help="Per-request CSV (default <--csv prefix>_requests.csv).")
    parser.add_argument("--channels", type=int, default=0,
                        help="gRPC: 0 = one channel (connection) per user; N = users share N channels.")
    parser.add_argument("--grpc-threads", type=int, default=0,
                        help="gRPC: size of gevent's threadpool that gRPC waits in (0 = users + 16).")
    parser.add_argument("--progress-interval", type=float, default=60.0,
                        help="Log one progress line this often, s (0 = never).")


def think_time(user: User) -> float:
    """A user's wait between two requests: uniform in --wait-min..--wait-max."""
    opts = user.environment.parsed_options
    lo, hi = (opts.wait_min, opts.wait_max) if opts is not None else (0.0, 0.0)
    return random.uniform(lo, max(lo, hi))
