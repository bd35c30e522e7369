"""Benchmarks that print figures: speed, memory, memory estimates."""
