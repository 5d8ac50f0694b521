"""Benchmarks of streamer against the floor (a bare LISTEN) and the naive design (a LISTEN
connection per stream). Run with `make bench`; see bench/README.md."""
