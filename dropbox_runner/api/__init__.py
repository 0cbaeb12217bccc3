"""The OpenAI-compatible Batch API and the status page: a thin HTTP layer over the same root.

It never runs models: uploads become drops in the inbox, every answer is read from state/ and outbox/.
"""
