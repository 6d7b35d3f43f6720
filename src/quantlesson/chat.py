"""Calibration text in a chat model's own format, built offline: conversations rendered with its chat template.

An *Instruct* model sees its input wrapped in a chat template (role markers, special tokens). Calibration on
plain text never shows GPTQ those tokens and positions. These conversations come from the Python standard
library that ships with Python, so they need no download: the user asks what a documented function does, the
assistant answers with the first paragraph of its docstring. The calibration and evaluation splits use different
modules (:func:`quantlesson.data.embedded_documents`).
"""

from __future__ import annotations

import ast

import torch

from quantlesson import data
from quantlesson.errors import LessonError


def documented_functions(split: str) -> list[tuple[str, str]]:
    """``(qualified name, first docstring paragraph)`` of every public documented function in one split's modules."""
    found = []
    for name, text in data.embedded_documents(split).items():
        try:
            tree = ast.parse(text)
        except SyntaxError:  # a module written for another Python version
            continue
        module = name.removesuffix(".py").replace("/", ".")
        for node in ast.walk(tree):
            docstring = ast.get_docstring(node) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
            if docstring and not node.name.startswith("_"):
                found.append((f"{module}.{node.name}", docstring.split("\n\n")[0].strip()))
    return found


def conversations(split: str) -> list[list[dict[str, str]]]:
    """Two-turn conversations, one per documented function: a question, and the docstring as the answer."""
    return [
        [{"role": "user", "content": f"What does `{name}` do in Python's standard library?"},
         {"role": "assistant", "content": answer}]
        for name, answer in documented_functions(split)
    ]  # fmt: skip


def chat_tokens(tokenizer, n: int, seq_len: int, split: str = "calibration") -> torch.Tensor:
    """``[n, seq_len]`` token windows of the split's conversations, each rendered with the tokenizer's chat template.

    A tokenizer without a chat template (a base model, or the embedded model) is a clear error: use
    :func:`quantlesson.data.calibration_tokens` for it.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise LessonError("This tokenizer has no chat template (a base model?): calibrate it on plain text with "
                          "data.calibration_tokens, or load the model's Instruct version.")
    ids = []
    for conversation in conversations(split):
        ids += tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False), add_special_tokens=False).input_ids
        if len(ids) >= n * seq_len:
            return torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    raise LessonError(f"The {split} conversations hold {len(ids)} tokens, fewer than {n} x {seq_len}: ask for fewer.")
