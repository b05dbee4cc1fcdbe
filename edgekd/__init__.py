"""edgekd: distill medical-imaging classifiers into small, verified models for CPU edge devices."""

__version__ = "0.1.0"
