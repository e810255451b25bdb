"""Measure: timing, memory, NVML, the environment, and analytic costs (FLOPs, KV bytes, capacity).

Modules here measure and return values; they never print.
"""
