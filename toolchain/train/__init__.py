"""The reference trainer: a TOML config → a PyTorch model trained on real data, tracked in MLflow
and registered as an ONNX model version that ``edgesmith build models:/NAME/VERSION`` compiles.

``python -m edgesmith.toolchain.train CONFIG`` is ``edgesmith train CONFIG``; launched by
``torchrun --nproc-per-node N`` it trains data-parallel (DDP, gloo), rank 0 logging and registering.
"""

from edgesmith.toolchain.train.config import TrainConfig, load_config
from edgesmith.toolchain.train.run import TrainSummary, train_and_register
from edgesmith.toolchain.train.search import run_search

__all__ = ["TrainConfig", "TrainSummary", "load_config", "run_search", "train_and_register"]
