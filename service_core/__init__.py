"""ntk-unlearn's engine: linearised networks in dual (α-space) form that forget on request.

Pure JAX and numpy; no web imports. The public surface is what this module exports.
"""

from .checkpoint import latest_version
from .config import (
    DTYPES,
    LOSSES,
    MODEL_KINDS,
    SOLVER_ALIASES,
    SOLVER_METHODS,
    ModelConfig,
    SolverConfig,
    TrainConfig,
)
from .data import Dataset, load_dataset, load_digits, load_mnist, load_npz
from .deletion import ForgetResult
from .engine import InfluenceResult, Unlearner
from .errors import (
    AlreadyForgottenError,
    ComputationCancelled,
    DatasetError,
    InvalidForgetSetError,
    InvalidInputError,
    RefinementLimitError,
    ResourceError,
    SolverError,
    UnknownIdsError,
    UnlearnError,
)
from .linalg import SolveInfo
from .models import KernelModel, Model, build_model
from .state import ModelState

__all__ = [
    "DTYPES",
    "LOSSES",
    "MODEL_KINDS",
    "SOLVER_ALIASES",
    "SOLVER_METHODS",
    "AlreadyForgottenError",
    "ComputationCancelled",
    "Dataset",
    "DatasetError",
    "ForgetResult",
    "InfluenceResult",
    "InvalidForgetSetError",
    "InvalidInputError",
    "KernelModel",
    "Model",
    "ModelConfig",
    "ModelState",
    "RefinementLimitError",
    "ResourceError",
    "SolveInfo",
    "SolverConfig",
    "SolverError",
    "TrainConfig",
    "UnknownIdsError",
    "UnlearnError",
    "Unlearner",
    "build_model",
    "latest_version",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "load_npz",
]
