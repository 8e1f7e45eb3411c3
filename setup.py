"""hyperprompt-jax: HyperPrompt, SPoT and SMoP on a t5x-compatible T5 in JAX/Flax."""

import setuptools

setuptools.setup(
    name="hyperprompt-jax",
    version="0.1.0",
    description=(
        "HyperPrompt, SPoT and SMoP prompt-based task conditioning on a "
        "t5x-compatible T5 encoder-decoder in JAX/Flax."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # `tasks/` and `gin/` live at the top level of the repository (the design
    # card's layout) and install as `hyperprompt_jax.tasks` / `hyperprompt_jax.gin`.
    packages=[
        "hyperprompt_jax",
        "hyperprompt_jax.spot",
        "hyperprompt_jax.tasks",
        "hyperprompt_jax.gin",
    ],
    package_dir={
        "hyperprompt_jax": "hyperprompt_jax",
        "hyperprompt_jax.tasks": "tasks",
        "hyperprompt_jax.gin": "gin",
    },
    # `gin/` is deliberately not a regular package (see gin_utils._package_gin_dir).
    package_data={"hyperprompt_jax.gin": ["*.gin", "**/*.gin"]},
    include_package_data=True,
    install_requires=[
        "jax>=0.4.30",
        "flax>=0.8",
        "optax>=0.2",
        "orbax-checkpoint>=0.6",
        "seqio>=0.0.19",
        "tensorflow-cpu>=2.16; platform_machine=='x86_64'",
        "tensorflow-datasets>=4.9",
        # tensorflow-datasets 4.9.10 imports it (download_and_prepare) but declares it
        # only for Python < 3.9; `task_registry prepare` fails without it.
        "importlib_resources",
        "gin-config>=0.5",
        "sentencepiece",
        "tensorstore",
        "clu>=0.0.10",
        "tensorboard",  # clu's metric writers need it; tensorflow does not pull it in.
        "msgpack",
        "numpy",
        "safetensors",
        "matplotlib",
        "scipy",
        "tqdm",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-xdist",
            # Independent references. torch is pinned to the CPU build on disk.
            "torch==2.13.0",
            "transformers",
            "peft",
        ],
    },
)
