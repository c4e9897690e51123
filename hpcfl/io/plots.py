"""`python -m hpcfl plot`: runs' metrics (JSON Lines) as one figure.

Test accuracy and training loss against epoch or round, and against wall time (the running sum
of epoch_seconds / round_seconds), one line per run. Legends name each run by its file and by
the settings in which the runs differ, read from a config.json beside the metrics file or in its
model/ folder (what --out and the jobs in jobs/ write).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from ..errors import HpcflError, UsageError
from ..io.files import atomic_write


def read_run(path) -> list[dict]:
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read it ({exc.strerror or exc})")
    records = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                raise UsageError(f"{path}:{i}: not a JSON record")
    if not records:
        raise UsageError(f"{path}: no records")
    return records


def settings_of(path) -> dict:
    path = Path(path)
    for candidate in (path.parent / "config.json", path.parent / "model" / "config.json"):
        try:
            return json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
    return {}


def legends(paths, configs) -> list[str]:
    """File stem plus the settings that differ between the runs (a few, in a stable order)."""
    keys = sorted({k for c in configs for k in c})
    skip = {"metrics", "out", "checkpoint_dir", "data_dir", "quiet", "resume", "keep_checkpoints"}
    differ = [k for k in keys if k not in skip and len({json.dumps(c.get(k)) for c in configs}) > 1]
    names = []
    for path, c in zip(paths, configs):
        parts = [f"{k}={c.get(k)}" for k in differ[:4]]
        names.append(Path(path).stem + (f" ({', '.join(parts)})" if parts else ""))
    return names


def plot_runs(paths, output) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise HpcflError("plot needs matplotlib: pip install -e '.[plot]'") from None
    runs = [read_run(p) for p in paths]
    names = legends(paths, [settings_of(p) for p in paths])
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for records, name in zip(runs, names):
        unit = "round" if "round" in records[0] else "epoch"
        seconds = "round_seconds" if unit == "round" else "epoch_seconds"
        x = [r.get(unit) for r in records]
        wall, t = [], 0.0
        for r in records:
            t += float(r.get(seconds) or 0.0)
            wall.append(t)
        acc = [(xi, w, 100 * r["test_accuracy"]) for xi, w, r in zip(x, wall, records)
               if r.get("test_accuracy") is not None]
        loss = [r.get("train_loss") for r in records]
        if acc:
            axes[0][0].plot([a[0] for a in acc], [a[2] for a in acc], marker=".", label=name)
            axes[0][1].plot([a[1] for a in acc], [a[2] for a in acc], marker=".", label=name)
        axes[1][0].plot(x, loss, marker=".", label=name)
        axes[1][1].plot(wall, loss, marker=".", label=name)
        axes[0][0].set_xlabel(unit)
        axes[1][0].set_xlabel(unit)
    for ax in axes[0]:
        ax.set_ylabel("test accuracy (%)")
    for ax in axes[1]:
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
    for ax in (axes[0][1], axes[1][1]):
        ax.set_xlabel("wall time (s)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    output = Path(output)
    image = io.BytesIO()
    try:
        fig.savefig(image, dpi=110, format=output.suffix.lstrip(".") or "png")
    except ValueError as exc:     # an unknown format
        raise UsageError(f"-o {output}: {exc}")
    finally:
        plt.close(fig)
    try:
        atomic_write(output, lambda f: f.write(image.getvalue()))
    except OSError as exc:
        raise UsageError(f"-o {output}: cannot write it ({exc.strerror or exc})")
    return str(output)
