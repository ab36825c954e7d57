"""Datasets shared by the experiments: verified MNIST, distorted-MNIST generators, embeddings, synthetic sets."""

from triptych.data.distorted_mnist import (
    CANVAS_SIZE,
    DISTORTIONS,
    DistortedSet,
    distort,
    fixed_test_set,
    fixed_validation_set,
    split_train_validation,
    training_batches,
)
from triptych.data.mnist import DataUnavailableError, load_mnist, parse_idx
from triptych.data.streams import (
    OnlineStream,
    linear_regression_stream,
    logistic_regression_stream,
    mnist_stream,
)
from triptych.data.vectors import MipsSet, gaussian_mips, load_glove, synthetic_recommender

__all__ = ["CANVAS_SIZE", "DISTORTIONS", "DataUnavailableError", "DistortedSet", "distort", "fixed_test_set",
           "fixed_validation_set", "split_train_validation", "training_batches",
           "OnlineStream", "linear_regression_stream", "load_mnist",
           "logistic_regression_stream", "mnist_stream", "parse_idx",
           "MipsSet", "gaussian_mips", "load_glove", "synthetic_recommender"]
