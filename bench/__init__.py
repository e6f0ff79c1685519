"""tokenmill benchmarks: `tokenmill bench <name>` (see bench/cli.py)."""

import services  # noqa: F401  (the OpenMP wait policy, set before torch loads libgomp)
