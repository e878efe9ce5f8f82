"""Evaluation: accuracy against the budget of sequential forward passes."""

from .answers import answers_match, grade, normalize_answer, parse_number
from .dataset import arithmetic_problems
from .loaders import load_problems
from .runner import MODES, RunSpec, budgets_job, run_budgets
from .stats import majority, wilson

__all__ = ["MODES", "RunSpec", "answers_match", "arithmetic_problems", "budgets_job", "grade", "load_problems",
           "majority", "normalize_answer", "parse_number", "run_budgets", "wilson"]
