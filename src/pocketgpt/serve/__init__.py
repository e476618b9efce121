"""Serving: an OpenAI-compatible HTTP API over the continuous-batching engine, and a chat page.

    worker.py   one engine per model, stepped by a thread of its own; requests cross over by queues
    protocol.py the OpenAI request shapes, their validation and limits, errors in OpenAI's shape
    api.py      the FastAPI app: /v1/models, /v1/chat/completions, /v1/completions, /tokenize,
                /detokenize, /health, /metrics, and the chat page at /
"""
