"""Histogram buckets shared by every service's metrics (seconds), and the /metrics exposition every service serves."""

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
# The classic text format, whatever the scraper asks for: prometheus_client's OpenMetrics answer (which a
# Prometheus 2 asks for first) writes the sample lines of a name with a colon -- all of ours, `vllm:*` and
# `tokenmill:*` -- with underscores (prometheus/client_python#1177), so no dashboard query or rule finds them.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def exposition() -> bytes:
    """This process's metrics in the text format (names as declared, colons kept)."""
    from prometheus_client import generate_latest

    return generate_latest()


def start_http_server(port: int, host: str) -> None:
    """Serve GET /metrics (any path) on host:port from a daemon thread; OSError when the port is taken."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = exposition()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # one line per scrape is noise
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()


def sample_sum(exposition: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`, in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for family in text_string_to_metric_families(exposition) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))
