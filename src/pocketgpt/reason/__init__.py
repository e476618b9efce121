"""Using a model the way "State of GPT" recommends.

    lm.py          the `LM` protocol: a local run (our engine) or any OpenAI-compatible server
    vote.py        an answer and how it was reached; the majority vote of self-consistency
    strategies.py  the registry: direct, cot, self_consistency, reflection, tot, react, constrained
    tot.py         Tree of Thoughts on the Game of 24 (the model proposes and values positions)
    react.py       ReAct: thought, tool call, observation; self-consistency when the steps run out
    reflection.py  the model checks its own answer and tries again
    matrix.py      task x strategy with intervals and cost (`pocketgpt eval RUN --matrix`)
"""

from .lm import LM, Generation, LocalLM, OpenAILM, Request, Usage

__all__ = ["LM", "LocalLM", "OpenAILM", "Generation", "Request", "Usage"]
