"""cryknn: predict the element of every atom in a crystal from its exact periodic k-NN distances."""

__version__ = "0.1.0"
