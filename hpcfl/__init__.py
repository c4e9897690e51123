"""hpcfl: data-parallel and federated MLP training on MNIST with MPI."""
__version__ = "0.1.0"
