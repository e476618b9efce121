"""pocketgpt: the whole State-of-GPT pipeline, small enough to run on a laptop CPU."""

__version__ = "0.1.0"
