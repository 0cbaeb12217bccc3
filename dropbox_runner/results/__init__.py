"""Results: the append-only result log with its commit marker, and publishing to the outbox.

The log is written by the model process; publishing reads it in the daemon.
"""
