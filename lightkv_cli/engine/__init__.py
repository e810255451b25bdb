"""The sweep engine: plan the runs, prepare the inputs, run and measure them, resume; the benchmark.

What ``lightkv profile``, ``lightkv sweep`` and ``lightkv check --profile`` share. Nothing here prints.
"""
