"""python -m hpcfl: the command line (cli.py)."""
import sys

_package = sys.modules.get(__package__ or "hpcfl")
if _package is not None and getattr(_package, "__file__", None) is None:
    # A folder named hpcfl in the current directory (a clone, run from the folder above it) is a
    # namespace package that Python finds before the installed one: only this file of ours runs.
    import os

    shadow = next(iter(getattr(_package, "__path__", [])), "./hpcfl")
    rank = next((os.environ[v] for v in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID") if v in os.environ), "0")
    if rank == "0":                               # one message for the job, every rank exits 2
        sys.stderr.write(f"hpcfl: error: the folder {shadow} shadows the installed hpcfl package (Python looks in "
                         f"the current folder first, and finds no hpcfl/__init__.py there): run from another folder, "
                         f"or from inside {shadow}, or use the 'hpcfl' command\n")
    sys.exit(2)

from .cli import run  # noqa: E402  (after the check above: it needs the real package)

run()
