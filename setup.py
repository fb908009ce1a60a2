"""k25: a JAX/Flax reproduction of the Kimi K2.5 training system."""

from setuptools import find_packages, setup

HF = [
    "torch==2.13.0",  # CPU build; a newer or unpinned torch pulls several GB of CUDA wheels
    "transformers==5.23.0",  # the numerical reference the parity tests pin to
    "safetensors>=0.4",
]

setup(
    name="k25",
    version="0.1.0",
    description="Kimi K2.5 training system in JAX/Flax: MLA+MoE, MoonViT-3D, MuonClip, PP/EP/ZeRO-1",
    packages=find_packages(include=["k25", "k25.*", "experiments", "experiments.*"]),
    python_requires=">=3.11",
    install_requires=[
        # pinned: the parallel code and NNX state handling follow these releases' APIs
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "grain==0.2.18",
        "ml-collections>=1.0",
        "chex>=0.1.90",
        "absl-py>=2.1",
        "numpy",
        "tqdm",
        "tensorboardX",
        "pyarrow",
        "array-record",
        "tokenizers",  # k25.data.tokenizer: HF tokenizer.json loader
        "sentencepiece",  # k25.data.tokenizer: .model loader
        "tiktoken",  # k25.data.tokenizer: fast path for tiktoken BPE files (pulls in `regex`)
        "pillow",  # k25.data.vision: drawing the procedural images, rendered text (Pillow's bundled font)
        "scikit-learn",  # k25.data.vision: the bundled 8x8 digits data set
        # post-training: the server, model clients, rewards, the swarm's tasks, evaluation, plots
        "fastapi>=0.115",  # experiments.serve: the OpenAI-compatible server
        "uvicorn>=0.30",
        "httpx>=0.27",
        "openai>=1.40",  # k25.infer.client: any OpenAI-compatible endpoint (and the server tests)
        "scipy>=1.11",  # Hungarian matching in the grounding rewards; scipy.ndimage in the Python tool
        "shapely>=2.0",  # polygon IoU reward
        "rapidfuzz>=3.0",  # OCR edit-distance reward
        "math-verify>=0.7",  # math answer equivalence reward
        "sympy",
        "bm25s>=0.2",  # the swarm's offline search tool
        "inspect-ai>=0.3.200",  # evaluation and safety harness
        "inspect-evals>=0.26",  # k25.eval.safety: strong_reject / xstest / agentharm / cyberseceval / bbq when online
        "matplotlib>=3.8",  # experiment plots
        "jsonschema>=4.0",  # k25.tools: validating the model's tool-call arguments against each tool's schema
    ],
    entry_points={"inspect_ai": ["k25 = k25.eval._registry"]},  # `--model k25/PATH` (inspect's extension API)
    package_data={"k25.eval.safety": ["data/*.jsonl"]},
    extras_require={
        "hf": HF,
        "notebooks": ["nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"],
        "test": HF + ["pytest>=8", "pytest-xdist", "pytest-timeout", "ruff", "nbclient>=0.10", "nbformat>=5.10",
                      "ipykernel>=6.29",
                      "compressed-tensors==0.20.0",  # tests/hf: the independent INT4 packer (pack_to_int32)
                      "accelerate>=1.0"],  # transformers needs it to dequantize FP8 / INT4 references
    },
)
