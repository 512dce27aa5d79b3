"""Packaging for megatron_ki.

torch is a *range* so that GPU users keep the CUDA build they already have; install torch first and the
project with ``--no-build-isolation`` so pip never resolves another torch (see README).
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="megatron_ki",
    version="0.1.0",
    description="Megatron-style 3D-parallel pre-training with Knowledge Inheritance on DeepSpeed",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_ki", "megatron_ki.*"]),
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.14,<1",  # training/deepspeed_compat.py uses its internals (tested with 0.19)
        "sentencepiece>=0.2",
        "numpy>=1.24",
        "pybind11>=2.11",
        "ninja",
        "transformers>=4.40",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": [
            "pytest>=7.4",
            "pytest-timeout>=2.1",
            "ruff>=0.5",
            # tests/test_data_megatron_core.py reads our data with megatron-core's IndexedDataset. 0.16.1 is the
            # newest release for Python 3.10/3.11 (0.17+ need 3.12): a 2.6 MB wheel (cp310-cp313) needing only
            # torch>=2.6, numpy and packaging, so with torch >= 2.6 installed first it pulls no other torch.
            "megatron-core==0.16.1; python_version < '3.14'",
        ],
        "apex": ["apex"],
    },
)
