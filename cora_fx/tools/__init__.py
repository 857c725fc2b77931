"""Applications on top of the library: the ``cora-fx`` command, the MNIST demo, image datasets, plots and the
generator of docs/api.md."""
