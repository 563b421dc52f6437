"""`python -m cryknn.main`: train and evaluate the element predictor.

The tool is `cryknn.cli.train`; `cryknn train` runs it too.
"""

from cryknn.cli.train import run

if __name__ == "__main__":
    run()
