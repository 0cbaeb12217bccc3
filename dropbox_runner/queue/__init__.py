"""The queue: journal entries, their lifecycle, the catalog of jobs, the scheduler's order, and
the job's way from claimed to archived."""
