"""forgetcheck: measure what full fine-tuning makes a model forget, before it ships."""

__version__ = "0.1.0"
