"""Command line: `python -m hpcfl [train] [options]`, and the commands info, fetch-data,
evaluate, predict and plot. A thin layer: it parses, then calls the Python API (api.py).

Every rank parses the same argv, so a usage error is raised identically on every rank: each
exits with code 2 and only rank 0 prints the message. The options of `train` are generated from
the Config fields (config.py), with their help, check and default.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
from typing import Any

from . import config as config_mod
from .config import FIELDS, Config, flag, shown_default
from .errors import UsageError

GROUPS = {"mode": None, "training": "model and optimisation (dp)", "federated": "federated (--mode fl)",
          "privacy": "privacy and security", "robustness": "robustness and heterogeneity (--mode fl)",
          "data": "data", "machinery": "machinery", "output": "output",
          "checkpoints": "checkpoints and preemption"}


def prog(command: str | None = None) -> str:
    """The program as the user invoked it: `hpcfl` (the console script) or `python -m hpcfl`."""
    name = "hpcfl" if os.path.basename(sys.argv[0] if sys.argv else "") == "hpcfl" else "python -m hpcfl"
    return f"{name} {command}" if command else name


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing and exiting (which every rank would do), and
    takes no abbreviations (--epoch must not silently mean --epochs)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        if message.startswith("unrecognized arguments: "):
            flags = [o for a in self._actions for o in a.option_strings]
            first = message.split(": ", 1)[1].split()[0].split("=")[0]
            message += did_you_mean(first, flags)
        raise UsageError(f"{message} (see --help)", collective=True)

    def exit(self, status=0, message=None):
        if message:
            raise UsageError(message.strip(), collective=True)
        raise SystemExit(status)


def _value_parser(name: str, f):
    """text -> value for field f: converted by its annotation, then its own check."""
    kind = str(f.type)
    meta = f.metadata

    def parse(text: str) -> Any:
        value: Any
        if name == "hidden":
            try:
                value = config_mod.sizes_from_text(text)
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


COMMAND_HELP = {"train": "train a model (the default command)",
                "info": "MPI library, ranks, backends and GPU",
                "fetch-data": "download a catalogue data set and build its cache",
                "evaluate": "test accuracy, per-class accuracy and confusion matrix of a saved model",
                "predict": "the class of every image in a file",
                "plot": "accuracy and loss curves of runs",
                "export": "a saved model as ONNX, for ONNX Runtime and other serving stacks",
                "privacy": "the epsilon of given DP settings, or the noise of a target epsilon, without training"}


def train_parser() -> argparse.ArgumentParser:
    from . import __version__

    commands = ",".join(COMMAND_HELP)
    p = _Parser(prog=prog(), argument_default=argparse.SUPPRESS,
                usage=f"%(prog)s [{{{commands}}}] [options]",
                description="Train an MLP on MNIST (or a data set of its form) with MPI: data "
                            "parallel or federated. Run under mpirun/srun for several ranks.",
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="commands (%(prog)s COMMAND --help):\n"
                       + "".join(f"  {c:11s} {h}\n" for c, h in COMMAND_HELP.items())
                       + "\nexit codes: 0 done, 1 error, 2 bad usage, 75 stopped by SIGTERM/SIGUSR1 "
                         "(checkpointed:\nrun again with --resume); docs/reference.md lists "
                         "them all.")
    p.add_argument("--version", action="version", version=f"hpcfl {__version__}",
                   help="print the version and exit")
    p.add_argument("--config", metavar="FILE", help="settings from a TOML file or a config.json "
                   "written by --out; options given here override them")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings as TOML "
                   "(derived ones marked; loadable by --config) and exit without training")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, f in FIELDS.items():
        meta = f.metadata
        if not meta["cli"]:
            continue
        title = GROUPS[meta["group"]]
        g = p if title is None else groups.setdefault(title, p.add_argument_group(title))
        help_text = meta["help"]
        if "(default:" not in help_text:           # some spell out a derived default themselves
            help_text += f" (default: {shown_default(name, f.default)})"
        help_text = help_text.replace("%", "%%")    # argparse formats help with %
        if f.type in ("bool", bool):
            g.add_argument(flag(name), action=argparse.BooleanOptionalAction, help=help_text)
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
    given.pop("print_config", None)
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

    if "--print-config" in argv:
        cfg = parse_config(argv, world_size=comm.size)
        notes = comm.agree(lambda: _noise_note(cfg))
        if comm.rank == 0:
            sys.stdout.write(config_mod.to_toml(cfg, notes))
        return 0
    cfg = parse_config(argv)
    api.train(cfg, comm=comm, handle_signals=True, report_result=True)
    return 0


def privacy(comm, argv) -> int:
    """`hpcfl privacy [training options]`: the DP settings' epsilon, or the noise for a target
    epsilon, as the run would compute them (the data set's size from the catalogue, or the data)."""
    from .data import catalogue as datasets
    from .privacy import plan

    if "-h" in argv or "--help" in argv:
        return train(comm, argv)
    cfg = parse_config(argv, world_size=comm.size)
    if not config_mod.dp_on(cfg):
        raise UsageError("hpcfl privacy needs DP settings: --dp-sgd (dp mode) or --dp-clip with --dp-noise or "
                         "--dp-epsilon (fl mode)", collective=True)
    counts = getattr(datasets.CATALOGUE.get(cfg.dataset), "counts", None)
    if cfg.mode == "dp" and not counts:
        from . import api

        n_train = api.load_dataset(cfg.dataset, cfg.data_dir, comm=comm).n_train
    else:
        n_train = counts["train"] if counts else 0
    lines = comm.agree(lambda: plan.report(cfg, n_train))
    if comm.rank == 0:
        print("\n".join(lines))
    return 0


def _noise_note(cfg) -> dict:
    """--print-config: the noise multipliers --dp-epsilon calibrates to (privacy.plan.calibrate),
    where they can be computed without the data (fl mode; dp mode on a catalogue set of known size)."""
    from .data import catalogue as datasets
    from .privacy.plan import calibrate

    if not config_mod.dp_on(cfg) or cfg.dp_epsilon is None:
        return {}
    counts = getattr(datasets.CATALOGUE.get(cfg.dataset), "counts", None)
    if cfg.mode == "dp" and not counts:
        return {"dp_noise": "derived at start: calibrated to --dp-epsilon on the data's size"}
    sigma, z = calibrate(cfg, counts["train"] if counts and cfg.mode == "dp" else 0)
    note = {"dp_noise": f"derived at start: {z:.4g}, calibrated to --dp-epsilon {cfg.dp_epsilon:g}"
                        + (" after DP-PCA's share" if sigma else "")}
    if sigma and cfg.dp_pca_noise is None:
        note["dp_pca_noise"] = f"derived at start: {sigma:.4g}"
    return note


def info(comm, argv) -> int:
    from . import backends
    from .parallel import comm as comm_mod

    _Parser(prog=prog("info"), description="Show MPI, ranks, backends and GPU.").parse_args(argv)
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

    p = _Parser(prog=prog("fetch-data"),
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
    from .core.model import load_model

    p = _Parser(prog=prog("evaluate"),
                description="Test accuracy and loss of a saved model, per-class accuracy and the "
                            "confusion matrix (rows: true class, columns: predicted).")
    p.add_argument("--model", required=True, help="a folder written by --out, or a model .npz")
    _data_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ns = p.parse_args(argv)
    _model_exists(ns.model)
    model = comm.agree_all(lambda: load_model(ns.model))
    ds = api.load_dataset(ns.dataset or model.dataset, ns.data_dir, comm=comm)
    if (ds.input_size, ds.num_classes) != (model.input_size, model.sizes[-1]):
        raise UsageError(f"{ns.model} takes {model.input_size} inputs and {model.sizes[-1]} classes, "
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
    from .core.model import load_model

    p = _Parser(prog=prog("predict"),
                description="Predict the class of every image in FILE (an IDX images file, .gz or "
                            "raw, or a .npy of uint8 images): one label per line.")
    p.add_argument("--model", required=True, help="a folder written by --out, or a model .npz")
    p.add_argument("file", metavar="FILE", help="the images: IDX (.gz or raw) or .npy of uint8")
    ns = p.parse_args(argv)
    _model_exists(ns.model)

    def work():
        model = load_model(ns.model)
        return model.predict(_read_images(ns.file)).tolist()

    labels = comm.agree(work)
    if comm.rank == 0:
        sys.stdout.write("".join(f"{y}\n" for y in labels))
    return 0


def plot(comm, argv) -> int:
    from .io import plots

    p = _Parser(prog=prog("plot"),
                description="Test accuracy and training loss against epoch or round and against "
                            "wall time, one line per run (needs matplotlib: pip install -e '.[plot]').")
    p.add_argument("runs", nargs="+", metavar="RUN.jsonl", help="metrics files written by --metrics")
    p.add_argument("-o", "--output", required=True, metavar="FIGURE.png",
                   help="the figure to write (its suffix picks the format: .png, .pdf, .svg)")
    ns = p.parse_args(argv)
    where = comm.agree(lambda: plots.plot_runs(ns.runs, ns.output))
    if comm.rank == 0:
        print(f"wrote {where}")
    return 0


def export(comm, argv) -> int:
    from .io import export as export_mod

    p = _Parser(prog=prog("export"),
                description="Write a saved model as ONNX: input `pixels` (uint8, N x H x W), outputs "
                            "`logits` and `class`; the input normalisation is inside the graph "
                            "(needs the onnx package: pip install -e '.[onnx]').")
    p.add_argument("--model", required=True, help="a folder written by --out, or a model .npz")
    p.add_argument("--onnx", required=True, metavar="FILE", help="the ONNX file to write")
    ns = p.parse_args(argv)
    _model_exists(ns.model)
    where = comm.agree(lambda: export_mod.export(ns.model, ns.onnx))
    if comm.rank == 0:
        print(f"wrote {where}")
    return 0


def _model_exists(path: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"--model {path}: no such file or folder", collective=True)


COMMANDS = {"train": train, "info": info, "fetch-data": fetch_data, "evaluate": evaluate,
            "predict": predict, "plot": plot, "export": export, "privacy": privacy}


def _command(argv):
    """The command named first, else train; a word that names no command is refused (a mistyped
    `evalute` must not be trained on)."""
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]], argv[1:]
    if argv and not argv[0].startswith("-"):
        raise UsageError(f"unknown command {argv[0]!r}{did_you_mean(argv[0], COMMANDS)} (commands: "
                         f"{', '.join(COMMANDS)}; see --help)", collective=True)
    return train, argv


def _dispatch(comm, argv) -> int:
    from . import log

    log.configure(comm.rank)
    command, argv = _command(argv)
    try:
        return command(comm, argv)
    except SystemExit as exc:  # --help: printed on rank 0 only (below), exit 0 everywhere
        # as Python exits: an int as it is, None 0, anything else (a message) 1
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1


def main(argv: list[str] | None = None) -> int:
    from .runtime import preempt

    # First of all, before MPI_Init: a SIGTERM/SIGUSR1 during start-up must set the flag (the
    # run then stops at its first step with a checkpoint), not kill this rank.
    preempt.install()
    from .parallel.comm import run_main

    config_mod.SPELLING.set("cli")           # messages name --options, not Config keywords
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv or "--version" in argv:
        return _help(argv)
    return run_main(_dispatch, argv)


def run() -> None:
    """The command line's entry point (`python -m hpcfl`, `hpcfl`): main(), then the process ends
    without the interpreter's slow teardown (comm.exit_process)."""
    code = main()
    from .parallel.comm import exit_process

    exit_process(code)


def _launcher_rank() -> int:
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def _help(argv) -> int:
    """Print help (or the version) on rank 0 only; never touches data, backends or MPI."""
    if "--version" in argv and "-h" not in argv and "--help" not in argv:
        from . import __version__

        if _launcher_rank() == 0:
            print(f"hpcfl {__version__}")
        return 0
    try:
        _command(argv)
    except UsageError as exc:
        if _launcher_rank() == 0:
            print(f"hpcfl: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if _launcher_rank() == 0:
        parsers = {"info": lambda: _Parser(prog=prog("info"),
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


OPTIONS_BEGIN = "<!-- options table: generated by python -m hpcfl.cli options-table; do not edit -->"
OPTIONS_END = "<!-- end of options table -->"


def options_table() -> str:
    """docs/reference.md's table of the train options, from the Config fields."""
    rows, group = [], None
    for name, f in FIELDS.items():
        meta = f.metadata
        if not meta["cli"]:
            continue
        if meta["group"] != group:
            group = meta["group"]
            rows.append(f"| **{GROUPS[group] or 'mode'}** | | |")
        spelled = f"`{flag(name)}`" if f.type not in ("bool", bool) else f"`{flag(name)}`, `--no-{flag(name)[2:]}`"
        choices = f" ({', '.join(map(str, meta['choices']))})" if meta["choices"] else ""
        text = meta["help"].replace("|", "\\|")
        default = "" if "(default:" in text else shown_default(name, f.default).replace("|", "\\|")
        rows.append(f"| {spelled} | {default} | {text}{choices} |")
    return "\n".join(["| option | default | what it sets |", "|---|---|---|", *rows]) + "\n"


__all__ = ["main", "parse_config", "train_parser", "options_table", "dataclasses"]

if __name__ == "__main__" and sys.argv[1:] == ["options-table"]:
    sys.stdout.write(options_table())
