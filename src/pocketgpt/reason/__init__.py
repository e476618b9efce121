"""Using a model the way "State of GPT" recommends: the `LM` protocol (lm.py) that reaches a local run
or any OpenAI-compatible server, and the strategies (strategies.py) that give a model tokens to think."""

from .lm import LM, Generation, LocalLM, OpenAILM, Request, Usage

__all__ = ["LM", "LocalLM", "OpenAILM", "Generation", "Request", "Usage"]
