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
        "test": ["pytest>=7.4", "pytest-timeout>=2.1", "ruff>=0.5"],
        "apex": ["apex"],
    },
)
