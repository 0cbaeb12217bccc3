"""What `status`, the page and `/metrics` show: views over the state files, and the history series."""
