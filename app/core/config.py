"""Service settings: one pydantic-settings object, every field also an ``NTK_UNLEARN_*`` variable.

The engine's own dataclass defaults are the defaults here, so the two cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service_core import ModelConfig, SolverConfig, TrainConfig

_MODEL = ModelConfig()
_TRAIN = TrainConfig()
_SOLVER = SolverConfig()


class Settings(BaseSettings):
    """Everything an operator can set. Command-line flags override the environment, which
    overrides these defaults (see ``app.cli``)."""

    model_config = SettingsConfigDict(env_prefix="NTK_UNLEARN_", frozen=True, extra="forbid")

    # Data set and model (saved with every checkpoint by the engine).
    dataset: str = Field(
        "digits",
        description="'digits', 'mnist:DIR' (IDX files), 'cifar2:FILE.npz' (uint8 x (N,32,32,3), y) "
        "or 'npz:FILE' (arrays x, y, ...)",
    )
    n_train: int | None = Field(
        None, gt=0, description="training points to keep: per class × 10 for mnist (default 200 "
        "per class), balanced for cifar2 (default all); not for digits or npz",
    )
    model: Literal["linear", "mlp", "cnn", "inf-mlp", "inf-cnn"] = Field(
        _MODEL.kind, description="network to linearise, or an infinitely wide one (analytic NTK)"
    )
    loss: Literal["ce", "mse"] = Field(_TRAIN.loss, description="cross-entropy or squared error")
    lam: float = Field(_TRAIN.lam, gt=0, description="L2 weight λ of the regularised risk")
    width: int = Field(_MODEL.width, gt=0, description="MLP hidden width")
    depth: int = Field(_MODEL.depth, ge=0, description="MLP hidden layers")
    w_std: float = Field(_MODEL.w_std, gt=0, description="weight standard deviation (NTK param.)")
    b_std: float = Field(_MODEL.b_std, ge=0, description="bias standard deviation (NTK param.)")
    seed: int = Field(_MODEL.seed, description="seed of the data split and the initialisation")
    dtype: Literal["float32", "float64"] = Field(_TRAIN.dtype, description="floating point type")

    # Influence solver.
    solver: Literal["auto", "alpha-cg", "alpha-cholesky", "alpha-paper", "theta-cg", "cg", "cholesky"] = Field(
        _SOLVER.method, description="influence solver; 'auto' picks the cheapest by a cost model"
    )
    cg_tol: float | None = Field(
        _SOLVER.tol, gt=0, description="relative residual CG must reach (default by dtype)"
    )
    max_iter: int = Field(_SOLVER.max_iter, gt=0, description="most CG iterations per solve")
    refine: bool = Field(_SOLVER.refine, description="Newton refinement after each deletion")

    # Service.
    data_dir: Path = Field(
        Path("./data"), description="checkpoints, NTK cache, deletion log, embedded Redis"
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    api_token: str | None = Field(
        None, description="bearer token with write rights (default: generated in the data dir)"
    )
    read_token: str | None = Field(
        None, description="bearer token for reads (default: the write token)"
    )
    open_reads: bool = Field(False, description="serve reads without any token")
    worker: bool = Field(True, description="run the solver worker inside 'serve'")

    # Queue.
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("REDIS_URL", "NTK_UNLEARN_REDIS_URL", "redis_url"),
        description="Redis to share (env REDIS_URL); unset: 'serve' runs a private one",
    )
    redis_prefix: str = Field(
        "ntk-unlearn", min_length=1, description="key prefix of every Redis key of this model"
    )
    job_ttl_s: int = Field(7 * 24 * 3600, gt=0, description="seconds job records are kept")

    @model_validator(mode="after")
    def _n_train_applies(self) -> "Settings":
        self.dataset_kwargs()
        return self

    def dataset_kwargs(self) -> dict:
        """Loader arguments of ``service_core.load_dataset`` for ``n_train``."""
        if self.n_train is None:
            return {}
        kind = self.dataset.partition(":")[0]
        if kind == "mnist":
            return {"train_per_class": max(1, self.n_train // 10)}
        if kind == "cifar2":
            return {"n_train": self.n_train}
        raise ValueError(f"--n-train applies to mnist and cifar2 data sets, not {self.dataset!r}")

    @property
    def checkpoint_dir(self) -> Path:
        return self.data_dir / "checkpoints"

    @property
    def ntk_cache_dir(self) -> Path:
        return self.data_dir / "ntk-cache"

    @property
    def deletion_log(self) -> Path:
        return self.data_dir / "deletions.log"

    @property
    def api_token_file(self) -> Path:
        return self.data_dir / "api_token"

    def to_model_config(self) -> ModelConfig:
        return ModelConfig(
            kind=self.model,
            width=self.width,
            depth=self.depth,
            w_std=self.w_std,
            b_std=self.b_std,
            seed=self.seed,
        )

    def to_train_config(self) -> TrainConfig:
        return TrainConfig(loss=self.loss, lam=self.lam, dtype=self.dtype)

    def to_solver_config(self) -> SolverConfig:
        return SolverConfig(
            method=self.solver, tol=self.cg_tol, max_iter=self.max_iter, refine=self.refine
        )
