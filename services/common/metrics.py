"""Histogram buckets shared by every service's metrics (seconds)."""

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6)


def sample_sum(exposition: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`, in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for family in text_string_to_metric_families(exposition) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))
