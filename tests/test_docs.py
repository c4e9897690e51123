"""The documentation as a reader meets it: every command in a bash block of README.md and
docs/ runs, in a fresh folder, at smaller sizes (the rules: SMALLER and smaller()); both Python
examples run; every hpcfl command parses into settings that validate; every link finds its file
and heading. What cannot run here is listed with the reason (SETUP)."""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DATA_DIR, ROOT, mpirun_cmd, needs_mnist

from hpcfl import UsageError, cli

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Lines the tests do not run, and why (every other line runs).
SETUP = {
    "python3 -m venv": "sets up the environment these tests run in",
    "pip install": "the environment these tests run in has the extras (CI installs them per the README)",
    "python -m pytest": "the tests themselves",
    "module load": "a cluster's environment modules",
    "sudo apt-get": "a system package (CI installs dataset-fashion-mnist from Debian)",
}

# How a command is made smaller before it runs: (pattern, replacement), in this order. Then a dp
# training command without --checkpoint-dir gets --max-steps 20, an fl one without --rounds gets
# --rounds 1, and every run uses 2 ranks (smaller()).
SMALLER = [
    (r"--rounds \d+", "--rounds 1"),                # fl: 1 round
    (r"rounds=\d+", "rounds=1"),                    # ... through the API
    (r"--epochs \d+", "--epochs 1"),                # dp: one epoch at most
    (r"--epochs 1(?=.*--checkpoint-dir)", "--epochs 6"),    # the checkpoint recipe: long enough
    (r"sleep \d+", "sleep 1.5"),                    # ... to be killed while it trains
    (r"; wait$", "; wait $! || code=$?; test \"${code:-0}\" -eq 75"),   # ... and to stop with 75
    (r"^(HPCFL_ARGS=(?:\"[^\"]*\"|\S+) \\? *)?sbatch (--\S+ )*", r"\1bash "),   # a batch script's dry run
    (r"(?<=\s)jobs/", f"{ROOT}/jobs/"),                  # (tests/test_slurm.py submits them to SLURM)
    (r"~/.cache/hpcfl/mnist", str(DATA_DIR)),       # where the quick start put MNIST
    (r"(--dp-epsilon \S+)", r"\1 --dp-noise-seed 1"),  # DP: the same noise and sample every time (a
]                                                   # secure round falls short of survivors 5% of the time)


def blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), re.S)


def lines(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = block.replace("\\\n", " ")
    out = [re.sub(r"\s+#\s.*$", "", ln).strip() for ln in joined.splitlines()]
    return [ln for ln in out if ln and not ln.startswith("#")]


def setup_reason(line: str) -> str | None:
    return next((why for start, why in SETUP.items() if line.startswith(start)), None)


def hpcfl_argv(line: str) -> tuple[int, list[str]] | None:
    """(ranks, argv) of a `[mpirun -n N] python -m hpcfl ARGV` line, else None."""
    words = shlex.split(line)
    if "hpcfl" not in words or words[words.index("hpcfl") - 1] != "-m":
        return None
    ranks = int(words[words.index("-n") + 1]) if words[0] == "mpirun" else 1
    argv = words[words.index("hpcfl") + 1:]
    return ranks, argv[:argv.index("&")] if "&" in argv else argv


@functools.lru_cache(None)
def have_gpu() -> bool:
    from hpcfl import backends

    return backends.available()["cupy"] == "ok"


def smaller(line: str, where: Path | None = None) -> str:
    """The line at the tests' sizes, with the MPI and the Python they run with."""
    for pattern, new in SMALLER:
        line = re.sub(pattern, new, line)
    if where is not None:                               # a cluster's shared folder: here, tmp
        line = line.replace("/project/me/", f"{where}/project/me/")
    parsed = hpcfl_argv(line)
    if parsed and (not parsed[1] or parsed[1][0].startswith("-")) and not {"--help", "--version"} & set(parsed[1]):
        argv = parsed[1]
        extra = ("--rounds 1" if "--rounds" not in argv else "") if "fl" in argv else \
                ("--max-steps 20" if "--checkpoint-dir" not in argv else "")
        if extra:
            line = f"{line[:-2]} {extra} &" if line.endswith(" &") else f"{line} {extra}"
    line = re.sub(r"^mpirun -n \d+ ", " ".join(mpirun_cmd(2)) + " ", line)
    if "--backend cupy" in line and not have_gpu():
        line += " || test $? -eq 2"                      # without a GPU: refused, exit 2, one message
    return re.sub(r"(^|\s)python(?=\s)", rf"\g<1>{sys.executable}", line)


def documented_blocks() -> list[tuple[str, str]]:
    """(id, block) of every bash block of README.md and docs/ with something to run."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for heading, body in re.findall(r"^##+ (.+?)\n(.*?)(?=^##|\Z)", text, re.S | re.M):
            for i, block in enumerate(re.findall(r"```bash\n(.*?)```", body, re.S)):
                if any(not setup_reason(line) for line in lines(block)):
                    out.append((f"{path.name}: {heading}" + (f" ({i + 1})" if i else ""), block))
    return out


def outputs(line: str) -> list[str]:
    parsed = hpcfl_argv(line)
    if parsed is None:
        return []
    argv = parsed[1]
    return [argv[i + 1] for i, w in enumerate(argv[:-1]) if w in ("--metrics", "--out", "-o", "--onnx")]


@needs_mnist
@pytest.mark.parametrize("block", [b for _, b in documented_blocks()], ids=[n for n, _ in documented_blocks()])
def test_every_documented_command_runs(block, tmp_path):
    if "/usr/share/datasets/fashion-mnist" in block and not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed here")
    if " export " in block and importlib.util.find_spec("onnx") is None:
        pytest.skip('the onnx extra is not installed here (pip install -e ".[onnx]")')
    script = ["set -eo pipefail"] + [smaller(line, tmp_path) for line in lines(block) if not setup_reason(line)]
    env = {**os.environ, "HPCFL_DATA_DIR": str(DATA_DIR), "PYTHONUNBUFFERED": "1",
           "HPCFL_ARGS": "--max-steps 20",                  # the batch scripts' own settings, smaller
           "HPCFL_MNIST_URLS": DATA_DIR.as_uri() + "/",       # fetch-data "downloads" from here
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.setdefault("HPCFL_CACHE_DIR", str(tmp_path / "cache"))
    proc = subprocess.run(["bash", "-c", "\n".join(script)], capture_output=True, text=True, env=env,
                          timeout=600, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, "\n".join(script) + "\n" + out
    assert "Traceback" not in out, out
    for line in script:                                   # what each command says it writes
        for made in outputs(line):
            assert (tmp_path / made).exists(), (line, made, out)


@needs_mnist
@pytest.mark.parametrize("path", [ROOT / "README.md", ROOT / "docs" / "usage.md"], ids=["README", "usage"])
def test_the_python_examples_run(path, tmp_path):
    (block,) = blocks(path, "python")
    code = smaller(block)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "HPCFL_DATA_DIR": str(DATA_DIR)})
    assert proc.returncode == 0, code + proc.stdout + proc.stderr
    assert re.search(r"test accuracy 0\.\d{4}", proc.stdout), proc.stdout
    assert (tmp_path / "model" / "model.npz").is_file()


@functools.lru_cache(None)
def command_help(command: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "hpcfl", command, "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def every_command() -> list[tuple[str, str]]:
    """(file, line) of every command line in a bash block of the README and docs/."""
    return [(path.name, line) for path in DOCS for block in blocks(path, "bash") for line in lines(block)]


def test_every_hpcfl_command_in_the_docs_parses_into_valid_settings():
    checked = 0
    for where, line in every_command():
        if setup_reason(line):
            continue
        for value in re.findall(r"HPCFL_ARGS=(\"[^\"]*\"|'[^']*')", line):   # a batch job's options
            mode = ["--mode", "fl"] if "jobs/fl" in line else []          # the script's own mode
            cli.parse_config(mode + shlex.split(shlex.split(value)[0]), world_size=2)
            checked += 1
        parsed = hpcfl_argv(line)
        if parsed is None:
            code = re.sub(r"\s+#.*$", "", line)
            for script in re.findall(r"(?:benchmarks|jobs)/[\w.-]+\.(?:py|sbatch)", code):
                text = (ROOT / script).read_text()          # a script the docs name exists, with its options
                assert all(opt in text for opt in re.findall(r"(--[\w-]+)", code.split(script, 1)[1])), line
                checked += 1
            continue
        ranks, argv = parsed
        checked += 1
        if not argv or argv[0].startswith("-"):             # training
            if {"--help", "--version"} & set(argv):
                continue
            if "--config" in argv:                          # a file an earlier command wrote
                at = argv.index("--config")
                argv = argv[:at] + argv[at + 2:]
            try:
                cli.parse_config(argv, world_size=ranks)
            except UsageError as exc:
                pytest.fail(f"{where}: {line}\n  {exc}")
        elif argv[0] == "privacy":
            cli.parse_config(argv[1:], world_size=ranks)
        else:
            assert argv[0] in cli.COMMANDS, f"{where}: {line}"
            text = command_help(argv[0])
            unknown = [w for w in argv[1:] if w.startswith("-") and w.split("=")[0] not in text]
            assert not unknown, f"{where}: {line}: {unknown} not options of hpcfl {argv[0]}"
    assert checked > 40


def test_the_rules_that_shrink_the_commands_all_apply():
    # a rule that no longer matches anything hides a command that now runs at full size
    text = "\n".join(line for _, block in documented_blocks() for line in lines(block))
    text += "".join(blocks(ROOT / "README.md", "python"))
    for pattern, new in SMALLER:
        assert re.search(pattern, re.sub(r"--epochs \d+", "--epochs 1", text) if new == "--epochs 6" else text,
                         re.M), pattern
    assert smaller("mpirun -n 2 python -m hpcfl").endswith("-m hpcfl --max-steps 20")
    assert smaller("mpirun -n 2 python -m hpcfl --mode fl").endswith("--mode fl --rounds 1")
    assert smaller("python -m hpcfl evaluate --model m").endswith("-m hpcfl evaluate --model m")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_between_the_documents_finds_its_file_and_heading():
    pages = [*DOCS, *sorted((ROOT / "benchmarks").glob("*.md"))]
    broken = []
    for page in pages:
        text = page.read_text()
        refs = dict(re.findall(r"^\[([^\]]+)\]: (\S+)$", text, re.M))          # [name]: target
        targets = re.findall(r"\]\(([^)\s]+)\)", text) + [refs[n] for n in re.findall(r"\]\[([^\]]+)\]", text)
                                                          if n in refs]
        for target in targets:
            if re.match(r"[a-z]+:", target):
                continue                                                   # https:, mailto:
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and dest.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", dest.read_text(), re.M)
                if anchor not in {slug(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken
