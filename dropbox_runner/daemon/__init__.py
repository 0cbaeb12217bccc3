"""The daemon, one per root: its loop (loop), the snapshot of itself it writes for `status` (snapshot),
and what it says to systemd (systemd)."""
