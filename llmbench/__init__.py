"""llmbench: run, optimize, quantize, evaluate and benchmark LLM text generation on CPUs."""

__version__ = "0.1.0"
