"""Engines and the model process: everything that may import vLLM or torch lives in this package.

The daemon only starts `engine.worker` as a child process and talks to it through pipes.
"""
