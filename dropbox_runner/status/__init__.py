"""What `status`, the page and `/metrics` show: views over the state files (view), their text
(render), and the history series (history)."""
