"""One-off investigations behind bench/FINDINGS.md: run by hand, never by `make bench`."""
