"""Thin Prefect task wrappers around the library's stage functions; they pass paths, not data."""
