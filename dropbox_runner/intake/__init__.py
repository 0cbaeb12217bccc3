"""Intake: find complete drops in the inbox, claim them into state/, and record them as jobs.

`scanner` decides when a file is complete, `claim` takes it, `watcher` wakes the daemon up.
"""
