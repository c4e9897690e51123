"""Flower 1.42's plain FedAvg and SecAgg+ in the setting of hpcfl's secure-aggregation benchmark,
for benchmarks/secagg_cost.py's "Flower FedAvg" / "Flower SecAgg+" rows.

It needs a separate environment with Flower (not hpcfl's .venv; torch is not needed):

    python3 -m venv /work/flwr-venv
    /work/flwr-venv/bin/pip install "flwr[simulation]==1.42.*" numpy
    HPCFL_DATA_DIR=/path/to/mnist /work/flwr-venv/bin/python benchmarks/flower_secagg.py --rounds 10 --secagg 1

and prints on stdout one line

    RESULT {"rounds": [{"round": 1, "round_seconds": ...}, ...], "wall_seconds": ..., "flwr_version": ...,
            "test_accuracy": ..., "secagg": {...} or null, ...}

(Flower's and Ray's own log goes to stderr; --verbose shows Flower's INFO log).

Setting (the FedAvg paper's MNIST 2NN, as hpcfl's `--mode fl --hidden 200,200 --local-epochs 1
--local-batch-size 10 --local-lr 0.1 --num-clients 100 --client-fraction 0.1`):
  - model: MLP 784-200-200-10, ReLU, softmax cross-entropy; float32; He-normal weights and zero
    biases (as hpcfl's init_params); forward and backward written in NumPy (no torch);
  - data: MNIST's 60,000 training images from the IDX files in $HPCFL_DATA_DIR (or --data-dir),
    pixels /255 then (x - 0.1307) / 0.3081; IID: a seeded permutation cut into 100 shards of 600;
  - 100 virtual clients (SuperNodes of Flower's simulation engine, `flwr.simulation.run_simulation`
    on the Ray backend), 10 sampled per round by the legacy `FedAvg` strategy (fraction_fit 0.1);
  - each sampled client: E = 1 local epoch, batches of B = 10 (60 steps), plain SGD, lr 0.1, batch
    order seeded by (seed, round, client);
  - the server: FedAvg, example-weighted (every client holds 600, so a plain mean);
  - --secagg 0: `DefaultWorkflow()` (Flower's default fit workflow), ClientApp without mods;
  - --secagg 1: `DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))` in the ServerApp and
    `secaggplus_mod` on the ClientApp, as in Flower's example examples/flower-secure-aggregation,
    with that example's values: num_shares = 3, reconstruction_threshold = 2, max_weight = 9000
    (SecAggPlusWorkflow itself has no defaults for the first two), no timeout, and the workflow's
    defaults clipping_range = 8.0, quantization_range = 2**22, modulus_range = 2**32. With 10
    sampled clients, num_shares = 3 means each client shares its secrets with 2 neighbours on a
    ring (SecAgg+'s sparse graph), any 2 of the 3 shares reconstruct. Each client uploads its
    parameters (not the update) times num_examples / max_weight, clipped to +-8 and stochastically
    quantized to 22 bits, plus masks mod 2**32: the aggregate carries a small quantization noise.
  - no evaluation during the run (hpcfl runs with --eval-every 1000); the final global model's
    accuracy on the 10,000 test images is computed after the last round, outside the timings.
  - Ray: num_cpus = 2 (the cluster), 1 CPU per ClientApp actor, hence 2 actors training clients
    concurrently; BLAS single-threaded; Ray's log kept off the driver; Flower's telemetry off.

Timing: `round_seconds` is the wall time of the fit workflow of each round (configure_fit, the
messages to and from the 10 clients, their training, and the aggregation; for SecAgg+ its four
stages: setup, share_keys, collect_masked_vectors, unmask, whose own wall times are in
`flower_stages`; "collect_masked_vectors" holds the clients' local training as well, so these are
NOT comparable stage by stage with hpcfl's `secagg_stages`). Round 1 also holds the Ray actors'
start-up and every actor's first load of MNIST. Flower's simulation engine polls: it hands queued
messages to the ClientApps every 0.1 s and the ServerApp's InMemoryGrid pulls replies every 0.1 s
(Flower's defaults, kept here), so every message exchange costs about 0.1-0.2 s whatever the work:
one exchange per plain round, four per SecAgg+ round. `wall_seconds` is the whole run_simulation call
(Ray start-up and shutdown included); `script_seconds` the whole script.

Comparable with hpcfl's MPI run: the model, data split, hyperparameters, clients per round and
the per-round wall time on the same 2 cores (secagg_cost.py runs hpcfl with 2 MPI ranks; here 2
Ray actors plus the server thread share the same cores). NOT comparable: Flower simulates every
client in a Ray actor and moves every message through its in-memory SuperLink (serialisation and
scheduling costs that hpcfl's MPI collectives do not have); SecAgg+ here uses num_shares = 3 (a
ring of 3) where hpcfl's `--secure-agg` at 10 clients makes every sampled client a share holder;
Flower's SecAgg+ quantizes the weighted parameters (22 bits, clipping +-8) while hpcfl's masking
scheme is its own; the random sampling of clients (Python's `random`, unseeded in Flower's
ClientManager) differs from hpcfl's seeded sampling, and the models are not bitwise identical.
"""
from __future__ import annotations

import os

# Before numpy is imported here and in Ray's workers (they inherit this environment).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import argparse
import gzip
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np

MEAN, STD = 0.1307, 0.3081
LAYERS = (784, 200, 200, 10)
NUM_CLIENTS, FRACTION, SAMPLE_SIZE = 100, 0.1, 600
# Flower's examples/flower-secure-aggregation/pyproject.toml
NUM_SHARES, RECONSTRUCTION_THRESHOLD, MAX_WEIGHT = 3, 2, 9000.0

# ---------------------------------------------------------------- data (one copy per process)

_DATA: dict = {}


def read_idx(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _idx(data_dir: Path, name: str) -> np.ndarray:
    for p in (data_dir / f"{name}.gz", data_dir / name):
        if p.is_file():
            return read_idx(p)
    raise FileNotFoundError(f"{data_dir}: neither {name}.gz nor {name}")


def load_split(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images n x 784, int64 labels) of "train" or "t10k", cached in this process."""
    key = (data_dir, split)
    if key not in _DATA:
        x = _idx(Path(data_dir), f"{split}-images-idx3-ubyte")
        y = _idx(Path(data_dir), f"{split}-labels-idx1-ubyte")
        _DATA[key] = (x.reshape(len(x), -1), y.astype(np.int64))
    return _DATA[key]


def normalise(x_uint8: np.ndarray) -> np.ndarray:
    return ((x_uint8.astype(np.float32) / np.float32(255.0)) - np.float32(MEAN)) / np.float32(STD)


def iid_shard(n: int, num_clients: int, client: int, seed: int) -> np.ndarray:
    perm = np.random.default_rng([seed, 0x11D]).permutation(n)
    size = n // num_clients
    return np.sort(perm[client * size:(client + 1) * size])


# ---------------------------------------------------------------- the 2NN in NumPy

def init_params(seed: int) -> list[np.ndarray]:
    """[W1, b1, W2, b2, W3, b3], W of shape (fan_in, fan_out): He-normal weights, zero biases."""
    rng = np.random.default_rng([seed, 0x5EED])
    params = []
    for fan_in, fan_out in zip(LAYERS[:-1], LAYERS[1:]):
        params.append(rng.standard_normal((fan_in, fan_out), dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in)))
        params.append(np.zeros(fan_out, dtype=np.float32))
    return params


def forward(params: list[np.ndarray], x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    acts, h = [x], x
    n_layers = len(params) // 2
    for i in range(n_layers):
        h = h @ params[2 * i] + params[2 * i + 1]
        if i < n_layers - 1:
            h = np.maximum(h, np.float32(0.0))
            acts.append(h)
    return h, acts


def sgd_step(params: list[np.ndarray], x: np.ndarray, y: np.ndarray, lr: float) -> float:
    """One SGD step on the batch's mean cross-entropy, in place; returns the loss."""
    logits, acts = forward(params, x)
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = len(y)
    loss = float(-np.log(np.maximum(p[np.arange(n), y], 1e-30)).mean())
    g = p
    g[np.arange(n), y] -= np.float32(1.0)
    g /= np.float32(n)
    lr32 = np.float32(lr)
    for i in reversed(range(len(params) // 2)):
        W, a = params[2 * i], acts[i]
        gW, gb = a.T @ g, g.sum(axis=0)
        if i > 0:
            g = (g @ W.T) * (a > 0)
        W -= lr32 * gW
        params[2 * i + 1] -= lr32 * gb
    return loss


def accuracy(params: list[np.ndarray], x_uint8: np.ndarray, y: np.ndarray) -> float:
    correct = 0
    for s in range(0, len(y), 2000):
        logits, _ = forward(params, normalise(x_uint8[s:s + 2000]))
        correct += int((logits.argmax(axis=1) == y[s:s + 2000]).sum())
    return correct / len(y)


# ---------------------------------------------------------------- Flower ClientApp

def _client_app(secagg: bool):
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod

    class MlpClient(NumPyClient):
        def __init__(self, partition_id: int):
            self.partition_id = partition_id

        def fit(self, parameters, config):
            data_dir, seed = str(config["data_dir"]), int(config["seed"])
            lr, B, E = float(config["lr"]), int(config["batch_size"]), int(config["local_epochs"])
            x_all, y_all = load_split(data_dir, "train")
            idx = iid_shard(len(y_all), int(config["num_clients"]), self.partition_id, seed)
            x, y = normalise(x_all[idx]), y_all[idx]
            params = [np.array(a, dtype=np.float32) for a in parameters]   # SecAgg+ hands float64
            for e in range(E):
                order = np.random.default_rng([seed, int(config["server_round"]), self.partition_id, e]
                                              ).permutation(len(y))
                for s in range(0, len(order), B):
                    b = order[s:s + B]
                    sgd_step(params, x[b], y[b], lr)
            return params, len(y), {}

        def evaluate(self, parameters, config):   # not used: fraction_evaluate = 0
            return 0.0, 1, {}

    def client_fn(context):
        return MlpClient(int(context.node_config["partition-id"])).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if secagg else [])


# Module-level, so that Ray's workers unpickle them by reference (import flower_secagg) and keep
# one copy of MNIST per worker process in _DATA, instead of a copy of this module's globals per call.
CLIENT_APP_PLAIN = None
CLIENT_APP_SECAGG = None


def client_app(secagg: bool):
    global CLIENT_APP_PLAIN, CLIENT_APP_SECAGG
    if secagg:
        CLIENT_APP_SECAGG = CLIENT_APP_SECAGG or _client_app(True)
        return CLIENT_APP_SECAGG
    CLIENT_APP_PLAIN = CLIENT_APP_PLAIN or _client_app(False)
    return CLIENT_APP_PLAIN


# ---------------------------------------------------------------- Flower ServerApp

def server_app(args, out: dict):
    """The ServerApp; it runs in a thread of this process and fills `out`."""
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
    from flwr.server.workflow.default_workflows import default_fit_workflow

    stages: dict[int, dict] = {}

    class TimedSecAggPlus(SecAggPlusWorkflow):
        """SecAggPlusWorkflow with the wall time of each of its four stages recorded."""

        def _timed(self, name, stage, grid, context, state):
            t0 = time.perf_counter()
            ok = stage(grid, context, state)
            stages.setdefault(len(out["rounds"]) + 1, {})[name] = time.perf_counter() - t0
            return ok

        def setup_stage(self, grid, context, state):
            return self._timed("setup", super().setup_stage, grid, context, state)

        def share_keys_stage(self, grid, context, state):
            return self._timed("share_keys", super().share_keys_stage, grid, context, state)

        def collect_masked_vectors_stage(self, grid, context, state):
            return self._timed("collect_masked_vectors", super().collect_masked_vectors_stage, grid, context, state)

        def unmask_stage(self, grid, context, state):
            return self._timed("unmask", super().unmask_stage, grid, context, state)

    if args.secagg:
        inner = TimedSecAggPlus(num_shares=args.num_shares, reconstruction_threshold=args.reconstruction_threshold,
                                max_weight=args.max_weight)
        out["secagg"] = {"workflow": "SecAggPlusWorkflow", "num_shares": inner.num_shares,
                         "reconstruction_threshold": inner.reconstruction_threshold, "max_weight": inner.max_weight,
                         "clipping_range": inner.clipping_range, "quantization_range": inner.quantization_range,
                         "modulus_range": inner.modulus_range, "timeout": inner.timeout}
    else:
        inner = default_fit_workflow

    def timed_fit(grid, context):
        r = len(out["rounds"]) + 1
        t0 = time.perf_counter()
        inner(grid, context)
        rec = {"round": r, "round_seconds": time.perf_counter() - t0}
        if r in stages:
            rec["flower_stages"] = stages[r]
        out["rounds"].append(rec)
        if args.verbose:
            print(f"round {r}: {rec['round_seconds']:.3f} s", file=sys.stderr, flush=True)

    def fit_config(server_round: int) -> dict:
        return {"server_round": server_round, "data_dir": args.data_dir, "seed": args.seed, "lr": 0.1,
                "batch_size": 10, "local_epochs": 1, "num_clients": NUM_CLIENTS}

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        strategy = FedAvg(fraction_fit=FRACTION, fraction_evaluate=0.0,
                          min_fit_clients=int(NUM_CLIENTS * FRACTION), min_evaluate_clients=0,
                          min_available_clients=NUM_CLIENTS, on_fit_config_fn=fit_config,
                          initial_parameters=ndarrays_to_parameters(init_params(args.seed)))
        context = LegacyContext(context=context, config=ServerConfig(num_rounds=args.rounds), strategy=strategy)
        DefaultWorkflow(fit_workflow=timed_fit)(grid, context)
        arrays = context.state.array_records[MAIN_PARAMS_RECORD]
        out["final_params"] = [np.asarray(a, dtype=np.float32) for a in arrays.to_numpy_ndarrays()]

    return app


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    import flwr
    from flwr.simulation import run_simulation

    t_script = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--secagg", type=int, choices=(0, 1), default=0, help="1: SecAgg+ (SecAggPlusWorkflow)")
    p.add_argument("--data-dir", default=os.environ.get("HPCFL_DATA_DIR"),
                   help="folder of MNIST's IDX files (default: $HPCFL_DATA_DIR)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpus", type=int, default=2, help="Ray's CPUs (one per ClientApp actor)")
    p.add_argument("--num-shares", type=int, default=NUM_SHARES)
    p.add_argument("--reconstruction-threshold", type=int, default=RECONSTRUCTION_THRESHOLD)
    p.add_argument("--max-weight", type=float, default=MAX_WEIGHT)
    p.add_argument("--verbose", action="store_true", help="Flower's INFO log and each round's time on stderr")
    args = p.parse_args(argv)
    if not args.data_dir:
        p.error("no MNIST folder: set $HPCFL_DATA_DIR or pass --data-dir")
    args.data_dir = str(Path(args.data_dir).expanduser().resolve())
    x_test, y_test = load_split(args.data_dir, "t10k")   # fails early on a wrong folder
    load_split(args.data_dir, "train")

    if not args.verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore")

    out: dict = {"rounds": []}
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": args.cpus, "num_gpus": 0, "logging_level": "ERROR", "log_to_driver": False,
                      "include_dashboard": False},
    }
    t0 = time.perf_counter()
    run_simulation(server_app=server_app(args, out), client_app=client_app(bool(args.secagg)),
                   num_supernodes=NUM_CLIENTS, backend_config=backend_config, verbose_logging=args.verbose)
    wall = time.perf_counter() - t0
    if len(out["rounds"]) != args.rounds or "final_params" not in out:
        print(f"flower_secagg: the run did not finish: {len(out['rounds'])} of {args.rounds} rounds",
              file=sys.stderr)
        return 1
    acc = accuracy(out.pop("final_params"), x_test, y_test)
    result = {
        "rounds": out["rounds"], "wall_seconds": wall, "script_seconds": time.perf_counter() - t_script,
        "flwr_version": flwr.__version__, "test_accuracy": acc, "num_clients": NUM_CLIENTS,
        "clients_per_round": int(NUM_CLIENTS * FRACTION), "local_epochs": 1, "batch_size": 10, "lr": 0.1,
        "ray_cpus": args.cpus, "seed": args.seed,
        "secagg": out.get("secagg"),
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    # Run the module under its own name, so that cloudpickle sends the ClientApp to Ray's workers
    # by reference (they import flower_secagg: this folder is on the PYTHONPATH Flower gives them).
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import flower_secagg

    sys.exit(flower_secagg.main())
