"""Datasets shared by the experiments: verified MNIST, distorted-MNIST generators, embeddings, synthetic sets."""

from triptych.data.mnist import DataUnavailableError, load_mnist, parse_idx

__all__ = ["DataUnavailableError", "load_mnist", "parse_idx"]
