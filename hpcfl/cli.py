"""Command line: `python -m hpcfl [train] [options]`, and the commands info, fetch-data,
evaluate, predict and plot. A thin layer: it parses, then calls the Python API (api.py).

Every rank parses the same argv, so a usage error is raised identically on every rank: each
exits with code 2 and only rank 0 prints the message. The options of `train` are generated from
the Config fields (config.py), with their help, check and default.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from .config import FIELDS, Config, flag, shown_default
from .errors import UsageError

GROUPS = {"mode": None, "training": "model and optimisation (dp)", "federated": "federated (--mode fl)",
          "privacy": "privacy and security", "robustness": "robustness and heterogeneity (--mode fl)",
          "data": "data", "machinery": "machinery", "output": "output",
          "checkpoints": "checkpoints and preemption"}


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing and exiting (which every rank would do)."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)", collective=True)

    def exit(self, status=0, message=None):
        if message:
            raise UsageError(message.strip(), collective=True)
        raise SystemExit(status)


def _value_parser(name: str, f):
    """text -> value for field f: converted by its annotation, then its own check."""
    kind = str(f.type)
    meta = f.metadata

    def parse(text):
        if name == "hidden":
            try:
                value = tuple(int(t) for t in text.split(",") if t.strip())
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected comma-separated sizes like 256,128, got {text!r}")
        elif "int" in kind:
            try:
                value = int(text)
            except ValueError:
                what = "a positive int" if meta["check"].__name__ == "positive" else "an int"
                raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        elif "float" in kind:
            try:
                value = float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
        else:
            value = text
        if meta["check"] is not None:
            try:
                meta["check"](value)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc))
        return value

    parse.__name__ = name
    return parse


def train_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m hpcfl", argument_default=argparse.SUPPRESS,
                description="Train an MLP on MNIST (or a data set of its form) with MPI: data "
                            "parallel or federated. Run under mpirun/srun for several ranks.",
                epilog="Other commands: info, fetch-data, evaluate, predict, plot (python -m hpcfl "
                       "COMMAND --help). Exit codes: 0 done, 1 error, 2 bad usage, 75 stopped by "
                       "SIGTERM/SIGUSR1 (checkpointed: run again with --resume).")
    p.add_argument("--config", metavar="FILE", help="settings from a TOML file or a config.json "
                   "written by --out; options given here override them")
    groups = {}
    for name, f in FIELDS.items():
        meta = f.metadata
        if not meta["cli"]:
            continue
        title = GROUPS[meta["group"]]
        g = p if title is None else groups.setdefault(title, p.add_argument_group(title))
        help_text = f"{meta['help']} (default: {shown_default(name, f.default)})"
        if f.type in ("bool", bool):
            g.add_argument(flag(name), action="store_true", help=help_text)
        else:
            kind = str(f.type)
            metavar = meta["metavar"] or (None if meta["choices"] else "N" if "int" in kind
                                          else "X" if "float" in kind else "NAME")
            g.add_argument(flag(name), type=_value_parser(name, f), choices=meta["choices"],
                           metavar=metavar, help=help_text)
    return p


def parse_config(argv: list[str], world_size: int | None = None) -> Config:
    """The Config of `python -m hpcfl train ARGV`: --config's settings, then the options given."""
    given = vars(train_parser().parse_args(argv))
    settings = {}
    if "config" in given:
        settings = Config.from_file(given.pop("config"))
    settings.update(given)
    try:
        cfg = Config.from_dict(settings)
        if world_size is not None:
            from .config import validate

            validate(cfg, world_size)
    except UsageError as exc:
        exc.collective = True
        raise
    return cfg


def train(comm, argv) -> int:
    from . import api

    cfg = parse_config(argv)
    api.train(cfg, comm=comm, handle_signals=True)
    return 0


def info(comm, argv) -> int:
    from . import backends, comm as comm_mod

    _Parser(prog="python -m hpcfl info", description="Show MPI, ranks, backends and GPU.").parse_args(argv)
    avail = backends.available()
    hosts = comm.allgather(comm_mod.host_name())
    if comm.rank == 0:
        import numpy

        print(f"hpcfl {__import__('hpcfl').__version__}, Python {sys.version.split()[0]}, NumPy {numpy.__version__}")
        print(f"MPI: {comm_mod.library_version()}")
        print(f"ranks: {comm.size} on {len(set(hosts))} node(s): {', '.join(sorted(set(hosts)))}")
        for name, status in avail.items():
            print(f"backend {name:6s}: {status}")
        print(f"auto picks: {backends.resolve('auto')}")
        gpu = backends.gpu_description()
        print(f"GPU: {gpu or 'none usable'}")
    return 0


def _data_options(p, required=False):
    p.add_argument("--dataset", default=None if not required else "mnist",
                   help="a catalogue name (mnist, fashion-mnist, kmnist, emnist-digits, emnist-letters, "
                        "emnist-balanced), or idx / npz with --data-dir")
    p.add_argument("--data-dir", default=None, help="the data's folder (or .npz file)")


def fetch_data(comm, argv) -> int:
    from . import api

    p = _Parser(prog="python -m hpcfl fetch-data",
                description="Download a catalogue data set, verify its published checksums and build "
                            "the cache (run once on a login node with internet).")
    _data_options(p, required=True)
    ns = p.parse_args(argv)
    ds = api.load_dataset(ns.dataset, ns.data_dir, comm=comm)
    if comm.rank == 0:
        from . import data

        print(f"{ds.name} ready in {data.resolve_data_dir(ns.data_dir, ns.dataset)}: {ds.n_train} training "
              f"and {ds.n_test} test images of {'x'.join(map(str, ds.image_shape))}, {ds.num_classes} classes")
    return 0


def evaluate(comm, argv) -> int:
    from . import api
    from .inference import load_model

    p = _Parser(prog="python -m hpcfl evaluate",
                description="Test accuracy and loss of a saved model, per-class accuracy and the "
                            "confusion matrix (rows: true class, columns: predicted).")
    p.add_argument("--model", required=True, help="a folder written by --out, or a model .npz")
    _data_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ns = p.parse_args(argv)
    model = comm.agree_all(lambda: load_model(ns.model))
    ds = api.load_dataset(ns.dataset or model.dataset, ns.data_dir, comm=comm)
    if (ds.input_size, ds.num_classes) != (model.sizes[0], model.sizes[-1]):
        raise UsageError(f"{ns.model} takes {model.sizes[0]} inputs and {model.sizes[-1]} classes, "
                         f"but {ds.name} has {ds.input_size} and {ds.num_classes}", collective=True)
    if comm.rank == 0:
        r = model.evaluate(ds.test_x, ds.test_y)
        if ns.json:
            print(json.dumps({"dataset": ds.name, **r}))
        else:
            print(f"{ds.name} test set: {r['samples']} images, accuracy {100 * r['accuracy']:.2f}%, "
                  f"loss {r['loss']:.4f}")
            k = len(r["confusion"])
            print("class  accuracy   " + " ".join(f"{c:>5d}" for c in range(k)))
            for c in range(k):
                print(f"{c:5d}  {100 * r['per_class_accuracy'][c]:7.2f}%   "
                      + " ".join(f"{v:5d}" for v in r["confusion"][c]))
    return 0


def _read_images(path: str):
    import numpy as np

    from . import data

    if path.endswith(".npy"):
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: cannot read it as .npy ({exc})")
    return data.read_idx(path)


def predict(comm, argv) -> int:
    from .inference import load_model

    p = _Parser(prog="python -m hpcfl predict",
                description="Predict the class of every image in FILE (an IDX images file, .gz or "
                            "raw, or a .npy of uint8 images): one label per line.")
    p.add_argument("--model", required=True, help="a folder written by --out, or a model .npz")
    p.add_argument("file", metavar="FILE")
    ns = p.parse_args(argv)

    def work():
        model = load_model(ns.model)
        return model.predict(_read_images(ns.file)).tolist()

    labels = comm.agree(work)
    if comm.rank == 0:
        sys.stdout.write("".join(f"{y}\n" for y in labels))
    return 0


def plot(comm, argv) -> int:
    from . import plots

    p = _Parser(prog="python -m hpcfl plot",
                description="Test accuracy and training loss against epoch or round and against "
                            "wall time, one line per run (needs matplotlib: pip install -e '.[plot]').")
    p.add_argument("runs", nargs="+", metavar="RUN.jsonl")
    p.add_argument("-o", "--output", required=True, metavar="FIGURE.png")
    ns = p.parse_args(argv)
    where = comm.agree(lambda: plots.plot_runs(ns.runs, ns.output))
    if comm.rank == 0:
        print(f"wrote {where}")
    return 0


COMMANDS = {"train": train, "info": info, "fetch-data": fetch_data, "evaluate": evaluate,
            "predict": predict, "plot": plot}


def _dispatch(comm, argv) -> int:
    if argv and argv[0] in COMMANDS:
        command, argv = COMMANDS[argv[0]], argv[1:]
    else:
        command = train
    try:
        return command(comm, argv)
    except SystemExit as exc:  # --help: printed on rank 0 only (below), exit 0 everywhere
        return exc.code or 0


def main(argv: list[str] | None = None) -> int:
    from . import preempt

    # First of all, before MPI_Init: a SIGTERM/SIGUSR1 during start-up must set the flag (the
    # run then stops at its first step with a checkpoint), not kill this rank.
    preempt.install()
    from .comm import run_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        return _help(argv)
    return run_main(_dispatch, argv)


def run() -> None:
    """The command line's entry point (`python -m hpcfl`, `hpcfl`): main(), then the process ends
    without the interpreter's slow teardown (comm.exit_process)."""
    code = main()
    from .comm import exit_process

    exit_process(code)


def _launcher_rank() -> int:
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def _help(argv) -> int:
    """Print help on rank 0 only; never touches data, backends or MPI."""
    if _launcher_rank() == 0:
        parsers = {"info": lambda: _Parser(prog="python -m hpcfl info",
                                           description="Show MPI library, ranks, backends and GPU."),
                   "train": train_parser}
        if argv and argv[0] in COMMANDS and argv[0] not in parsers:
            try:                                     # the command builds its parser, then --help exits
                COMMANDS[argv[0]](_NoComm(), ["--help"])
            except SystemExit:
                pass
        else:
            (parsers[argv[0]] if argv and argv[0] in parsers else train_parser)().print_help()
    return 0


class _NoComm:
    """Stands in for a communicator while a command prints its --help (it never gets further)."""
    rank, size = 0, 1


__all__ = ["main", "parse_config", "train_parser", "dataclasses"]
