"""tda: TrackStar training-data attribution in JAX."""

import os

import setuptools

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "requirements.txt")) as f:
  install_requires = [l.strip() for l in f
                      if l.strip() and not l.startswith("#") and not l.startswith("pytest")]

setuptools.setup(
    name="tda",
    version="0.1.0",
    description="Scalable influence and fact tracing (TrackStar) in JAX/Flax.",
    packages=setuptools.find_packages(include=["tda", "tda.*"]),
    python_requires=">=3.11",
    install_requires=install_requires,
    extras_require={
        "test": ["pytest==9.0.3"],
        "viewer-test": ["playwright==1.64.1"],
        "tpu": ["jax[tpu]==0.10.2"],
    },
)
