"""What the server's step is, against a computation of this file's own (issue 36): FedAvg's
n_k weighting with unequal clients, FedNova's normalised step with a straggler, and one DP-SGD
step on its Poisson sample divided by the expected batch. In process, one rank, the real
trainers; each test records what the trainer's parts exchange and recomputes the result."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import needs_mnist

import hpcfl
from hpcfl.backends import numpy_backend
from hpcfl.core import layout as model_layout
from hpcfl.fl import aggregators, collectors, partition
from hpcfl.privacy import sampling

pytestmark = needs_mnist


def recorded_updates(monkeypatch):
    """Every ClientUpdate the plain collector receives, as (client, params, n_k, steps)."""
    seen = []
    add = collectors.PlainCollector.add

    def recording(self, update):
        seen.append((update.client, update.params.astype(np.float64).copy(), update.num_examples, update.steps,
                     self.global_w.copy()))
        add(self, update)
    monkeypatch.setattr(collectors.PlainCollector, "add", recording)
    return seen


def two_clients(monkeypatch, sizes=(30, 90)):
    def create(scheme, labels, num_clients, seed, alpha=0.5):
        a, b = sizes
        return [np.arange(0, a), np.arange(a, a + b)]
    monkeypatch.setattr(partition, "create", create)


FL = dict(mode="fl", num_clients=2, client_fraction=1.0, rounds=1, hidden=(16,), server_opt="fedavg",
          server_lr=1.0, local_batch_size=10, local_epochs=1, quiet=True)


def test_fedavg_weights_clients_by_their_example_counts(monkeypatch):
    # clients of 30 and 90 samples: the new global model is (30 w1 + 90 w2) / 120; equal weights
    # ((w1 + w2) / 2) would be 1e-3 away (the test can tell: see the last line)
    two_clients(monkeypatch)
    seen = recorded_updates(monkeypatch)
    out = hpcfl.train(hpcfl.Config(**FL))
    (_, w1, n1, _, g), (_, w2, n2, _, _) = sorted(seen, key=lambda s: s[0])
    assert (n1, n2) == (30, 90)
    want = (30 * w1 + 90 * w2) / 120
    np.testing.assert_allclose(out.model.params, want, rtol=0, atol=2e-7)
    assert np.abs((w1 + w2) / 2 - want).max() > 1e-3


def test_fednova_normalises_a_stragglers_update_by_its_steps(monkeypatch):
    # client 0 finishes half its local steps: the server's step is aggregators.fednova over the
    # recorded deltas, their step counts and example counts; a plain weighted mean would differ
    two_clients(monkeypatch, sizes=(60, 60))
    monkeypatch.setattr(partition, "stragglers",
                        lambda clients, rate, server_round, seed: {int(min(clients)): 0.5})
    seen = recorded_updates(monkeypatch)
    out = hpcfl.train(hpcfl.Config(**FL, straggler_rate=0.5))
    rows = sorted(seen, key=lambda s: s[0])
    g = rows[0][4]
    deltas = np.stack([w - g for _, w, _, _, _ in rows])
    tau = [s for _, _, _, s, _ in rows]
    assert tau == [3, 6]
    want = g + aggregators.fednova(deltas, tau, [n for _, _, n, _, _ in rows])
    np.testing.assert_allclose(out.model.params, want, rtol=0, atol=2e-7)
    assert np.abs(g + aggregators.mean(deltas, [60, 60]) - want).max() > 1e-4


def test_one_dp_sgd_step_is_lr_times_the_poisson_samples_gradient_sum_over_the_expected_batch():
    # z = 0 and a clip no gradient reaches: one step moves the model by lr x (the sum of the
    # per-sample gradients over the Poisson sample the seed draws) / B. Dividing by the realised
    # size, or a fixed-size batch, would differ (checked below)
    B, lr, seed = 512, 0.5, 9
    out = hpcfl.train(hpcfl.Config(mode="dp", dp_sgd=True, dp_noise=0.0, dp_clip=1e6, max_steps=1, batch_size=B,
                                   lr=lr, momentum=0.0, hidden=(16,), dp_noise_seed=seed, quiet=True))
    data = hpcfl.load_dataset("mnist")
    lay = model_layout.layout((16,))
    init = model_layout.init_params(lay, 0)
    batch = sampling.poisson_sample(data.n_train, B / data.n_train, seed, 0)
    x = np.empty((len(batch), 784), np.float32)
    numpy_backend.gather(data.train_x, batch, x, 0.1307, 0.3081)      # DP: MNIST's published constants
    grads = np.zeros(lay.n_params, np.float32)
    numpy_backend.forward_backward(lay.views(init.copy()), x, data.train_y[batch].astype(np.int32),
                                   lay.views(grads), None)
    step = lr * grads.astype(np.float64) / B
    got = init - out.model.params.astype(np.float64)
    err = np.abs(got - step).max() / np.abs(step).max()
    assert err < 2e-3, err                                           # float32 sums of ~512 gradients
    realised = lr * grads.astype(np.float64) / len(batch)            # the wrong divisor: off by |B/K - 1|
    assert np.abs(realised - step).max() / np.abs(step).max() > 5 * err and len(batch) != B
    assert out.history[-1]["dp_epsilon"] == pytest.approx(float("inf"))
