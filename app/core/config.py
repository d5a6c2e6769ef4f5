"""Service settings: one pydantic-settings object, every field also an ``NTK_UNLEARN_*`` variable.

The engine's own dataclass defaults are the defaults here, so the two cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service_core import ModelConfig, SolverConfig, TrainConfig
from service_core.config import (
    DTYPES,
    LOSSES,
    MODEL_KINDS,
    SOLVER_ALIASES,
    SOLVER_METHODS,
    TRAINERS,
    USER_KIND,
)
from service_core.nonlinear_serving import NonlinearOptions

_MODEL = ModelConfig()
_TRAIN = TrainConfig()
_SOLVER = SolverConfig()
# (width, depth) by model kind when not given: the paper's CNN is 3 blocks of 128 channels.
_KIND_DEFAULTS = {"cnn": (128, 3), "inf-cnn": (128, 3)}


class Settings(BaseSettings):
    """Everything an operator can set. Command-line flags override the environment, which
    overrides these defaults (see ``app.cli``)."""

    # allow_inf_nan: no setting means anything at infinity (--lam inf built for minutes, --tol inf
    # would publish any certificate)
    model_config = SettingsConfigDict(
        env_prefix="NTK_UNLEARN_", frozen=True, extra="forbid", allow_inf_nan=False
    )

    # Data set and model (saved with every checkpoint by the engine).
    dataset: str = Field(
        "digits",
        description="'digits', 'mnist:DIR' (IDX files), 'cifar2:FILE.npz' (uint8 x (N,32,32,3), y) "
        "or 'npz:FILE' (arrays x, y, ...)",
    )
    n_train: int | None = Field(
        None,
        gt=0,
        description="training points to keep: per class × 10 for mnist (default 200 "
        "per class), balanced for cifar2 (default all); not for digits or npz",
    )
    model: str = Field(
        _MODEL.kind,
        description="network to linearise (" + ", ".join(MODEL_KINDS[:3]) + "), an infinitely "
        "wide one (" + ", ".join(MODEL_KINDS[3:]) + "), or your own: FILE.py:NAME or "
        "package.module:NAME, NAME() returning (apply_fn, params)",
    )
    params: Path | None = Field(
        None,
        description="your own network: pretrained weights θ0 from this .npz (keyed by leaf path) or "
        "orbax checkpoint, instead of the factory's params",
    )
    trainable: str | None = Field(
        None,
        description="your own network: regular expression over '/'-joined leaf paths of the "
        "leaves fine-tuning moves (default: all); the others stay at θ0",
    )
    loss: Literal[LOSSES] = Field(_TRAIN.loss, description="cross-entropy or squared error")
    lam: float = Field(_TRAIN.lam, gt=0, description="L2 weight λ of the regularised risk")
    pool: bool = Field(
        _MODEL.pool,
        description="cnn / inf-cnn: AvgPool(2×2) after each conv block (inf-cnn with "
        "pooling costs ~0.1 s per pair of images: a few hundred points at most)",
    )
    width: int | None = Field(
        None,
        gt=0,
        description="hidden width: MLP units or CNN channels (default: 512 for mlp, 128 for cnn)",
    )
    depth: int | None = Field(
        None,
        ge=0,
        description="hidden layers or conv blocks (default: 2 for mlp, 3 for cnn, as the paper)",
    )
    w_std: float = Field(_MODEL.w_std, gt=0, description="weight standard deviation (NTK param.)")
    b_std: float = Field(_MODEL.b_std, ge=0, description="bias standard deviation (NTK param.)")
    seed: int = Field(_MODEL.seed, description="seed of the data split and the initialisation")
    trainer: Literal[TRAINERS] = Field(
        _TRAIN.trainer,
        description="version 0's trainer: Newton in α, or kernel gradient descent (Eq. 14)",
    )
    dtype: Literal[DTYPES] = Field(
        _TRAIN.dtype,
        description="floating point type; auto: float32 while float32 certifies the tolerances, "
        "else promoted to float64 (K upcast exactly) where memory allows",
    )
    tol: float | None = Field(
        _TRAIN.tol,
        gt=0,
        lt=1,  # a relative residual: 1 is met by α = 0, an untrained model
        description="stationarity tolerance every published version must meet (training and "
        "deletions; default 1e-5, 1e-10 in float64)",
    )
    accept_floor: float = Field(
        _TRAIN.accept_floor,
        ge=1,
        le=1000,
        description="bounded slack: publish a version whose certificate is at most tol × this "
        "factor (1: none, converged means met the tolerance)",
    )

    # Influence solver.
    solver: Literal[SOLVER_METHODS + tuple(SOLVER_ALIASES)] = Field(
        _SOLVER.method, description="influence solver; 'auto' picks the cheapest by a cost model"
    )
    cg_tol: float | None = Field(
        _SOLVER.tol, gt=0, lt=1, description="relative residual CG must reach (default by dtype)"
    )
    max_iter: int = Field(_SOLVER.max_iter, gt=0, description="most CG iterations per solve")
    refine: bool = Field(_SOLVER.refine, description="Newton refinement after each deletion")
    nystrom_rank: int = Field(
        _SOLVER.nystrom_rank,
        ge=0,
        description="rank of the Nyström approximation of K that preconditions CG (0: off); refreshed after each deletion",
    )
    spare_kernel: bool = Field(
        _SOLVER.spare_kernel,
        description="keep a second K-sized buffer, already mapped, for the next deletion to write its K into (faster small deletions; the memory the planner reserves for a deletion's working copy of K)",
    )

    # A nonlinear network (serve --nonlinear; service_core.nonlinear_serving).
    nonlinear: bool = Field(
        False,
        description="serve the nonlinear network f(x; θ) trained with the regulariser λ/2‖θ−θ0‖² "
        "(mlp, cnn or your own), not its linearisation; deletions by an influence step, "
        "optionally refined; dtype auto means float64 here",
    )
    nonlinear_step: Literal["alpha", "theta"] = Field(
        "alpha",
        description="--nonlinear: the influence step of a deletion: alpha (α-space, NTK at θ0, "
        "the paper's) or theta (θ-space, Hessian of the nonlinear retain risk; fails where it is "
        "indefinite, small lam)",
    )
    nonlinear_refine: int = Field(
        0,
        ge=0,
        description="--nonlinear: most Newton-CG steps on the nonlinear retain risk after the "
        "step (0: none); a deletion whose certificate then misses --nonlinear-tol fails",
    )
    nonlinear_tol: float = Field(
        1e-6,
        gt=0,
        lt=1,
        description="--nonlinear: certificate tolerance, ‖∇L_R(θ_new)‖ ≤ tol · ‖∇L_R(θ_prev)‖ "
        "(training: ‖∇L(θ*)‖ ≤ tol · ‖∇L(θ0)‖)",
    )
    nonlinear_epochs: int = Field(
        200, gt=0, description="--nonlinear: full-batch gradient-descent epochs at build"
    )
    nonlinear_lr: float = Field(
        0.1, gt=0, description="--nonlinear: learning rate of that gradient descent"
    )

    # Service.
    data_dir: Path = Field(
        Path("./data"), description="checkpoints, NTK cache, deletion log, embedded Redis"
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    api_token: str | None = Field(
        None,
        description="bearer token with write rights (default: generated in the data dir); as a "
        "flag it is visible to every local user (ps, /proc/PID/cmdline): prefer the env or "
        "--api-token-file",
    )
    api_token_file: Path | None = Field(
        None, description="file holding the write token (instead of --api-token)"
    )
    read_token: str | None = Field(
        None,
        description="bearer token for reads (default: the write token); as a flag visible to "
        "every local user: prefer the env or --read-token-file",
    )
    read_token_file: Path | None = Field(
        None, description="file holding the read token (instead of --read-token)"
    )
    open_reads: bool = Field(False, description="serve reads without any token")
    worker: bool = Field(True, description="run the solver worker inside 'serve'")
    follow_wait_s: float = Field(
        2.0,
        ge=0,
        description="'serve --no-worker': how long a request waits for this process to load "
        "the newest version the worker reported before it gets 503 (it never serves an older one)",
    )
    report_wait_s: float = Field(
        1.0,
        ge=0,
        le=60,
        description="the worker: before reporting a version, how long it waits for every live "
        "'serve --no-worker' process to have read it and erased K ahead, so that requests after "
        "the report do not wait for that (0: report at once)",
    )
    take_over_queue: bool = Field(
        False,
        description="the worker, with REDIS_URL: take this data dir's queue even though its last "
        "holder was the worker of another data dir path (this data dir moved, or replaced that "
        "one for good). Without it such a worker applies no job and says why: a copy of a data "
        "dir (a restored backup) beside the original would apply the original's jobs to its "
        "own model. Needed once; with the embedded Redis never",
    )
    follow_preconditioner: bool = Field(
        True,
        description="'serve --no-worker': after loading each new version, make its Nyström "
        "preconditioner (seconds of both cores beside the requests, after the version is served); "
        "without it none is made for the versions it follows (the version it starts with keeps the "
        "one made at start) and this process's influence and attribution solves then run "
        "unpreconditioned (same answers, more CG iterations)",
    )
    follow_reader_process: bool = Field(
        True,
        description="'serve --no-worker': read each new version's checkpoint in a child process "
        "(one, started once the model is loaded; about 0.25 GB of its own memory) instead of in this one, where "
        "the reading library's Python work kept the requests waiting for the interpreter lock (up "
        "to 19 ms at a stretch); "
        "if the child fails, a read is made here",
    )
    predict_batch_wait_ms: float = Field(
        1.0,
        ge=0,
        le=100,
        description="how long a /v1/predict request waits for concurrent ones to be computed "
        "with it in one device call (0: only those that arrived while the previous call ran)",
    )
    # Request limits: one request must not tie the server up (a 300,000-row predict took 30 s).
    max_rows: int = Field(
        10_000,
        gt=0,
        description="most x rows in one /v1/predict, /v1/influence, /v1/attribute or /v1/records "
        "request",
    )
    max_exact_self_influence: int = Field(
        20,
        gt=0,
        description="most records one GET /v1/self-influence?exact=true refines to exact retraining "
        "(cross-entropy: offset + limit of them, one Newton retraining each)",
    )
    max_exact_attribution: int = Field(
        40,
        gt=0,
        description="most records one POST /v1/attribute with exact=true refines to exact "
        "retraining (cross-entropy: the distinct leading 2k per side over every row, one Newton "
        "retraining each; 40 is k = 10 for one row)",
    )
    max_body_bytes: int = Field(
        64 * 2**20, gt=0, description="largest request body in bytes; larger ones get 413"
    )
    large_body_bytes: int = Field(
        2**20,
        ge=0,
        description="a body over this many bytes (or chunked, of unknown length) is large: "
        "see --max-large-bodies",
    )
    max_large_bodies: int = Field(
        2,
        gt=0,
        description="most requests with large bodies served at once (parsing one takes "
        "memory several times its size); more get 503 with Retry-After",
    )

    # Queue.
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("REDIS_URL", "NTK_UNLEARN_REDIS_URL", "redis_url"),
        description="Redis to share; unset: 'serve' runs a private one",
    )
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="'worker': serve its Prometheus metrics (jobs, solves, model, queue) at "
        "http://METRICS_HOST:METRICS_PORT/metrics ('serve' has /metrics on its API port); unset: "
        "none",
    )
    metrics_host: str = Field(
        "127.0.0.1", description="'worker': address the metrics port listens on"
    )
    redis_prefix: str = Field(
        "ntk-unlearn", min_length=1, description="key prefix of every Redis key of this model"
    )
    job_ttl_s: int = Field(7 * 24 * 3600, gt=0, description="seconds job records are kept")
    redis_timeout_s: float = Field(
        0.5,
        gt=0,
        description="the API's wait for a Redis answer; a Redis that does not answer within it "
        "is taken as down (503) for --redis-retry-s",
    )
    redis_retry_s: float = Field(
        2.0,
        gt=0,
        description="after Redis failed, the API answers 503 at once for this long, then tries "
        "Redis again (circuit breaker)",
    )

    def _cifar_targets(self) -> dict:
        # Squared error on two classes: one output with ±1 targets, as the paper does.
        return {"binary_pm1": True} if self.loss == "mse" else {}

    @model_validator(mode="after")
    def _redis_url_is_a_redis_url(self) -> Settings:
        schemes = ("redis://", "rediss://", "unix://")
        if self.redis_url is not None and not self.redis_url.lower().startswith(schemes):
            raise ValueError(
                f"the Redis URL (--redis-url or REDIS_URL) {self.redis_url!r} must start with "
                "redis://, rediss:// or unix:// (e.g. redis://127.0.0.1:6379/0)"
            )
        return self

    @field_validator("data_dir", mode="before")
    @classmethod
    def _data_dir_is_named(cls, value: Any) -> Any:
        # Path("") is ".": an empty --data-dir made the working directory the data dir (chmod
        # 0700, tokens and Redis files written into it)
        if isinstance(value, str) and not value.strip():
            raise ValueError("it is empty: name a directory")
        return value

    @model_validator(mode="after")
    def _slack_leaves_a_bar(self) -> Settings:
        bar = self.to_train_config().resolved_tol() * self.accept_floor
        if bar >= 1:
            raise ValueError(
                f"--tol × --accept-floor is {bar:g}: a relative residual of 1 is met by an "
                "untrained model (α = 0); keep the product below 1"
            )
        return self

    @model_validator(mode="after")
    def _n_train_applies(self) -> Settings:
        self.dataset_kwargs()
        return self

    @model_validator(mode="after")
    def _model_is_known(self) -> Settings:
        if self.model not in MODEL_KINDS and ":" not in self.model:
            raise ValueError(
                f"--model {self.model!r}: use one of {', '.join(MODEL_KINDS)}, or your own network "
                "as FILE.py:NAME or package.module:NAME"
            )
        if self.user_network is None and (self.params is not None or self.trainable is not None):
            raise ValueError(
                "--params and --trainable apply to your own network (--model FILE.py:NAME)"
            )
        return self

    @property
    def user_network(self) -> str | None:
        """``--model`` as the engine keeps it when it names the user's network (a file's path made
        absolute, so that a restart from another directory finds it), else ``None``."""
        if self.model in MODEL_KINDS:
            return None
        from service_core.user_network import is_file_source

        source, _, name = self.model.rpartition(":")
        if is_file_source(source):
            source = str(Path(source).expanduser().absolute())
        return f"{source}:{name}"

    def dataset_source(self) -> str:
        """The data set as asked for, part of the model's identity (``lifecycle.Identity``)."""
        return self.dataset + (f", n_train {self.n_train}" if self.n_train is not None else "")

    def dataset_kwargs(self) -> dict:
        """Loader arguments of ``service_core.load_dataset`` for ``n_train``."""
        kind = self.dataset.partition(":")[0]
        if self.n_train is None:
            return self._cifar_targets() if kind == "cifar2" else {}
        if kind == "mnist":
            return {"train_per_class": max(1, self.n_train // 10)}
        if kind == "cifar2":
            return {"n_train": self.n_train, **self._cifar_targets()}
        raise ValueError(f"--n-train applies to mnist and cifar2 data sets, not {self.dataset!r}")

    @property
    def checkpoint_dir(self) -> Path:
        """One orbax checkpoint per version; only the newest complete one is kept."""
        return self.data_dir / "checkpoints"

    @property
    def deletion_log(self) -> Path:
        """One JSON line per published deletion, fsync'd before its jobs are reported: ids and
        certificates, never data."""
        return self.data_dir / "deletions.log"

    @property
    def generated_token_file(self) -> Path:
        """Where the write token is kept (mode 0600) when none is given by flag, file or
        environment; ``serve`` prints this path, never the token, and readers of the data
        directory are its owner only."""
        return self.data_dir / "api_token"

    @property
    def ntk_cache_dir(self) -> Path:
        return self.data_dir / "ntk-cache"

    def to_model_config(self) -> ModelConfig:
        if self.user_network is not None:
            return ModelConfig(
                kind=USER_KIND,
                network=self.user_network,
                params=None if self.params is None else str(self.params.expanduser().absolute()),
                trainable=self.trainable,
                seed=self.seed,
            )
        width, depth = _KIND_DEFAULTS.get(self.model, (_MODEL.width, _MODEL.depth))
        return ModelConfig(
            kind=self.model,
            width=self.width if self.width is not None else width,
            depth=self.depth if self.depth is not None else depth,
            w_std=self.w_std,
            b_std=self.b_std,
            seed=self.seed,
            pool=self.pool,
        )

    def to_train_config(self) -> TrainConfig:
        return TrainConfig(
            loss=self.loss,
            lam=self.lam,
            # a nonlinear network's certificate (a gradient norm) needs float64
            dtype="float64" if self.nonlinear and self.dtype == "auto" else self.dtype,
            trainer=self.trainer,
            tol=self.tol,
            accept_floor=self.accept_floor,
        )

    @property
    def mode(self) -> str:
        """``nonlinear`` (``--nonlinear``) or ``linearised``: part of the model's identity."""
        return "nonlinear" if self.nonlinear else "linearised"

    def nonlinear_options(self) -> NonlinearOptions:
        """How a ``--nonlinear`` model trains and forgets."""
        return NonlinearOptions(
            step=self.nonlinear_step,
            refine=self.nonlinear_refine,
            tol=self.nonlinear_tol,
            epochs=self.nonlinear_epochs,
            lr=self.nonlinear_lr,
        )

    def to_solver_config(self) -> SolverConfig:
        return SolverConfig(
            method=self.solver,
            tol=self.cg_tol,
            max_iter=self.max_iter,
            refine=self.refine,
            nystrom_rank=self.nystrom_rank,
            spare_kernel=self.spare_kernel,
        )
