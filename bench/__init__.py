"""Benchmark harness: in-process engines, the medvlm services and NVIDIA Triton under one load generator.

`python -m bench --help`. The package root imports nothing: bench.load, bench.triton_server and
bench.triton_client also run in a separate Triton environment that has neither torch nor the services.
"""
