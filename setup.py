from setuptools import find_packages, setup

setup(
    name="tlt_jax",
    version="0.1.0",
    description="Reasoning-RL training of LLMs in JAX with lossless, adaptive speculative rollouts",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tlt_jax", "tlt_jax.*", "kernels_pallas", "kernels_pallas.*", "configs"]),
    install_requires=[
        "jax>=0.10.2,<0.12",
        "flax>=0.12.0,<0.14",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "chex>=0.1.90,<0.2",
        "ml-collections>=1.0,<2",
        "numpy>=1.26",
        "ml-dtypes>=0.5",
        "transformers>=5.0,<6",
        "tokenizers>=0.21",
        "jinja2>=3.1",  # chat templates
        "datasets>=4.0,<6",
        "gguf>=0.17,<1",
        "math-verify>=0.8,<1",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "accelerate>=1.0", "import-linter>=2.1",
                 "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29"],  # nbclient runs paper_figures.ipynb
        # compile for TPU on any host: the libtpu build of this JAX gives compile-only TPU devices (tests: tpu_aot)
        "tpu": ["libtpu==0.0.42.*"],
        # compile the GPU kernel's Triton IR for sm_90 offline (tests: cuda_lower)
        "cuda": ["triton==3.9.0"],
    },
    entry_points={
        "console_scripts": [
            "tlt-aot=tlt_jax.cli.aot:main",
            "tlt-eval=tlt_jax.cli.evaluate:main",
            "tlt-export-drafter=tlt_jax.cli.export_drafter:main",
            "tlt-figures=tlt_jax.bench.figures:main",
            "tlt-generate=tlt_jax.cli.generate:main",
            "tlt-inspect=tlt_jax.cli.inspect_model:main",
            "tlt-launch=tlt_jax.cli.launch:main",
            "tlt-train=tlt_jax.cli.train:main",
            "tlt-warmup=tlt_jax.cli.warmup:main",
        ],
    },
)
