"""The agentic serving benchmark: trace generation, replay client, metrics, roofline, plot, CLI.

Entry point: ``python benchmarks/serving/agentic.py --help`` (or ``python -m benchmarks.serving.agentic``).
"""
