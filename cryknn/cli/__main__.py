"""`python -m cryknn.cli`: the `cryknn` command."""

from cryknn.cli import main

main()
