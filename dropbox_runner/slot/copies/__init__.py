"""Copies of one model (`replicas`, `executor: ray`): shard plans, the sharded run, Ray actors and
the lifeline that ends them with the daemon."""
