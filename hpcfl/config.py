"""All settings of a run in one frozen dataclass: saved with every checkpoint and result.

Each field declares, next to its default, everything the rest of hpcfl needs to know about it:
its one-line help, the check its value must pass (used alike by the command line and by
`hpcfl.train`), and what `--resume` does when it differs from the checkpoint's value, per mode:
MUST match (it fixes the shape of the saved state or which data a client holds), WARN (the run
goes on but will not match an uninterrupted one) or IGNORE (no effect on the trajectory).
tests/test_config.py walks every field, so a new setting cannot go unclassified.
"""
from __future__ import annotations

import contextvars
import dataclasses
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .backends import NAMES as BACKENDS
from .core.optim import OPTIMIZERS
from .errors import UsageError
from .fl.aggregators import AGGREGATORS
from .fl.attacks import KINDS as ATTACKS
from .fl.partition import PARTITIONS
from .fl.server_opt import SERVER_OPTIMIZERS
from .parallel.sync import SYNCS
from .privacy.server_attacks import ATTACKS as SERVER_ATTACKS

MUST, WARN, IGNORE = "must match", "may change (warning)", "ignored"
MODES = ("dp", "fl")
DP_ONLY = {"dp": WARN, "fl": IGNORE}
FL_ONLY = {"dp": IGNORE, "fl": WARN}
FL_MUST = {"dp": IGNORE, "fl": MUST}


# ---------------------------------------------------------------- value checks
# Each returns the value or raises ValueError with what is wrong (the caller names the option).

def positive(v):
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
        raise ValueError(f"must be positive and finite, got {v}")
    return v


def non_negative(v):
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
        raise ValueError(f"must be >= 0 and finite, got {v}")
    return v


def fraction(v):
    """(0, 1]: a share of clients, an accuracy."""
    if not (isinstance(v, (int, float)) and 0.0 < v <= 1.0):
        raise ValueError(f"must be in (0, 1], got {v}")
    return v


def below_one(v):
    """[0, 1): momentum-like coefficients (1 or more never converges), rates."""
    if not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
        raise ValueError(f"must be in [0, 1), got {v}")
    return v


def open_unit(v):
    """(0, 1): probabilities such as delta."""
    if not (isinstance(v, (int, float)) and 0.0 < v < 1.0):
        raise ValueError(f"must be in (0, 1), got {v}")
    return v


def layer_sizes(v):
    if not (isinstance(v, tuple) and v and all(isinstance(s, int) and s > 0 for s in v)):
        raise ValueError(f"layer sizes must be positive integers, got {v!r}")
    return v


def sizes_from_text(text: str) -> tuple:
    """--hidden's text form, "256,128", as a tuple of ints (ValueError if it is not one)."""
    return tuple(int(t) for t in text.split(",") if t.strip())


def option(default: Any, help: str, *, check: Callable[[Any], Any] | None = None,
           choices: Sequence[Any] | None = None, resume: str | dict[str, str] = WARN, group: str = "training",
           metavar: str | None = None, cli: bool = True, modes: Sequence[str] | None = None,
           defines_run: bool = True) -> Any:
    """A Config field with its help, check, resume rule (str, or {"dp": rule, "fl": rule}) and
    the modes it applies to (default: fl for the federated group, dp for the dp-only training
    settings, else both); config.json records only the settings of the run's mode, and of those
    only the ones that define the run (not where it wrote or how it talked: defines_run=False)."""
    rules = resume if isinstance(resume, dict) else dict.fromkeys(MODES, resume)
    if modes is None:
        modes = (("fl",) if group == "federated" or rules in (FL_ONLY, FL_MUST)
                 else ("dp",) if rules == DP_ONLY else MODES)
    return field(default=default, metadata={"help": help, "check": check, "choices": choices,
                                            "resume": rules, "group": group, "metavar": metavar,
                                            "cli": cli, "modes": tuple(modes),
                                            "defines_run": defines_run})



# Settings whose default depends on others: the field's default is None, meaning "derive it", and
# Config fills it in at construction (so config.json records what ran). --server-lr when not given:
# what worked for each server optimizer (benchmarks/FEDAVG.md); FedAdam's adaptive steps diverge
# at 1.0 (58% after round 1, NaN in round 2).
DEFAULT_SERVER_LR = {"fedavg": 1.0, "fedavgm": 1.0, "fedadam": 0.01, "fedyogi": 0.01, "fedadagrad": 0.01}
PLAIN_DEFAULTS = {"hidden": (256, 128), "batch_size": 128, "epochs": 12, "lr": 0.05, "momentum": 0.9,
                  "server_opt": "fedavg"}
# With differential privacy asked for (--dp-sgd in dp mode; --dp-clip, --dp-noise or --dp-epsilon
# in fl mode), what did best in benchmarks/PRIVACY.md, so that `--dp-sgd --dp-epsilon 2` and
# `--mode fl --num-clients 6000 --client-fraction 0.05 --dp-epsilon 8 --rounds 100` reach its
# goals as written. DP-SGD: large expected batches and many epochs (the noise per step is fixed,
# the signal grows with the batch), no momentum, a clip well below the typical gradient norm.
# DP-FedAvg: server momentum (FedAvgM) averages the noise of consecutive rounds away, and a clip
# of 0.2 at the plain local lr 0.1 is the tuned local lr 0.5 / clip 1.0 / server lr 0.2 rescaled
# (with one local step the same global models), without the divergence of local lr 0.5 when a
# client takes many local steps.
DP_DEFAULTS = {
    "dp": {"hidden": (128,), "batch_size": 4096, "epochs": 60, "lr": 20.0, "momentum": 0.0, "dp_clip": 0.5},
    "fl": {"server_opt": "fedavgm", "dp_clip": 0.2},
}
# DP-SGD with --dp-epsilon E: per budget, DP-PCA's projection and the settings that did best
# with it on a validation split (benchmarks/dp_pca_search.py; PRIVACY.md, "How the DP-SGD defaults
# were chosen"): the smaller the budget, the fewer and larger the steps (each step's noise is
# paid per step), the larger the budget, the longer and wider the training. (upper E, settings)
DP_SGD_BUDGETS = (
    (1.0, {"hidden": (128,), "batch_size": 8192, "epochs": 60, "lr": 20.0, "momentum": 0.0, "dp_clip": 0.5,
           "dp_pca": 60}),
    (4.0, {"hidden": (256,), "batch_size": 4096, "epochs": 60, "lr": 20.0, "momentum": 0.0, "dp_clip": 0.5,
           "dp_pca": 100}),
    (math.inf, {"hidden": (256,), "batch_size": 4096, "epochs": 240, "lr": 20.0, "momentum": 0.0,
                "dp_clip": 1.0, "dp_pca": 60}),
)


def dp_sgd_defaults(epsilon: float | None) -> dict:
    """DP-SGD's derived settings: DP_DEFAULTS["dp"] with --dp-noise, else those of the budget."""
    if epsilon is None:
        return DP_DEFAULTS["dp"]
    return next(s for upper, s in DP_SGD_BUDGETS if epsilon <= upper)


# ... and the server lr, when not given, in proportion to the expected clients per round q N: the
# noise of the server's step, server_lr z S / (q N), then stays at what did best for N = 6000
# (q N = 300, lr 1); for N = 1000 (q N = 50) that is 0.17: 92.49% at epsilon 8, where lr 1 gave 81%
DP_FULL_STEP_CLIENTS = 300


def value_text(value: Any) -> str:
    """A setting's value as the command line spells it (tuples as 256,128, None as none)."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def shown_default(name: str, default: Any) -> str:
    """The help's "(default: ...)" of a setting, spelling out the derived ones."""
    if name == "server_lr":
        return (f"1.0 for fedavg and fedavgm, 0.01 for fedadam, fedyogi and fedadagrad; with DP in fl mode "
                f"fedavg(m) takes "
                f"min(1, clients per round / {DP_FULL_STEP_CLIENTS})")
    parts = [value_text(PLAIN_DEFAULTS.get(name, default))]
    if name in DP_DEFAULTS["dp"] or name in DP_SGD_BUDGETS[0][1]:
        by_budget, lower = [], 0.0
        for upper, settings in DP_SGD_BUDGETS:
            span = f"E <= {upper:g}" if lower == 0 else f"E > {lower:g}" if upper == math.inf else \
                f"{lower:g} < E <= {upper:g}"
            by_budget.append(f"{value_text(settings.get(name))} for {span}")
            lower = upper
        values = {s.get(name) for _, s in DP_SGD_BUDGETS}
        budget = (f"{value_text(values.pop())}" if len(values) == 1 else ", ".join(by_budget))
        noise = f"; {value_text(DP_DEFAULTS['dp'][name])} with --dp-noise" if name in DP_DEFAULTS["dp"] else ""
        parts.append(f"with --dp-sgd --dp-epsilon E: {budget}{noise}")
    if name in DP_DEFAULTS["fl"]:
        parts.append(f"{value_text(DP_DEFAULTS['fl'][name])} with DP in fl mode")
    return "; ".join(parts)


class UnknownSetting(UsageError, TypeError):
    """Config(...) with a keyword that names no setting (also a TypeError, as Python's own is)."""


class _Checked(type):
    """Config(...) refuses an unknown keyword by name, suggesting the closest setting, where a
    dataclass would raise a bare TypeError."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        unknown = [k for k in kwargs if k not in FIELDS]
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], list(FIELDS), n=1, cutoff=0.6)
            raise UnknownSetting(f"Config({unknown[0]}=...): no such setting"
                                 + (f"; did you mean {close[0]}?" if close else "; see help(hpcfl.Config)"))
        return super().__call__(*args, **kwargs)


@dataclass(frozen=True)
class Config(metaclass=_Checked):
    """A run's settings. A field whose default is None and that PLAIN_DEFAULTS or DP_DEFAULTS name
    is derived at construction (hidden, epochs, batch_size, lr, momentum, server_opt, server_lr
    always are: their types say what they hold once a Config exists)."""
    _derived: ClassVar[tuple[str, ...]] = ()    # the fields derived (not given), set per instance
    mode: str = option("dp", "dp: data parallel, one Allreduce per step; fl: federated (FedAvg)",
                       choices=("dp", "fl"), resume=MUST, group="mode")
    # ---- model and optimisation
    hidden: tuple = option(None, "hidden layer sizes, comma separated", check=layer_sizes,
                           resume=MUST, metavar="N,N")
    epochs: int = option(None, "training epochs (dp)", check=positive, resume=DP_ONLY)
    batch_size: int = option(None, "global batch (dp): each of P ranks computes 1/P of it "
                                    "(with --dp-sgd the expected size of the Poisson batches)",
                             check=positive, resume={"dp": MUST, "fl": IGNORE}, modes=("dp",))
    optimizer: str = option("sgd", "optimizer (dp; fl clients use plain SGD)", choices=tuple(OPTIMIZERS),
                            resume={"dp": MUST, "fl": IGNORE}, modes=("dp",))
    lr: float = option(None, "learning rate (dp)", check=positive, resume=DP_ONLY)
    momentum: float = option(None, "SGD momentum (dp)", check=below_one, resume=DP_ONLY)
    weight_decay: float = option(1e-4, "L2 weight decay (dp)", check=non_negative, resume=DP_ONLY)
    schedule: str = option("cosine", "learning-rate schedule (dp)", choices=("cosine", "constant"),
                           resume=DP_ONLY)
    max_steps: int | None = option(None, "stop after this many optimizer steps (dp; smoke runs)",
                                   check=positive, resume=DP_ONLY)
    target_accuracy: float | None = option(None, "stop once the test accuracy reaches this",
                                           check=fraction, resume=IGNORE)
    # ---- federated
    rounds: int = option(50, "federated rounds", check=positive, resume=FL_ONLY, group="federated")
    num_clients: int = option(100, "number of clients", check=positive, resume=FL_MUST, group="federated")
    ranks_per_client: int = option(1, "MPI ranks that train one client together (data parallel)",
                                   check=positive, resume=FL_ONLY, group="federated")
    client_fraction: float = option(0.1, "share C of the clients sampled each round",
                                    check=fraction, resume=FL_MUST, group="federated")
    partition: str = option("iid", "how the training set is split among clients",
                            choices=tuple(PARTITIONS), resume=FL_MUST, group="federated")
    alpha: float = option(0.5, "Dirichlet concentration (--partition dirichlet)", check=positive,
                          resume=FL_MUST, group="federated")
    local_epochs: int = option(1, "local epochs E per round", check=positive, resume=FL_ONLY,
                               group="federated")
    local_batch_size: int = option(10, "local batch B (larger than a client: full batch on it)",
                                   check=positive, resume=FL_ONLY, group="federated")
    local_lr: float = option(0.1, "client learning rate", check=positive, resume=FL_ONLY,
                             group="federated")
    mu: float = option(0.0, "FedProx proximal weight", check=non_negative, resume=FL_ONLY,
                       group="federated")
    server_opt: str = option(None, "server optimizer", choices=tuple(SERVER_OPTIMIZERS),
                             resume=FL_MUST, group="federated")
    server_lr: float = option(None, "server learning rate", check=positive, resume=FL_ONLY,
                                     group="federated")
    server_momentum: float = option(0.9, "server momentum (fedavgm)", check=below_one,
                                    resume=FL_ONLY, group="federated")
    server_beta1: float = option(0.9, "FedAdam, FedYogi, FedAdagrad: beta1", check=below_one, resume=FL_ONLY,
                                 group="federated")
    server_beta2: float = option(0.99, "FedAdam, FedYogi: beta2", check=below_one, resume=FL_ONLY, group="federated")
    server_eps: float = option(1e-3, "FedAdam, FedYogi, FedAdagrad: tau (eps)", check=positive, resume=FL_ONLY,
                               group="federated")
    eval_every: int = option(1, "rounds between evaluations", check=positive, resume=IGNORE,
                             group="federated")
    # ---- privacy and security (fl: secure aggregation, client-level DP; dp: DP-SGD)
    secure_agg: bool = option(False, "fl: secure aggregation, the server learns only the sum of the "
                              "clients' updates (Bonawitz et al. 2017, SecAgg+ of Bell et al. 2020)",
                              resume=FL_ONLY, group="privacy", modes=("fl",))
    secagg_neighbors: int | None = option(None, "SecAgg+: each client shares its secrets with K random "
                                          "neighbours instead of every sampled client (about "
                                          "2 log2(clients per round) is enough)", check=positive,
                                          resume=FL_ONLY, group="privacy", modes=("fl",), metavar="K")
    secagg_threshold: int | None = option(None, "shares needed to rebuild a client's secrets (default: "
                                          "the smallest majority of its share holders); a round "
                                          "completes while each secret keeps that many", check=positive,
                                          resume=FL_ONLY, group="privacy", modes=("fl",), metavar="T")
    secagg_range: float | None = option(None, "secure aggregation without DP: each coordinate of a "
                                        "client's update (its model minus the global one) is clipped to "
                                        "+-R before quantisation (default: local lr x the most local steps "
                                        "of any client, which real updates stay within; secagg_clipped "
                                        "counts what it cuts)", check=positive, resume=FL_ONLY,
                                        group="privacy", modes=("fl",), metavar="R")
    secagg_max_dropout: float | None = option(None, "secure aggregation: the share of a round's clients "
                                              "that may drop out, which the neighbour graph and --secagg-"
                                              "neighbors' bound are sized for (default: max(0.1, "
                                              "--dropout-rate))", check=below_one, resume=FL_ONLY,
                                              group="privacy", modes=("fl",), metavar="D")
    secagg_corrupt_fraction: float = option(0.05, "secure aggregation: the share of clients that may "
                                            "collude with the server, which the graph, the threshold and "
                                            "the consistency round withstand", check=below_one,
                                            resume=FL_ONLY, group="privacy", modes=("fl",), metavar="G")
    server_attack: str | None = option(None, "research: run a malicious secure-aggregation server "
                                       "against the honest clients (every round; rounds build no "
                                       "model) and record whether it was detected and what it learned",
                                       choices=SERVER_ATTACKS,
                                       resume=FL_ONLY, group="privacy", modes=("fl",))
    dropout_rate: float = option(0.0, "fl: share of the sampled clients that drop out of each round "
                                 "(after the key exchange under --secure-agg), seeded by the round",
                                 check=below_one, resume=FL_ONLY, group="privacy", modes=("fl",), metavar="P")
    dp_sgd: bool = option(False, "dp: DP-SGD (Abadi et al. 2016): Poisson batches, per-sample clipping to "
                          "--dp-clip, Gaussian noise", resume={"dp": MUST, "fl": IGNORE}, group="privacy",
                          modes=("dp",))
    dp_pca: int | None = option(None, "DP-SGD: train on the input's projection onto K principal "
                                "directions found by DP-PCA (Abadi et al. 2016, section 4: the Gaussian "
                                "mechanism on the Gram matrix of the unit-norm training images); its "
                                "cost is part of --dp-epsilon and the projection part of the model; 0: off",
                                check=non_negative, resume={"dp": MUST, "fl": IGNORE}, group="privacy",
                                modes=("dp",), metavar="K")
    dp_pca_noise: float | None = option(None, "DP-SGD: noise multiplier of the DP-PCA release (default: "
                                        "the noise that alone spends 10% of --dp-epsilon)",
                                        check=positive, resume={"dp": MUST, "fl": IGNORE}, group="privacy",
                                        modes=("dp",), metavar="SIGMA")
    dp_clip: float | None = option(None, "DP: L2 norm each client's update (fl) or each sample's gradient "
                                   "(dp, --dp-sgd) is clipped to",
                                   check=positive, resume=MUST, group="privacy", metavar="S")
    dp_noise: float | None = option(None, "DP: noise multiplier z (noise std = z x clip); or give --dp-epsilon",
                                    check=non_negative, resume=MUST, group="privacy", metavar="Z")
    dp_epsilon: float | None = option(None, "DP: the noise is calibrated so that the planned rounds "
                                      "(fl) or steps (dp) end at epsilon <= E", check=positive,
                                      resume=MUST, group="privacy", metavar="E")
    dp_delta: float = option(1e-5, "DP: delta of the (epsilon, delta) guarantee", check=open_unit,
                             resume=MUST, group="privacy", metavar="D")
    dp_colluders: int = option(0, "DP with --secure-agg: how many clients may collude with the server "
                               "(they know their own noise shares): not counted as noise", check=non_negative,
                               resume=MUST, group="privacy", modes=("fl",), metavar="C")
    dp_noise_seed: int | None = option(None, "DP: seed of the noise and of the private sampling (default: "
                                       "a secret one, kept in the checkpoints). Only to reproduce a run: "
                                       "who knows it can remove the noise", check=non_negative,
                                       resume=IGNORE, group="privacy", metavar="N")
    # ---- robustness and heterogeneity (fl)
    aggregator: str = option("mean", "how the server combines the client updates: the weighted mean "
                             "(FedAvg), or a Byzantine-robust rule", choices=tuple(AGGREGATORS), resume=FL_ONLY,
                             group="robustness")
    trim_fraction: float = option(0.1, "trimmed-mean: share beta of the largest and of the smallest "
                                  "values dropped per coordinate", check=below_one, resume=FL_ONLY,
                                  group="robustness", metavar="BETA")
    byzantine: int = option(0, "krum, multi-krum: how many Byzantine clients f to tolerate "
                            "(needs more than 2f + 2 clients per round)", check=non_negative,
                            resume=FL_ONLY, group="robustness", metavar="F")
    krum_m: int | None = option(None, "multi-krum: how many of the best-scored updates to average "
                                "(default: clients - f)", check=positive, resume=FL_ONLY,
                                group="robustness", metavar="M")
    max_update_norm: float | None = option(None, "reject (mean, robust rules) or clip (norm-bounded) "
                                           "client updates of a larger L2 norm", check=positive,
                                           resume=FL_ONLY, group="robustness", metavar="M")
    attack: str | None = option(None, "simulated attack by the malicious clients (robustness "
                                "experiments)", choices=ATTACKS,
                                resume=FL_MUST, group="robustness")
    malicious_fraction: float = option(0.0, "share of the clients that attack (a seeded set)",
                                       check=below_one, resume=FL_MUST, group="robustness", metavar="F")
    attack_scale: float = option(10.0, "lambda of signflip (-lambda x delta) and scale (lambda x delta)",
                                 check=positive, resume=FL_ONLY, group="robustness", metavar="LAMBDA")
    straggler_rate: float = option(0.0, "share of the sampled clients that finish only a random "
                                   "fraction of their local steps (weighted as FedNova does)",
                                   check=below_one, resume=FL_ONLY, group="robustness", metavar="S")
    scaffold: bool = option(False, "SCAFFOLD (Karimireddy et al. 2020, option II control variates) "
                            "against client drift", resume=FL_MUST, group="robustness")
    scaffold_max_age: int = option(5, "SCAFFOLD: a client's control variate c_i computed more than R "
                                   "rounds ago is left out of its correction (c alone, as in its first "
                                   "round): old c_i made SCAFFOLD diverge at 10% participation; 0: "
                                   "always used, as in the paper", check=non_negative, resume=FL_MUST,
                                   group="robustness", modes=("fl",), metavar="R")
    # ---- data
    dataset: str = option("mnist", "dataset: a catalogue name, or idx / npz with --data-dir",
                          resume=MUST, group="data")
    data_dir: str | None = option(None, "data folder (idx), .npz file (npz), or where a catalogue "
                                  "dataset is (default: $HPCFL_DATA_DIR_<NAME>, e.g. "
                                  "HPCFL_DATA_DIR_FASHION_MNIST, or $HPCFL_DATA_DIR for mnist; "
                                  "else a user cache folder)", resume=IGNORE, group="data", metavar="PATH")
    seed: int = option(0, "seed of the initial model, batch orders, partitions and sampling",
                       check=non_negative, resume={"dp": WARN, "fl": MUST}, group="data")
    # ---- machinery
    backend: str = option("auto", "compute backend (auto: cupy with a usable GPU, else numba)",
                          choices=("auto", *BACKENDS), resume=WARN, group="machinery")
    threads: int = option(1, "BLAS/Numba threads per rank (capped at the rank's cores)",
                          check=positive, resume=IGNORE, group="machinery")
    allreduce: str = option("fused", "gradient sync: one blocking Allreduce of the flat buffer per "
                            "step, a non-blocking Iallreduce per layer during backward, NCCL "
                            "(--backend cupy), or shm: a node's ranks sum in shared memory and each "
                            "updates its slice (dp mode, CPU backends)",
                            choices=tuple(SYNCS), resume=WARN, group="machinery")
    stall_timeout: float = option(600.0, "seconds without progress on a rank (a step, a round, a "
                                  "collective completing) before it aborts the job; 0: never",
                                  check=non_negative, resume=IGNORE, group="machinery", metavar="S")
    metrics: str | None = option(None, "JSON Lines file, one record per epoch/round (rank 0)",
                                 resume=IGNORE, group="output", metavar="FILE", defines_run=False)
    out: str | None = option(None, "folder for the final model.npz and config.json",
                             resume=IGNORE, group="output", metavar="DIR", defines_run=False)
    overwrite: bool = option(False, "replace the metrics, model and TensorBoard events of an earlier "
                             "run at the same paths (without it such a run is refused)",
                             resume=IGNORE, group="output", defines_run=False)
    tensorboard: str | None = option(None, "folder for TensorBoard event files: the scalars of every "
                                     "epoch/round (needs tensorboardX: pip install -e '.[tensorboard]')",
                                     resume=IGNORE, group="output", metavar="DIR", defines_run=False)
    quiet: bool = option(False, "print only warnings, errors and the final accuracy",
                         resume=IGNORE, group="output", defines_run=False)
    log_level: str = option("info", "the least severe messages shown (logger 'hpcfl', rank 0)",
                            choices=("debug", "info", "warning", "error"), resume=IGNORE,
                            group="output", defines_run=False)
    log_file: str | None = option(None, "also write the messages, with time stamps and the rank, to "
                                  "this file (appended)", resume=IGNORE, group="output",
                                  metavar="FILE", defines_run=False)
    checkpoint_dir: str | None = option(None, "folder for checkpoints (ckpt-<step>.npz); on "
                                        "SIGTERM/SIGUSR1 one is saved there and the run exits 75",
                                        resume=IGNORE, group="checkpoints", metavar="DIR",
                                        defines_run=False)
    checkpoint_every: int = option(0, "epochs (dp) or rounds (fl) between checkpoints; 0: only on "
                                   "a stop signal and at the end", check=non_negative,
                                   resume=IGNORE, group="checkpoints")
    keep_checkpoints: int = option(2, "how many of the newest checkpoints to keep", check=positive,
                                   resume=IGNORE, group="checkpoints")
    resume: bool = option(False, "continue from the newest valid checkpoint in --checkpoint-dir",
                          resume=IGNORE, group="checkpoints", defines_run=False)

    def __post_init__(self):
        # the settings left None are derived from the others (derived_defaults) and remembered,
        # so that replace() derives them again from the changed settings instead of freezing them
        derived = []
        for name, value in derived_defaults(self).items():
            object.__setattr__(self, name, value)
            derived.append(name)
        object.__setattr__(self, "_derived", tuple(derived))

    def replace(self, **changes: Any) -> Config:
        """A copy with `changes`; the settings that were derived (not given) are derived again."""
        again: dict[str, Any] = {name: None for name in self._derived if name not in changes}
        return dataclasses.replace(self, **again, **changes)

    def to_dict(self, this_mode_only: bool = False) -> dict:
        d = dataclasses.asdict(self)
        if this_mode_only:                  # what config.json keeps: what defines this run
            d = {k: v for k, v in d.items() if self.mode in FIELDS[k].metadata["modes"]
                 and FIELDS[k].metadata["defines_run"]
                 and not (k in self._derived and not_applying(self, k))}   # loads back as it ran
        return d

    def given(self, name: str) -> bool:
        """Was the setting chosen (not left at its default, nor derived from others)?"""
        if name in self._derived:
            return False
        return getattr(self, name) != FIELDS[name].default

    def to_json(self, this_mode_only: bool = False) -> str:
        return json.dumps(self.to_dict(this_mode_only), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict, *, strict: bool = True) -> Config:
        """A Config from a mapping of field names (dashes allowed: `batch-size`). Unknown keys are
        refused by name when strict (a typo must not silently fall back to a default)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in d.items():
            name = key.replace("-", "_")
            if name not in names:
                if strict:
                    raise UsageError(f"unknown setting {key!r}; see --help for the settings")
                continue
            values[name] = tuple(value) if name == "hidden" and isinstance(value, list) else value
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> dict:
        """The settings in a TOML file or in the config.json that --out writes, as a dict."""
        path = Path(path)
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"--config {path}: cannot read it ({exc.strerror or exc})")
        try:
            if path.suffix == ".json":
                d = json.loads(text)
            else:
                if sys.version_info >= (3, 11):
                    import tomllib
                else:                                       # Python < 3.11
                    import tomli as tomllib
                d = tomllib.loads(text.decode())
        except Exception as exc:
            raise UsageError(f"--config {path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'} "
                             f"({exc})")
        if not isinstance(d, dict):
            raise UsageError(f"--config {path}: expected a table of settings")
        names = {f.name for f in dataclasses.fields(cls)}
        d = {key: _file_value(path, key, value) if key.replace("-", "_") in names else value
             for key, value in d.items()}
        try:
            cls.from_dict(d)                                # unknown keys refused here, by name
        except UsageError as exc:
            raise UsageError(f"--config {path}: {exc}")
        return d


def _numeric(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _file_value(path: Path, key: str, value: Any) -> Any:
    """A setting from a file, of the type its field takes, else an error naming the file, the key
    and the type: `epochs = "3"` is a TOML string, not the number it looks like."""
    name = key.replace("-", "_")
    kind, f = str(FIELDS[name].type), FIELDS[name]
    if value is None and "None" in kind:
        return value
    if name == "hidden":
        if isinstance(value, str):                  # the command line's form, 256,128
            try:
                return sizes_from_text(value)
            except ValueError:
                pass
        elif isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
        raise UsageError(f"--config {path}: {key} = {value!r}: expected an array of layer sizes "
                         f"such as [256, 128] (or the string \"256,128\")")
    expected = ("a boolean (true or false)" if kind == "bool" else "an integer" if kind.startswith("int")
                else "a number" if kind.startswith("float") else "a string")
    ok = (isinstance(value, bool) if kind == "bool"
          else isinstance(value, int) and not isinstance(value, bool) if kind.startswith("int")
          else isinstance(value, (int, float)) and not isinstance(value, bool) if kind.startswith("float")
          else isinstance(value, str))
    if not ok:
        hint = f" (unquoted in TOML: {key} = {value})" if isinstance(value, str) and _numeric(value) else ""
        raise UsageError(f"--config {path}: {key} = {value!r} is {type(value).__name__}: expected "
                         f"{expected}{hint}")
    if f.metadata["check"] is not None:
        try:
            f.metadata["check"](value)
        except ValueError as exc:
            raise UsageError(f"--config {path}: {key} {exc}")
    if f.metadata["choices"] and value not in f.metadata["choices"]:
        raise UsageError(f"--config {path}: {key} = {value!r}: choose from "
                         f"{', '.join(map(str, f.metadata['choices']))}")
    return value


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# How messages name a setting: the command line's --local-lr, or the API's local_lr (the command
# line sets "cli" for its process; hpcfl.train rewrites its errors into the API's spelling).
SPELLING: contextvars.ContextVar[str] = contextvars.ContextVar("hpcfl_spelling", default="api")


def api_spelling(message: str) -> str:
    """A message's --option-name spelled as the Config keyword option_name (settings only)."""
    def keyword(m: re.Match) -> str:
        name = m.group(1).replace("-", "_")
        if name.startswith("no_") and name[3:] in FIELDS:
            return f"{name[3:]}=False"
        if name in FIELDS and "bool" in str(FIELDS[name].type):   # a switch: the flag means True
            return f"{name}=True"
        return name if name in FIELDS else m.group(0)

    message = re.sub(r"argument --([a-z][a-z0-9-]*): ", lambda m: keyword(m) + ": ", message)
    return re.sub(r"--([a-z][a-z0-9-]*)", keyword, message)


def _type_name(value: Any) -> str:
    return type(value).__name__


def _wrong_type(f: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with value's type for the field (its annotation), or None."""
    kind = str(f.type)
    if "bool" in kind:
        ok = isinstance(value, bool)
        want = "True or False"
    elif "tuple" in kind:
        ok = isinstance(value, tuple)
        want = "a tuple of layer sizes"
    elif "int" in kind and "float" not in kind:
        ok = isinstance(value, int) and not isinstance(value, bool)
        want = "an integer"
    elif "float" in kind:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        want = "a number"
    elif "str" in kind:
        ok = isinstance(value, str)
        want = "a string"
    else:
        return None
    return None if ok else f"must be {want}, got {_type_name(value)} {value!r}"


def check_fields(cfg: Config) -> None:
    """Every field's own type, check and choices; raises UsageError naming the option."""
    for name, f in FIELDS.items():
        value, meta = getattr(cfg, name), f.metadata
        if value is None:
            continue
        wrong = _wrong_type(f, value)
        if wrong:
            raise UsageError(f"argument {flag(name)}: {wrong}")
        if meta["choices"] and value not in meta["choices"]:
            raise UsageError(f"{flag(name)}: invalid choice {value!r} (choose from "
                             f"{', '.join(map(str, meta['choices']))})")
        if meta["check"] is not None:
            try:
                meta["check"](value)
            except (ValueError, TypeError) as exc:
                raise UsageError(f"argument {flag(name)}: {exc}")


def dp_on(cfg: Config) -> bool:
    """Differential privacy is asked for: DP-SGD in dp mode, client-level DP in fl mode."""
    if cfg.mode == "dp":
        return cfg.dp_sgd
    return cfg.dp_clip is not None or cfg.dp_noise is not None or cfg.dp_epsilon is not None


def pca_directions(cfg: Config) -> int:
    """K of DP-PCA when this run uses it (--dp-pca with --dp-sgd in dp mode), else 0."""
    return (cfg.dp_pca or 0) if cfg.mode == "dp" and cfg.dp_sgd else 0


def derived_defaults(cfg: Config) -> dict:
    """The values of the settings left None that derive from others (PLAIN_DEFAULTS, and
    DP_DEFAULTS when differential privacy is asked for)."""
    private = dp_on(cfg)
    table = dict(PLAIN_DEFAULTS)
    if private:
        table.update(dp_sgd_defaults(cfg.dp_epsilon) if cfg.mode == "dp" else DP_DEFAULTS["fl"])
    out: dict[str, Any] = {name: value for name, value in table.items() if getattr(cfg, name) is None}
    if cfg.server_lr is None:
        opt = out.get("server_opt", cfg.server_opt)
        out["server_lr"] = DEFAULT_SERVER_LR.get(opt, 1.0)
        if private and cfg.mode == "fl" and opt in ("fedavg", "fedavgm"):
            expected = cfg.client_fraction * cfg.num_clients
            out["server_lr"] = min(1.0, expected / DP_FULL_STEP_CLIENTS)
    return out


def validate(cfg: Config, world_size: int) -> None:
    """All checks of the settings alone and against the world size; raises UsageError (the same
    on every rank, since every rank computes it from the same inputs)."""
    check_fields(cfg)
    if cfg.mode == "dp" and cfg.batch_size < world_size:
        raise UsageError(f"--batch-size {cfg.batch_size} is smaller than the number of ranks "
                         f"({world_size}): every rank needs at least one sample per step")
    if cfg.mode == "fl":
        if world_size % cfg.ranks_per_client:
            raise UsageError(f"--ranks-per-client {cfg.ranks_per_client} does not divide the "
                             f"number of ranks ({world_size})")
        if cfg.local_batch_size < cfg.ranks_per_client:
            raise UsageError(f"--local-batch-size {cfg.local_batch_size} is smaller than "
                             f"--ranks-per-client {cfg.ranks_per_client}")
    _validate_privacy(cfg)
    _validate_robustness(cfg)
    _validate_applies(cfg)
    check_backend(cfg)
    if cfg.mode == "fl" and cfg.secure_agg:
        from .fl.partition import per_round
        from .fl.secure import check_settings  # the cryptography package: only when asked for

        check_settings(cfg, cfg.client_fraction * cfg.num_clients if dp_on(cfg)
                       else per_round(cfg.num_clients, cfg.client_fraction))
    if cfg.allreduce == "shm" and cfg.mode != "dp":
        raise UsageError("--allreduce shm is for --mode dp (fl clients reduce with fused, overlap or nccl)")
    if cfg.resume and not cfg.checkpoint_dir:
        raise UsageError("--resume needs --checkpoint-dir")
    if cfg.checkpoint_every and not cfg.checkpoint_dir:
        raise UsageError("--checkpoint-every needs --checkpoint-dir")
    for name in ("metrics", "out", "checkpoint_dir"):
        path = getattr(cfg, name)
        if path is not None and not str(path).strip():
            raise UsageError(f"{flag(name)}: empty path")


def check_backend(cfg: Config) -> None:
    """--allreduce against --backend (once more when auto has been resolved to a backend)."""
    if cfg.backend == "auto":
        return
    if cfg.allreduce == "overlap" and cfg.backend == "cupy":   # device collectives are blocking (comm.py)
        raise UsageError("--allreduce overlap works on host buffers only: with --backend cupy use "
                         "fused (MPI) or nccl")
    if cfg.allreduce == "shm" and cfg.backend == "cupy":
        raise UsageError("--allreduce shm sums host memory: with --backend cupy use fused or nccl")
    if cfg.allreduce == "nccl" and cfg.backend != "cupy":
        raise UsageError(f"--allreduce nccl sums GPU buffers: it needs --backend cupy (this run's "
                         f"backend is {cfg.backend})")


# The option a user of the other mode reaches for (a Flower user types --lr in fl mode).
COUNTERPART = {"lr": "local_lr", "epochs": "rounds", "batch_size": "local_batch_size",
               "momentum": "server_momentum", "optimizer": "server_opt", "max_steps": "rounds",
               "weight_decay": "mu", "dp_sgd": "dp_clip", "local_lr": "lr", "rounds": "epochs",
               "local_epochs": "epochs", "local_batch_size": "batch_size", "server_momentum": "momentum",
               "server_opt": "optimizer", "eval_every": None}
# Settings read only when another has a given value: (the setting, its values, why).
ONLY_WITH = {
    "momentum": ("optimizer", ("sgd",), "Adam's moment decay is fixed (beta1 0.9, beta2 0.999)"),
    "server_momentum": ("server_opt", ("fedavgm",), "use --server-opt fedavgm"),
    "server_beta1": ("server_opt", ("fedadam", "fedyogi", "fedadagrad"),
                     "use --server-opt fedadam, fedyogi or fedadagrad"),
    "server_beta2": ("server_opt", ("fedadam", "fedyogi"), "use --server-opt fedadam or fedyogi"),
    "server_eps": ("server_opt", ("fedadam", "fedyogi", "fedadagrad"),
                   "use --server-opt fedadam, fedyogi or fedadagrad"),
    "trim_fraction": ("aggregator", ("trimmed-mean",), "use --aggregator trimmed-mean"),
    "byzantine": ("aggregator", ("krum", "multi-krum"), "use --aggregator krum or multi-krum"),
    "krum_m": ("aggregator", ("multi-krum",), "use --aggregator multi-krum"),
    "scaffold_max_age": ("scaffold", (True,), "use --scaffold"),
    "alpha": ("partition", ("dirichlet",), "use --partition dirichlet"),
    "attack_scale": ("attack", ("signflip", "scale"), "use --attack signflip or scale"),
    "secagg_neighbors": ("secure_agg", (True,), "use --secure-agg"),
    "secagg_threshold": ("secure_agg", (True,), "use --secure-agg"),
    "secagg_range": ("secure_agg", (True,), "use --secure-agg"),
    "secagg_max_dropout": ("secure_agg", (True,), "use --secure-agg"),
    "secagg_corrupt_fraction": ("secure_agg", (True,), "use --secure-agg"),
    "dp_pca": ("dp_sgd", (True,), "DP-PCA is part of DP-SGD: use --dp-sgd"),
    "dp_pca_noise": ("dp_sgd", (True,), "DP-PCA is part of DP-SGD: use --dp-sgd"),
}


def not_applying(cfg: Config, name: str) -> str | None:
    """Why setting `name` is not read by this run (its mode, or a setting it depends on), or None."""
    f = FIELDS[name]
    if cfg.mode not in f.metadata["modes"]:
        other = next(m for m in f.metadata["modes"] if m != cfg.mode)
        hint = COUNTERPART.get(name)
        return (f"{flag(name)} applies to --mode {other} only, and this run is --mode {cfg.mode}"
                + (f": use {flag(hint)}" if hint else ""))
    if name in ONLY_WITH:
        setting, values, why = ONLY_WITH[name]
        if getattr(cfg, setting) not in values:
            value = getattr(cfg, setting)
            shown = ("on" if value else "off") if isinstance(value, bool) else value_text(value)
            return f"{flag(name)} is not read with {flag(setting)} {shown}: {why}"
    if name in ("dp_delta", "dp_noise_seed") and not dp_on(cfg):
        return (f"{flag(name)} is not read without differential privacy (--dp-sgd in dp mode; "
                "--dp-clip with --dp-noise or --dp-epsilon in fl mode)")
    return None


def _validate_applies(cfg: Config) -> None:
    """An option given that this run would ignore is refused by name, pointing at the one that
    applies: silently training with another learning rate than the one typed is worse."""
    for name, f in FIELDS.items():
        if f.metadata["cli"] and cfg.given(name):
            why = not_applying(cfg, name)
            if why:
                raise UsageError(why)


def derived(cfg: Config) -> dict:
    """The settings of this run that were derived from others (not given), with their values."""
    return {n: getattr(cfg, n) for n in cfg._derived if not_applying(cfg, n) is None}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(map(_toml_value, value)) + "]"
    if isinstance(value, str):
        return json.dumps(value)              # a TOML basic string is a JSON string
    return repr(value)


def to_toml(cfg: Config, notes: dict | None = None) -> str:
    """The settings of the run's mode as TOML that --config loads back to the same Config: unset
    settings as comments, derived ones marked `# derived`, `notes` (name -> text) as comments."""
    notes = notes or {}
    made = derived(cfg)
    lines = [f"# hpcfl {cfg.mode} run: python -m hpcfl --config FILE (command-line options override)"]
    for name, f in FIELDS.items():
        if cfg.mode not in f.metadata["modes"] or (name in cfg._derived and name not in made):
            continue
        value = getattr(cfg, name)
        note = f"  # {notes[name]}" if name in notes else "  # derived" if name in made else ""
        lines.append(f"# {name} = (not set){note}" if value is None else f"{name} = {_toml_value(value)}{note}")
    return "\n".join(lines) + "\n"


def _validate_privacy(cfg: Config) -> None:
    """Combinations of the privacy settings that cannot work (every rank alike)."""
    if cfg.mode == "dp" and cfg.secure_agg:
        raise UsageError("--secure-agg is for --mode fl (in dp mode there is no server to hide the "
                         "updates from)")
    if cfg.mode == "fl" and cfg.dp_sgd:
        raise UsageError("--dp-sgd is for --mode dp; in fl mode privacy is per client: --dp-clip with "
                         "--dp-noise or --dp-epsilon (DP-FedAvg)")
    asked = [flag(n) for n in ("dp_clip", "dp_noise", "dp_epsilon") if getattr(cfg, n) is not None
             and n not in cfg._derived]             # name what the user gave, not a default
    if cfg.mode == "dp" and asked and not cfg.dp_sgd:
        raise UsageError(f"{asked[0]} needs --dp-sgd in dp mode")
    if cfg.dp_sgd and cfg.allreduce == "overlap":
        raise UsageError("--dp-sgd needs every layer's per-sample norms before any weight gradient, so "
                         "there is nothing to overlap: use --allreduce fused (or nccl)")
    if cfg.dp_noise is not None and cfg.dp_epsilon is not None:
        raise UsageError("give --dp-noise or --dp-epsilon, not both: the noise is calibrated from the epsilon")
    if cfg.dp_pca_noise is not None and not cfg.dp_pca:
        raise UsageError("--dp-pca-noise is the noise of --dp-pca K: give K too (or leave it out)")
    if cfg.dp_pca and cfg.dp_noise is not None and cfg.dp_pca_noise is None:
        raise UsageError("--dp-pca with --dp-noise: give --dp-pca-noise SIGMA too (its default is sized "
                         "from --dp-epsilon, which this run does not give)")
    if dp_on(cfg) and cfg.dp_noise is None and cfg.dp_epsilon is None:
        raise UsageError(f"{asked[0] if asked else '--dp-sgd'} needs --dp-noise Z or --dp-epsilon E "
                         "(the noise, or the privacy budget it is calibrated for)")


def _validate_robustness(cfg: Config) -> None:
    """Settings of the robust aggregators, attacks and SCAFFOLD that cannot work."""
    if cfg.mode != "fl":
        return
    if cfg.secure_agg and cfg.aggregator != "mean":
        raise UsageError(f"--aggregator {cfg.aggregator} needs the individual client updates, and "
                         "--secure-agg hides them: use one or the other")
    if cfg.server_attack is not None and not cfg.secure_agg:
        raise UsageError("--server-attack simulates a malicious secure-aggregation server: it needs --secure-agg")
    if cfg.dp_colluders and not cfg.secure_agg:
        raise UsageError("--dp-colluders counts colluders against the noise shares of --secure-agg; "
                         "without it the server adds all the noise")
    if cfg.secure_agg and cfg.max_update_norm is not None:
        raise UsageError("--max-update-norm checks individual client updates, and --secure-agg hides them")
    if cfg.attack is not None and cfg.malicious_fraction == 0:
        raise UsageError(f"--attack {cfg.attack} needs --malicious-fraction F > 0 (which clients attack)")
    if cfg.malicious_fraction > 0 and cfg.attack is None:
        raise UsageError("--malicious-fraction needs --attack KIND")
    if cfg.aggregator == "norm-bounded" and cfg.max_update_norm is None:
        raise UsageError("--aggregator norm-bounded clips each update to --max-update-norm M: give M")
    if cfg.aggregator == "trimmed-mean" and not cfg.trim_fraction < 0.5:
        raise UsageError(f"--trim-fraction {cfg.trim_fraction} must be below 0.5: at least one value "
                         "per coordinate must remain")
    if cfg.scaffold and (cfg.aggregator != "mean" or cfg.secure_agg or dp_on(cfg)):
        raise UsageError("--scaffold works with --aggregator mean only, without --secure-agg or DP")
    if dp_on(cfg) and cfg.aggregator != "mean":
        raise UsageError(f"--aggregator {cfg.aggregator} with DP: the noise calibration assumes the "
                         "clipped mean (DP-FedAvg); use --aggregator mean")
    if cfg.mode == "fl" and cfg.aggregator in ("krum", "multi-krum") and not dp_on(cfg):
        m = max(1, int(round(cfg.client_fraction * cfg.num_clients)))
        if m <= 2 * cfg.byzantine + 2:
            raise UsageError(f"--aggregator {cfg.aggregator} needs more than 2f + 2 clients per round: "
                             f"{m} clients with --byzantine {cfg.byzantine} (f = {cfg.byzantine} needs at "
                             f"least {2 * cfg.byzantine + 3})")
        if cfg.krum_m is not None and not cfg.krum_m <= m:
            raise UsageError(f"--krum-m {cfg.krum_m} is more than the {m} clients per round")
