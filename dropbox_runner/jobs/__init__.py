"""A job's named operations: every change of its status, the one writer of its batch.json, and
retention, with the API's records of the jobs it made (retired with them). Above the queue and the
results it moves between."""
