"""tda: scalable training-data attribution (TrackStar) in JAX."""

from tda import host_memory as _host_memory

# Before jax, TensorFlow or torch start threads: malloc keeps XLA:CPU's per-call
# temporaries resident (tda.host_memory; TDA_HOST_MALLOC=system opts out).
_host_memory.retain_freed_memory()

__version__ = "0.1.0"
