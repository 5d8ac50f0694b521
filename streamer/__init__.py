"""Stream Postgres row changes to browsers as Server-Sent Events."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("streamer")  # pyproject.toml's, the one place it is set
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "unknown"
