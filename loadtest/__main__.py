"""`python -m loadtest ...` is `tokenmill loadtest ...`."""

from loadtest.cli import main

main()
