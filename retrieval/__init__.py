"""Placeholder package: retrieval is built on the steering core."""
