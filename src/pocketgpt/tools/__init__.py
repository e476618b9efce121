"""Tools the model can call: each is a `toolloop.Tool`, a function of the call's arguments that returns text.

python.py    `python`: runs model-written code in a sandbox and returns what it printed
"""
