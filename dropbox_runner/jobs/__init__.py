"""A job's named operations: every change of its status, the one writer of its batch.json, and
retention. Above the queue and the results it moves between."""
