"""Evaluation: accuracy against the budget of sequential forward passes."""

from .answers import answers_match, normalize_answer, parse_number
from .dataset import arithmetic_problems

__all__ = ["answers_match", "arithmetic_problems", "normalize_answer", "parse_number"]
