"""fastslow: continual post-training on two timescales, with drift from the base model measured."""

__version__ = "0.1.0"
