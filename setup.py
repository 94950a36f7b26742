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
    package_data={"tda": ["viewer_template.html"]},
    extras_require={
        # gcp-storage-emulator: the local GCS the gs:// workdir tests start (tests/gcs_emulator.py).
        "test": ["pytest==9.0.3", "gcp-storage-emulator==2026.7.19"],
        # Browser tests of the results viewer (Debian's chromium, never a downloaded browser).
        "viewer-test": ["playwright==1.64.1"],
        # Ahead-of-time compilation for TPU topologies (tda.compile_check); libtpu pinned by jax.
        "tpu": ["jax[tpu]==0.10.2"],
        # The dense baseline runs in the core install (tda.sentence_encoder, JAX). This
        # extra adds the reference implementation its test compares against.
        # Install `torch==2.13.0` (the CPU build) first.
        "dense": ["torch==2.13.0", "sentence-transformers==6.2.0", "transformers==5.24.0",
                  "huggingface-hub==2.4.0", "scikit-learn==1.9.1"],
        # Side-by-side benchmark against bergson (scripts/bench_vs_bergson.py); torch CPU build.
        # bergson itself goes in with --no-deps (README): it declares torchvision and
        # torchaudio, whose registry wheels do not load against the CPU build of torch 2.13
        # (`operator torchvision::nms does not exist`, which then breaks `import
        # transformers`) and which it never imports. These are the dependencies it imports.
        "bench": ["torch==2.13.0", "transformers==5.24.0", "datasets==5.2.0",
                  "huggingface-hub==2.4.0", "accelerate==1.15.0", "peft==0.21.2",
                  "jaxtyping==0.3.11", "natsort==8.4.0", "petname==2.9",
                  "simple-parsing==0.1.9", "torchopt==0.7.3"],
    },
)
