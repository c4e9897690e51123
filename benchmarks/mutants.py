"""The mutation check: named mutants the test suite must kill.

    python benchmarks/mutants.py                 # every mutant; writes benchmarks/results/mutants.csv
    python benchmarks/mutants.py --only dpsgd-realised-divisor
    python benchmarks/mutants.py --check         # CI: writes nothing, exits 1 if one survives

Each mutant is the smallest code change that breaks one claim the project makes (a privacy or
federated-learning property the README states), applied to a scratch copy of the tree; the
tests named beside it then run against that copy (PYTHONPATH points at it, the mpirun
subprocesses too). A mutant is *killed* when those tests fail, *survives* when they pass. The
list is explicit and kept current: every mutant's original text must occur exactly once in its
file (tests/test_structure.py checks that on every run, so a move of the code fails CI instead
of silently disarming a mutant). Exits 1 if a mutant survives or cannot be applied.
Writes mutants.csv and the section "The mutation check" of PRIVACY.md (between its markers).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
MARK_BEGIN, MARK_END = "<!-- mutants: begin -->", "<!-- mutants: end -->"


@dataclass(frozen=True)
class Mutant:
    name: str
    claim: str                       # what the mutant breaks
    path: str                        # the file it changes, from the repository root
    original: str                    # text that occurs exactly once in it
    mutated: str
    tests: tuple[str, ...]           # pytest node ids (or -k expressions after "::-k ") that must fail
    mpi: int = 0                     # run the tests under mpirun -n MPI (tests/mpi)


MUTANTS = [
    Mutant("secagg-share-keys-from-the-public-seed",
           "under secure aggregation a client's noise share comes from a key nobody else holds",
           "hpcfl/fl/secure.py", 'if self.plan.seeded\n', "if True\n",
           ("tests/test_private_fl.py::test_secure_dp_shares_are_secret_without_a_seed_and_seed_derived_only_with_one",)),
    Mutant("dp-pca-noise-over-100", "DP-PCA adds noise at the scale its epsilon is accounted for",
           "hpcfl/privacy/mechanisms.py", "e[upper] = sigma * noise.standard_normal",
           "e[upper] = sigma / 100 * noise.standard_normal",
           ("tests/test_dp_pca.py::test_the_release_is_the_gram_matrix_plus_noise_at_the_asked_scale",)),
    Mutant("dpsgd-realised-divisor", "DP-SGD divides by the expected batch B, not the realised size",
           "hpcfl/training/dataparallel.py", "denominator, self.noise.step = float(B), self.step",
           "denominator, self.noise.step = float(len(batch)), self.step",
           ("tests/test_weighting.py::test_one_dp_sgd_step_is_lr_times_the_poisson_samples_gradient_sum_over_the_expected_batch",)),
    Mutant("dpsgd-fixed-size-batches", "DP-SGD's batches are Poisson samples (each sample independently)",
           "hpcfl/privacy/sampling.py", "return np.flatnonzero(noise.bernoulli(key, step, n, q)).astype(np.int64)",
           "return np.sort(np.random.default_rng([seed, step]).choice(n, round(n * q), replace=False))"
           ".astype(np.int64)",
           ("tests/test_weighting.py::test_one_dp_sgd_step_is_lr_times_the_poisson_samples_gradient_sum_over_the_expected_batch",
            "tests/test_privacy.py::test_poisson_batch_size_is_binomial")),
    Mutant("fl-fixed-size-client-sampling", "DP-FedAvg samples clients by Poisson sampling from the CSPRNG",
           "hpcfl/fl/partition.py", "return np.flatnonzero(noise.bernoulli(key, server_round, num_clients, rate))",
           "return sample_clients(num_clients, rate, server_round, seed % 2**32)",
           ("tests/test_privacy.py::test_finding_8_poisson_batches_and_client_samples_come_from_the_csprng",)),
    Mutant("fedavg-equal-weights", "FedAvg weights each client by its example count n_k",
           "hpcfl/fl/collectors.py", "delta *= u.num_examples / u.steps if self.fednova else u.num_examples\n"
           "        buf[:n] += delta\n        buf[n:n + 4] += (u.num_examples,",
           "delta *= 1.0 / u.steps if self.fednova else 1.0\n        buf[:n] += delta\n        buf[n:n + 4] += (1,",
           ("tests/test_weighting.py::test_fedavg_weights_clients_by_their_example_counts",)),
    Mutant("fednova-as-a-plain-mean", "with stragglers the server step is FedNova's",
           "hpcfl/fl/collectors.py", "self.fednova = bool(cfg and cfg.straggler_rate > 0)", "self.fednova = False",
           ("tests/test_weighting.py::test_fednova_normalises_a_stragglers_update_by_its_steps",)),
    Mutant("epsilon-not-restored-on-resume", "a resumed run composes every earlier release (the ledger)",
           "hpcfl/privacy/plan.py", "if not self.secure and released:", "if False:",
           ("tests/test_private_fl.py::test_finding_4_a_redone_epoch_draws_fresh_noise_and_both_releases_are_composed",
            "tests/test_private_fl.py::test_dp_sgd_resumes_bitwise_with_its_secret_seed_from_the_checkpoint")),
    Mutant("constant-tail-word", "every word of a masked upload, the tail's too, is masked",
           "hpcfl/privacy/secagg.py", "            g.add(y, key, _sign(me, j))\n        return y",
           "            g.add(y, key, _sign(me, j))\n        y[-1] = x[-1]\n        return y",
           ("tests/mpi/test_privacy_mpi.py::test_every_upload_looks_uniform_and_uncorrelated_with_the_update",), mpi=2),
    Mutant("secagg-no-route-check", "a client signs no view naming a neighbour it did not mask with",
           "hpcfl/privacy/secagg.py", "        named = set(self._graph[self.cid]) & (survivors | dropped)\n",
           "        return\n        named = set(self._graph[self.cid]) & (survivors | dropped)\n",
           ("tests/test_secagg_attacks.py::test_finding_1_route_then_drop_on_a_complete_graph_with_one_colluder",)),
    Mutant("secagg-self-mask-without-signature", "a survivor that refused the view keeps its self mask",
           "hpcfl/privacy/secagg.py", "        return (set(self._held) | {self.cid}) & self._survivors",
           "        return {self.cid}",
           ("tests/test_secagg_attacks.py::test_self_mask_shares_only_for_survivors_that_signed_the_view",)),
    Mutant("secagg-no-absent-bound", "no survivor may have more than max_absent absent neighbours",
           "hpcfl/privacy/secagg.py", "if absent > p.max_absent:", "if False:",
           ("tests/test_secagg_attacks.py::test_a_view_with_a_survivor_missing_more_neighbours_than_max_absent_is_refused",)),
    Mutant("client-books-never-refuse", "under secure aggregation a client joins only while its budget lasts",
           "hpcfl/privacy/ledger.py", "return self.budget is None or self.spent.get(client, 0.0) + mu2 <= self.budget",
           "return True",
           ("tests/test_secure_dp.py::test_finding_2_no_client_passes_its_budget_whatever_the_survivor_counts",)),
    Mutant("secure-dp-stops-at-the-first-refusal",
           "a secure DP run goes on past a round that a few clients out of budget left short",
           "hpcfl/privacy/plan.py", "return (sampled - refused) / sampled * expected < self.min_survivors(expected)",
           "return True",
           ("tests/test_secure_dp.py::test_a_few_clients_out_of_budget_skip_a_round_and_only_a_spent_federation_stops",)),
    Mutant("secagg-ignores-dp-colluders",
           "secure aggregation withstands the colluders the DP accounting assumes (--dp-colluders)",
           "hpcfl/fl/secure.py", "corrupt_count(m, cfg.dp_colluders, cfg.secagg_corrupt_fraction), absent",
           "corrupt_count(m, 0, cfg.secagg_corrupt_fraction), absent",
           ("tests/test_secagg_attacks.py::test_dp_colluders_count_in_the_consistency_round_so_two_views_cannot_both_pass",)),
    Mutant("seeded-redo-refused",
           "a seeded run's redone round is the same release: its clients join it again, at no new cost",
           "hpcfl/privacy/ledger.py", "        if (client, server_round, noise, mu2) in self.released:\n",
           "        if False:\n",
           ("tests/test_secure_dp.py::test_a_seeded_redo_of_a_round_is_the_same_release_and_an_unseeded_one_a_new_one",)),
    Mutant("noise-reused-across-attempts", "each attempt of a resumed run draws fresh noise",
           "hpcfl/privacy/plan.py", "return () if self.attempt is None else (self.attempt,)", "return ()",
           ("tests/test_secure_dp.py::test_each_attempt_draws_its_own_noise_and_batches_and_a_seeded_run_the_same",)),
    Mutant("dpsgd-no-hard-cap", "DP-SGD takes no step past --dp-epsilon",
           "hpcfl/training/dataparallel.py", "self.budget_stop = plan.over_budget(plan.z)", "self.budget_stop = None",
           ("tests/test_private_fl.py::test_finding_3_dp_sgd_resumed_for_more_epochs_stays_within_the_budget",)),
    Mutant("central-dp-skips-empty-rounds", "central DP-FedAvg releases noise when nobody counts",
           "hpcfl/fl/collectors.py", "        why = plan.over_budget(plan.z)             # the round is withheld",
           "        if clients == 0:\n            return None, result\n"
           "        why = plan.over_budget(plan.z)             # the round is withheld",
           ("tests/test_private_fl.py::test_finding_5_central_dp_releases_noise_when_nobody_counts",)),
    Mutant("dp-records-carry-counts", "under DP the records carry no count of the secret sample",
           "hpcfl/training/federated.py",
           "        if self.plan is None:\n            rec.update(clients=len(plan.sampled)",
           "        if True:\n            rec.update(clients=len(plan.sampled)",
           ("tests/test_private_fl.py::test_secure_dp_epsilon_4_is_never_exceeded",)),
    Mutant("dp-normalisation-measured", "under DP the input normalisation is fixed, not the private data's",
           "hpcfl/api.py", "    if plan is not None:      # fixed constants", "    if False:      # fixed constants",
           ("tests/test_datasets.py::test_finding_7_under_dp_the_input_normalisation_is_fixed_not_measured",)),
]


def check_applicable(mutant: Mutant, root: Path = ROOT) -> str | None:
    """Why the mutant cannot be applied to the tree at `root` (its text moved), or None."""
    text = (root / mutant.path).read_text()
    count = text.count(mutant.original)
    if count != 1:
        return f"{mutant.name}: its original text occurs {count} times in {mutant.path} (the code moved?)"
    return None


def scratch_copy(into: Path) -> Path:
    tree = into / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", ".venv", "venv", ".ci", "__pycache__",
                                                             "results", ".mypy_cache", ".ruff_cache"))
    return tree


def run_mutant(mutant: Mutant, python: str, timeout: int) -> dict:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tree = scratch_copy(Path(tmp))
        target = tree / mutant.path
        target.write_text(target.read_text().replace(mutant.original, mutant.mutated, 1))
        env = {**os.environ, "PYTHONPATH": str(tree)}
        # the scratch tree is elsewhere: the data stays where the checkout's tests find it
        env.setdefault("HPCFL_DATA_DIR", str(ROOT.parent / "shared" / "data" / "mnist"))
        if mutant.mpi:
            mpirun = str(Path(python).with_name("mpirun"))
            cmd = [mpirun, "-n", str(mutant.mpi), python, "-m", "pytest", "--with-mpi", "-q", "-x",
                   "-p", "no:cacheprovider", *mutant.tests]
        else:
            cmd = [python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutant.tests]
        try:
            proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
            # killed by a failing assertion, not by a mutant that breaks the import (an error)
            killed = proc.returncode == 1 and " failed" in tail[0] and " error" not in tail[0]
        except subprocess.TimeoutExpired:
            killed, tail = True, ["timed out: counted as killed"]
    return {"mutant": mutant.name, "claim": mutant.claim, "killed": killed, "tests": " ".join(mutant.tests),
            "seconds": round(time.perf_counter() - t0, 1), "last_line": tail[0][:160]}


def section(rows: list[dict], command: str) -> str:
    lines = [MARK_BEGIN, "## The mutation check", "",
             f"Measured by `{command}` on {time.strftime('%Y-%m-%d')}: each mutant applied to a scratch copy of the "
             "tree, the tests named run against it. Killed: the tests failed, as they must.", "",
             "| mutant | the claim it breaks | killed by | killed | seconds |", "|---|---|---|---|---|"]
    for r in rows:
        tests = ", ".join(f"`{t.split('::')[-1]}`" for t in r["tests"].split())
        lines.append(f"| `{r['mutant']}` | {r['claim']} | {tests} | {'yes' if r['killed'] else '**no**'} | "
                     f"{r['seconds']} |")
    lines += ["", MARK_END]
    return "\n".join(lines)


def write_section(text: str) -> None:
    from common import write_marked

    write_marked(BENCH / "PRIVACY.md", MARK_BEGIN, MARK_END, text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="mutant names")
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--out", type=Path, default=BENCH / "results")
    ap.add_argument("--check", action="store_true", help="write nothing, only exit 1 if a mutant survives (CI)")
    args = ap.parse_args()
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    stale = [why for m in chosen if (why := check_applicable(m))]
    if stale:
        print("\n".join(stale), file=sys.stderr)
        return 1
    rows = []
    for m in chosen:
        row = run_mutant(m, sys.executable, args.timeout)
        rows.append(row)
        print(f"{'killed  ' if row['killed'] else 'SURVIVED'} {m.name} ({row['seconds']} s): {row['last_line']}",
              flush=True)
    if not args.only and not args.check:
        sys.path.insert(0, str(BENCH))
        from common import write_csv

        args.out.mkdir(parents=True, exist_ok=True)
        write_csv(args.out / "mutants.csv", rows)
        write_section(section(rows, "python benchmarks/mutants.py"))
    survivors = [r["mutant"] for r in rows if not r["killed"]]
    if survivors:
        print(f"survived: {', '.join(survivors)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
