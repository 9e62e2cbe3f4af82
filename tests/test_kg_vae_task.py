"""GarmentVAETask: the cVAE's per-example loss and gradients, checked against autograd loops."""

from __future__ import annotations

import pytest
import torch

from sourcetrace import Attributor
from sourcetrace.demos import kg as garments
from sourcetrace.diffusion import example_noise
from sourcetrace.grads import GradientCapture

SCHEMA = garments.ATTRIBUTES


def _vae():
    torch.manual_seed(0)
    return garments.ConditionalVAE(cond=15, hidden=6, latent=3).double()


def _examples(task, n=5, seed=0):
    images, attrs = garments.make_garments(1, seed)
    pick = list(range(0, 5 * n, 5))[:n]
    ex = task.examples(images[pick], [attrs[i] for i in pick], [f"im{i}" for i in pick])
    return [{**e, "x": e["x"].double()} for e in ex]


def test_loss_is_the_negative_elbo_by_hand_with_noise_fixed_per_id():
    model, task = _vae(), garments.GarmentVAETask(SCHEMA, noise_draws=2, latent=3)
    ex = _examples(task, 3)
    got = task.train_loss(model, task.collate(ex))
    for i, e in enumerate(ex):
        mu, logvar = model.encoder(torch.cat([e["x"], e["c"].double()]))[None].chunk(2, 1)
        terms = []
        for d in range(2):
            z = mu + example_noise(0, e["id"], 0, d, (3,)).double() * torch.exp(0.5 * logvar)
            p = model.decode(z, e["c"].double()[None])[0]
            recon = -(e["x"] * p.log() + (1 - e["x"]) * (1 - p).log()).sum()
            kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum()
            terms.append(recon + kl)
        torch.testing.assert_close(got[i], torch.stack(terms).mean())
    # an example's loss does not depend on its batch; the measurement is minus the loss
    torch.testing.assert_close(task.train_loss(model, task.collate(ex[1:2]))[0], got[1])
    torch.testing.assert_close(task.measurement(model, task.collate(ex)), -got)
    one = garments.GarmentVAETask(SCHEMA, latent=3)  # one draw: the loss the generator trains on
    b = one.collate(ex)
    torch.testing.assert_close(one.train_loss(model, b), model.per_example_loss(b["x"], b["c"].double(),
                                                                               b["noise"][:, 0].double()))
    with pytest.raises(ValueError, match="noise_draws"):
        garments.GarmentVAETask(noise_draws=0)


@pytest.mark.parametrize("draws", [1, 3])
def test_per_example_gradients_equal_autograd_loop(draws):
    model, task = _vae(), garments.GarmentVAETask(SCHEMA, noise_draws=draws, latent=3)
    ex = _examples(task)
    capture = GradientCapture(model)
    got = capture.flat(task.train_loss, task.collate(ex))
    assert not capture.fallback_names
    rows = []
    for e in ex:
        model.zero_grad()
        task.train_loss(model, task.collate([e]))[0].backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(got, torch.stack(rows))


@pytest.mark.parametrize("method,options", [("trak", {"proj_dim": 32}),
                                            ("ekfac", {"curvature_options": {"fisher": "empirical"}})])
def test_registry_methods_run_through_the_task(method, options, tmp_path):
    model, task = _vae().float(), garments.GarmentVAETask(SCHEMA, noise_draws=2, latent=3)
    train = [{**e, "x": e["x"].float()} for e in _examples(task, 8)]
    queries = [{**e, "x": e["x"].float(), "id": "q" + e["id"]} for e in _examples(task, 2, seed=1)]
    scores = Attributor(model, task, method, workdir=tmp_path / method, progress=False, **options) \
        .fit(train).score(queries)
    assert scores.shape == (2, 8) and torch.isfinite(scores.matrix).all()
