"""One rank's device state: the model's slice, the paged K/V pool, CUDA graphs, sampling."""

from .model_runner import ModelRunner

__all__ = ["ModelRunner"]
