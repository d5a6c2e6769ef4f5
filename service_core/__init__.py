"""ntk-unlearn's engine: linearised networks in dual (α-space) form that forget on request.

Pure JAX and numpy; no web imports. The public surface is what this module exports.
"""

from .checkpoint import latest_version
from .config import ModelConfig, SolverConfig, TrainConfig
from .data import Dataset, load_dataset, load_digits, load_mnist, load_npz
from .engine import ForgetResult, InfluenceResult, Unlearner
from .errors import (
    AlreadyForgottenError,
    DatasetError,
    InvalidForgetSetError,
    InvalidInputError,
    ResourceError,
    SolverError,
    UnknownIdsError,
    UnlearnError,
)
from .models import Model, build_model
from .ntk import empirical_ntk
from .solvers import SolveInfo
from .state import ModelState

__all__ = [
    "AlreadyForgottenError",
    "Dataset",
    "DatasetError",
    "ForgetResult",
    "InfluenceResult",
    "InvalidForgetSetError",
    "InvalidInputError",
    "Model",
    "ModelConfig",
    "ModelState",
    "ResourceError",
    "SolveInfo",
    "SolverConfig",
    "SolverError",
    "TrainConfig",
    "UnknownIdsError",
    "UnlearnError",
    "Unlearner",
    "build_model",
    "empirical_ntk",
    "latest_version",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "load_npz",
]
