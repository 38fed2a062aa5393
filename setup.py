"""megatron-lm2: pretraining LM2 (Large Memory Models) on Megatron-core."""

from setuptools import find_packages, setup

setup(
    name="megatron-lm2",
    version="0.1.0",
    description="Pretraining stack for LM2 (Large Memory Models, arXiv 2502.06049) on Megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_lm2", "megatron_lm2.*"]),
    include_package_data=True,
    package_data={"megatron_lm2": ["assets/*", "assets/*/*"]},
    install_requires=[
        # 0.16.1 is the newest release for Python 3.11; 0.19.x needs Python >= 3.12.
        "megatron-core>=0.16.1,<0.20",
        "torch>=2.6",
        "numpy",
        "psutil",  # needed by megatron.core.dist_checkpointing's async writer (undeclared there)
        "sentencepiece",
        "tokenizers",
        "safetensors",
        "tqdm",
        "pyarrow",
        "zstandard",
        "orjson",  # lm2-preprocess: jsonl rows parsed 2-4x faster than json (benchmarks/preprocess.md)
        "tensorboard",
        "matplotlib",
        "scipy",  # lm2-sweep fit: the Huber L(N, D) fit (L-BFGS-B)
        "transformers>=4.46",  # lm2-convert and the HF model (pure Python)
        "protobuf",  # transformers 4.x converts the exported SentencePiece tokenizer with it
    ],
    extras_require={
        # transformer-engine: the releases megatron-core 0.16.1 supports (compat.TRANSFORMER_ENGINE_RANGE)
        "gpu": ["transformer-engine[pytorch]>=2.9,<2.12", "nvidia-dali-cuda120"],
        "mpi": ["mpi4py", "mpich"],
        "hf": ["transformers>=4.46", "accelerate"],  # accelerate: device_map / big-model loading
        "wandb": ["wandb"],
        # lm2-preprocess --encoder auto: a fast BPE encoder, verified against tokenizers per input file
        "fast": ["fastokens>=0.3.5"],
        "dev": [
            "pytest",
            "pytest-timeout",
            "fastokens>=0.3.5",  # so the suite checks the fast encoder against the reference
            "mpi4py",
            "mpich",
            # CPU pipelines work without a GPU; the test checks DALI batches == default loader's.
            "nvidia-dali-cuda120; platform_system == 'Linux' and platform_machine == 'x86_64'",
        ],
    },
    entry_points={
        "console_scripts": [
            "lm2-train=megatron_lm2.train:main",
            "lm2-preprocess=megatron_lm2.preprocess.cli:main",
            "lm2-train-tokenizer=megatron_lm2.tokenizer.train:main",
            "lm2-convert=megatron_lm2.convert.cli:main",
            "lm2-eval=megatron_lm2.eval.cli:main",
            "lm2-flavors=megatron_lm2.flavors:main",
            "lm2-sweep=megatron_lm2.scaling.cli:main",
        ]
    },
)
