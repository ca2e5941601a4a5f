"""Placeholder package: steer_lang is built on the steering core."""
