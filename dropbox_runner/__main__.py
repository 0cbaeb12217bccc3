"""Entry point for `python -m dropbox_runner`.

Delegates to the click command line.
"""

from dropbox_runner.cli import main

main()
