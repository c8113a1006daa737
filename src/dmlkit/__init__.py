"""dmlkit: a staged, cached pipeline for deep-metric-learning competitions."""

__version__ = "0.1.0"
