"""tda: scalable training-data attribution (TrackStar) in JAX."""

__version__ = "0.1.0"
