"""A code-review agent in the class-based style, with state and hooks.

python examples/code_review_agent.py [ws://127.0.0.1:8765]
"""

from __future__ import annotations

import ast
import logging
import sys
from typing import Any

from agentmesh import Agent, TaskContext, capability


class CodeReviewer(Agent):
    """Reviews Python snippets with a few static checks."""

    name = "code-reviewer"
    description = "Static review of Python code"

    def __init__(self, max_line: int = 100) -> None:
        super().__init__()
        self.max_line = max_line
        self.reviews = 0

    async def setup(self) -> None:
        logging.info("reviewer ready (max line %d)", self.max_line)

    async def teardown(self) -> None:
        logging.info("reviewer done after %d reviews", self.reviews)

    @capability("code-review")
    async def review(self, code: str, ctx: TaskContext) -> dict[str, Any]:
        """Review a Python snippet: syntax, long lines, bare excepts, missing docstrings.

        Args:
            code: the Python source to review
        """
        self.reviews += 1
        findings: list[str] = []
        for number, line in enumerate(code.splitlines(), 1):
            if len(line) > self.max_line:
                findings.append(f"line {number}: longer than {self.max_line} characters")
        try:
            tree = ast.parse(code)
        except SyntaxError as exc:
            return {"ok": False, "findings": [f"line {exc.lineno}: syntax error: {exc.msg}"]}
        await ctx.progress(0.5, "parsed")
        for node in ast.walk(tree):
            if isinstance(node, ast.ExceptHandler) and node.type is None:
                findings.append(f"line {node.lineno}: bare except")
            is_function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            if is_function and ast.get_docstring(node) is None:
                findings.append(f"line {node.lineno}: {node.name}() has no docstring")
        return {"ok": not findings, "findings": findings, "review": self.reviews}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    CodeReviewer().run(sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:8765")
