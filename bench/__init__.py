"""tokenmill benchmarks: `tokenmill bench <name>` (see bench/cli.py)."""
