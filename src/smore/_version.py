"""The package version, in one place (read by the adapter files and reports it writes)."""

__version__ = "0.1.0"
