"""`python -m cryknn.featurize`: exact periodic k-NN distances of structure files, as .npz.

The tool is `cryknn.cli.featurize`; `cryknn featurize` runs it too.
"""

from cryknn.cli.featurize import run

if __name__ == "__main__":
    run()
