"""Benchmarks: each writes its numbers as JSON, prints a table and can draw a plot."""
