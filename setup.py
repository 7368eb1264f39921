import sys

from setuptools import setup

requires = [
    "torch>=2.4",
    "deepspeed>=0.15",
    "numpy",
    "tokenizers>=0.19",
    "safetensors",
    "tqdm",
]
if sys.platform.startswith("linux"):
    # The CPU wheel of torch does not bring Triton; the kernels (and their CPU interpreter) need it.
    requires.append("triton>=3.0")

setup(
    name="fastroberta",
    version="0.1.0",
    description="RoBERTa masked-LM pretraining with fused Triton kernels under DeepSpeed",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # fastroberta/kernels/ imports nothing else of fastroberta: usable on its own as fastroberta.kernels.
    packages=["fastroberta", "fastroberta.kernels", "fastroberta.data", "fastroberta.training", "fastroberta.tasks"],
    package_data={"fastroberta": ["corpus/*.txt"]},
    install_requires=requires,
    extras_require={
        # fastroberta.apply_kernels (hf_kernels.py) patches transformers' own encoders; it needs the 5.x line,
        # whose BERT-family models dispatch attention and build masks through registries it can join.
        "transformers": ["transformers>=5.0"],
        # accelerate: transformers.Trainer needs it (tests/test_hf_kernels.py runs a few Trainer steps).
        # matplotlib: loss.png at the end of a run (the README's set-up installs this extra).
        "test": ["pytest", "pytest-benchmark", "transformers>=4.40", "accelerate>=1.1", "matplotlib"],
        "bench": ["pytest-benchmark", "transformers>=4.40", "matplotlib"],
        # loss.png alone; without matplotlib a run draws nothing, says how to get it and carries on.
        "plot": ["matplotlib"],
    },
    entry_points={
        "console_scripts": [
            "fastroberta-train = fastroberta.train:main",
            "fastroberta-finetune = fastroberta.finetune:main",
            "fastroberta-plot = fastroberta.plot:main",
        ]
    },
    license="Apache-2.0",
)
