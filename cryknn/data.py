"""`python -m cryknn.data`: build a dataset of structures, or show its element statistics.

The tool is `cryknn.cli.data`; `cryknn data` runs it too.
"""

from cryknn.cli.data import run

if __name__ == "__main__":
    run()
