"""The dtype names the API and the command line take, each with its torch dtype's name: pure data,
so that parsing a command line imports no torch."""

from __future__ import annotations

DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}
