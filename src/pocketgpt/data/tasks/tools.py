"""The tools a task's "tool" rendering calls, and the chat messages that record a call.

Training data and inference agree on what a tool returns: the tool loop (toolloop.py) answers a
`calculator` or `search` call with these same functions (`task_tools`).

    calculator("123*45")           # '5535'
    search(world, "Dorin")         # the text of the best-matching encyclopedia article
    use_calculator("123*45")       # [assistant message with tool_calls, tool message '5535']
"""

from __future__ import annotations

import json

from ..world import World
from .base import decimal_string
from .expr import evaluate


def calculator(expression: str) -> str:
    """Evaluate + - * / and parentheses exactly; non-integers are shown to 6 decimals."""
    try:
        return decimal_string(evaluate(expression), 6, strip=True)
    except ValueError as error:
        return f"error: {error}"


def search(world: World, query: str) -> str:
    """The text of the world's best retrieval article for the query."""
    hits = world.search(query, k=1)
    return hits[0]["text"] if hits else "no results"


# What each tool takes, as OpenAI function specs: sent with a request so a model (or a server's
# constrained decoder) knows the call's shape.
SPECS = {
    "calculator": {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression exactly (+ - * / and parentheses).",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]}}},
    "search": {"type": "function", "function": {
        "name": "search", "description": "Look up an entity (a city, country, person...) in the encyclopedia.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}},
}


def task_tools(world: World) -> dict:
    """The tools the tool renderings use, by name, for generate_with_tools (toolloop.py)."""
    return {"calculator": calculator, "search": lambda query: search(world, query)}


def tool_call(name: str, **arguments: str) -> dict:
    """An assistant message that calls one tool (OpenAI format: arguments as a JSON string)."""
    function = {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}
    return {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": function}]}


def tool_result(name: str, content: str) -> dict:
    return {"role": "tool", "name": name, "content": content}


def use_calculator(expression: str) -> list[dict]:
    return [tool_call("calculator", expression=expression), tool_result("calculator", calculator(expression))]


def use_search(world: World, query: str) -> list[dict]:
    return [tool_call("search", query=query), tool_result("search", search(world, query))]
