"""The test's life in a Locust process: the prompts and gRPC's threadpool at init (and the user class the host
picks), the per-request CSV and a progress line from the start, no new request once it is stopping, and
locust_run.json (times, options, requests recorded and abandoned) at the stop."""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import gevent
from locust import events
from locust.stats import CSV_STATS_INTERVAL_SEC

from loadtest.recorder import RECORDER
from services.judge.stories import sample_prompts

log = logging.getLogger("tokenmill.loadtest")


@dataclass
class Run:
    """This process's test: its record (locust_run.json), the prompt cycle, the progress logger, and whether it is
    stopping (see _stopping)."""

    info: dict = field(default_factory=dict)
    prompts: itertools.cycle | None = None
    progress: gevent.Greenlet | None = None
    stopping: bool = False

    def next_prompt(self) -> str:
        return next(self.prompts)


RUN = Run()


@events.init.add_listener
def _init(environment, **_kw) -> None:
    opts = environment.parsed_options
    RUN.prompts = itertools.cycle(sample_prompts(1500, opts.prompt_seed if opts else 0))
    # gRPC under gevent waits for every call's next event in a thread of gevent's hub threadpool (grpc's
    # grpc_gevent.pyx.pxi): one thread per call in flight. The pool's default of 10 threads makes the 11th call
    # wait for a free one, so with more users than that, stream messages and replies arrive seconds late (we
    # saw +40 s on 16 users) and every latency is inflated. Give each user its thread.
    users = (opts.num_users if opts else 0) or 0
    pool = gevent.get_hub().threadpool
    want = (opts.grpc_threads if opts and opts.grpc_threads else users + 16)
    if want > pool.maxsize:
        pool.maxsize = want
    # No user class named on the command line: the host decides (both would otherwise run side by side).
    classes = environment.user_classes
    if {c.__name__ for c in classes} == {"GrpcUser", "OpenAIUser"}:
        want = "OpenAIUser" if (environment.host or "").startswith(("http://", "https://")) else "GrpcUser"
        classes[:] = [c for c in classes if c.__name__ == want]
        log.info("no user class named; %s chosen from the host %r", want, environment.host)


@events.test_start.add_listener
def _test_start(environment, **_kw) -> None:
    opts = environment.parsed_options
    path = None
    if opts is not None and opts.requests_csv:
        path = Path(opts.requests_csv)
    elif opts is not None and getattr(opts, "csv_prefix", None):
        path = Path(f"{opts.csv_prefix}_requests.csv")
    if path is not None and RECORDER.file is None:
        RECORDER.open(path)
    RUN.stopping = False
    if opts is not None and opts.progress_interval > 0 and RUN.progress is None:
        RUN.progress = gevent.spawn(_progress, opts.progress_interval)
    RUN.info.clear()
    RUN.info.update(start_epoch_s=time.time(), host=environment.host,
                    user_classes=[c.__name__ for c in environment.user_classes])
    if opts is not None:
        for key in ("num_users", "spawn_rate", "run_time", "max_tokens", "temperature", "ignore_eos", "stream_ratio",
                    "wait_min", "wait_max", "request_timeout", "prompt_seed", "model_name"):
            RUN.info[key] = getattr(opts, key, None)


def _progress(interval: float) -> None:
    """One line every `interval` seconds (a one-hour headless run is otherwise silent with --only-summary)."""
    t0 = time.time()
    while True:
        gevent.sleep(interval)
        elapsed = time.time() - t0
        st = dict(sorted(RECORDER.statuses.items(), key=lambda kv: -kv[1]))
        ok = st.get("OK", 0)
        log.info("progress %.0f s: %d requests %s, %.0f OK/hour, %.1f output tokens/s, %d in flight",
                 elapsed, sum(st.values()), json.dumps(st), ok / elapsed * 3600, RECORDER.completion_tokens / elapsed,
                 len(RECORDER.inflight))


@events.test_stopping.add_listener
def _stopping(environment, **_kw) -> None:
    # Locust kills a user that waits between tasks; when the wait ends at that very moment, the user may start a
    # request the kill then abandons (the server answers it, nobody records it). So no new request from here on;
    # the ones in flight finish within --stop-timeout (or are abandoned and counted as such when it is 0).
    RUN.stopping = True
    if RUN.progress is not None:
        RUN.progress.kill(block=False)
        RUN.progress = None


@events.test_stop.add_listener
def _test_stop(environment, **_kw) -> None:
    RUN.info["stop_epoch_s"] = time.time()
    opts = environment.parsed_options
    if opts is not None and getattr(opts, "csv_prefix", None):
        # Locust writes its CSVs once a second and not again at exit, so requests of the last second would be
        # missing from locust_stats.csv. The users are all stopped here: give its writer one more turn.
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.25)
    RUN.info["requests_recorded"] = RECORDER.rows
    RUN.info["requests_abandoned"] = len(RECORDER.inflight)
    for o in RECORDER.inflight.values():
        log.warning("abandoned in flight at the end: %s %s sent %.1f s before", o.kind, o.request_id,
                    RUN.info["stop_epoch_s"] - o.epoch_s)
    if RECORDER.path is not None:
        stem = RECORDER.path.name.removesuffix(".csv").removesuffix("_requests")
        RECORDER.path.with_name(stem + "_run.json").write_text(json.dumps(RUN.info, indent=2) + "\n")
    RECORDER.close()


@events.quitting.add_listener
def _quitting(environment, **_kw) -> None:
    RECORDER.close()
