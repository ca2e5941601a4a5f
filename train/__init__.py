"""Placeholder package: train is built on the steering core."""
