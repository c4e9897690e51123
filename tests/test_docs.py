"""The documentation as a reader meets it: every recipe of the README runs in a fresh folder (at
smaller sizes: the rules are SMALLER below), both Python examples run, and every hpcfl command in
README.md and docs/ parses into settings that validate. What cannot run here is listed with the
reason (SETUP)."""
from __future__ import annotations

import functools
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

# Lines the tests do not run, and why (a line that matches none of these runs, or is parsed).
SETUP = {
    "python3 -m venv": "sets up the environment these tests run in",
    "pip install": "the environment these tests run in has the extras (CI installs them per the README)",
    "python -m pytest": "the tests themselves",
    "module load": "a cluster's environment modules",
    "sudo apt-get": "a system package (CI installs dataset-fashion-mnist from Debian)",
}

# How a README recipe is made smaller before it runs: (pattern, replacement), in this order. A
# dp training command without --epochs or --max-steps gets --max-steps 20, an fl one without
# --rounds gets --rounds 2 (smaller()).
SMALLER = [
    (r"--rounds \d+", "--rounds 2"),                # fl: 2 rounds
    (r"rounds=\d+", "rounds=2"),                    # ... through the API
    (r"--epochs \d+", "--epochs 4"),                # the checkpoint recipe: long enough to be killed
    (r"sleep \d+", "sleep 4"),                      # ... in its first epochs
    (r"; wait$", "; wait $! || code=$?; test \"${code:-0}\" -eq 75"),   # ... and stop with 75
    (r"^(HPCFL_ARGS=(?:\"[^\"]*\"|\S+) )?sbatch ", r"\1bash "),   # a batch script's local dry run
    (r"(?<=\s)jobs/", f"{ROOT}/jobs/"),                                 # (tests/test_slurm.py: sbatch)
]


def blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), re.S)


def lines(block: str) -> list[str]:
    """The block's commands: continuation lines joined, blank lines and comment lines dropped."""
    joined = block.replace("\\\n", " ")
    return [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def setup_reason(line: str) -> str | None:
    return next((why for start, why in SETUP.items() if line.startswith(start)), None)


def hpcfl_argv(line: str) -> tuple[int, list[str]] | None:
    """(ranks, argv) of a `[mpirun -n N] python -m hpcfl ARGV` line, else None."""
    words = shlex.split(line, comments=True)
    if "hpcfl" not in words or words[words.index("hpcfl") - 1] != "-m":
        return None
    ranks = int(words[words.index("-n") + 1]) if words[0] == "mpirun" else 1
    at = words.index("hpcfl") + 1
    argv = words[at:]
    if "&" in argv:
        argv = argv[:argv.index("&")]
    return ranks, argv


def smaller(line: str) -> str:
    for pattern, new in SMALLER:
        line = re.sub(pattern, new, line)
    parsed = hpcfl_argv(line)
    if parsed and (not parsed[1] or parsed[1][0].startswith("-")):
        argv = parsed[1]
        extra = ("--rounds 2" if "--rounds" not in argv else "") if "fl" in argv else \
                ("--max-steps 20" if "--epochs" not in argv and "--max-steps" not in argv else "")
        if extra:
            line = line.replace(" &", f" {extra} &") if line.endswith("&") else f"{line} {extra}"
    # the MPI and the Python these tests run with (Open MPI wants its flags as root)
    line = re.sub(r"^mpirun -n (\d+) ", lambda m: " ".join(mpirun_cmd(int(m.group(1)))) + " ", line)
    return re.sub(r"(^|\s)python(?=\s)", rf"\g<1>{sys.executable}", line)


def readme_recipes() -> list[tuple[str, str]]:
    """(name, block) of every bash block of the README from the quick start on."""
    out = []
    text = (ROOT / "README.md").read_text()
    for heading, body in re.findall(r"^##+ (.+?)\n(.*?)(?=^##|\Z)", text, re.S | re.M):
        for block in re.findall(r"```bash\n(.*?)```", body, re.S):
            if any(not setup_reason(line) for line in lines(block)):
                out.append((heading, block))
    return out


@needs_mnist
@pytest.mark.parametrize("name,block", readme_recipes(), ids=[n for n, _ in readme_recipes()])
def test_every_readme_recipe_runs(name, block, tmp_path):
    script = ["set -eo pipefail"]
    for line in lines(block):
        if setup_reason(line):
            continue
        script.append(smaller(line))
    env = {**os.environ, "HPCFL_DATA_DIR": str(DATA_DIR), "PYTHONUNBUFFERED": "1",
           "HPCFL_ARGS": "--max-steps 20",                  # the batch scripts' own settings, smaller
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.setdefault("HPCFL_CACHE_DIR", str(tmp_path / "cache"))
    proc = subprocess.run(["bash", "-c", "\n".join(script)], capture_output=True, text=True, env=env,
                          timeout=600, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, "\n".join(script) + "\n" + out
    assert "Traceback" not in out, out
    for line in script:                                   # what each recipe says it leaves behind
        for made in re.findall(r"(?:--metrics|--out|-o|--onnx) (\S+)", line):
            assert (tmp_path / made).exists() or (ROOT / made).exists(), (made, out)


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


def test_the_rules_that_shrink_the_recipes_all_apply():
    # a rule that no longer matches anything hides a recipe that now runs at full size (or not at all)
    text = "\n".join(block for _, block in readme_recipes()) + "".join(blocks(ROOT / "README.md", "python"))
    for pattern, _ in SMALLER:
        assert re.search(pattern, text, re.M), pattern
    assert smaller("mpirun -n 2 python -m hpcfl").endswith("-m hpcfl --max-steps 20")
    assert smaller("mpirun -n 2 python -m hpcfl --mode fl").endswith("--mode fl --rounds 2")
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
