"""`python -m cryknn.predict`: score the element of every site of structure files.

The tool is `cryknn.cli.predict`; `cryknn predict` runs it too.
"""

from cryknn.cli.predict import run

if __name__ == "__main__":
    run()
