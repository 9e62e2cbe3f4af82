"""DiffusionTask, the ε-MLP and the samplers, checked against autograd loops and diffusers' schedulers."""

from __future__ import annotations

import pytest
import torch

from sourcetrace import Attributor
from sourcetrace.diffusion import (
    DiffusionTask,
    EpsMLP,
    StoredNoise,
    diffusion_examples,
    example_noise,
    generated_examples,
    linear_schedule,
    model_eps,
    predict_eps,
    sample,
    sample_trajectory,
    spaced_timesteps,
    train_eps_model,
)
from sourcetrace.errors import InvalidOptionError, ShapeError
from sourcetrace.grads import GradientCapture

SHAPE = (1, 4, 4)
T = 100


def _data(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand((n, *SHAPE), generator=g) * 2 - 1
    return diffusion_examples(images, labels=[i % 2 for i in range(n)], ids=[f"im{i}" for i in range(n)])


def _mlp(classes=None):
    torch.manual_seed(0)
    return EpsMLP(SHAPE, hidden=16, depth=2, num_classes=classes).double()


def _loop_grads(model, task, examples, fn):
    rows = []
    for ex in examples:
        model.zero_grad()
        fn(model, task.collate([ex]))[0].backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return torch.stack(rows)


def test_dtrak_timesteps_and_fixed_noise():
    assert spaced_timesteps(10, 1000) == list(range(0, 1000, 100))
    a = example_noise(0, "im3", 7, 0, SHAPE)
    assert torch.equal(a, example_noise(0, "im3", 7, 0, SHAPE))
    assert not torch.equal(a, example_noise(0, "im3", 8, 0, SHAPE))
    assert not torch.equal(a, example_noise(0, "im4", 7, 0, SHAPE))
    task = DiffusionTask(linear_schedule(T), timesteps=3, noise_draws=2)
    ex = _data()
    alone = task.noised(task.collate(ex[2:3]))
    together = task.noised(task.collate(ex))  # an example's noise does not depend on its batch
    for a, b in zip(alone, together):
        torch.testing.assert_close(a[0], b[2].to(a.dtype))


def test_loss_is_eps_mse_by_hand():
    model, ab = _mlp(), linear_schedule(T)
    task = DiffusionTask(ab, timesteps=[5, 50], noise_draws=1)
    ex = _data(2)
    batch = task.collate(ex)
    batch["x"] = batch["x"].double()
    got = task.train_loss(model, batch)
    for i, e in enumerate(ex):
        terms = []
        for t in (5, 50):
            z = example_noise(0, e["id"], t, 0, SHAPE).double()
            x_t = ab[t].sqrt() * e["x"].double() + (1 - ab[t]).sqrt() * z
            eps = model(x_t[None], torch.tensor([t]))[0]
            terms.append((eps - z).pow(2).mean())
        torch.testing.assert_close(got[i], torch.stack(terms).mean())
    sq = DiffusionTask(ab, timesteps=[5, 50], measurement="square-norm").measurement(model, batch)
    torch.testing.assert_close(sq, -task.outputs(model, batch).pow(2).reshape(2, -1).mean(1))


@pytest.mark.parametrize("objective", ["loss", "square-norm"])
def test_per_example_gradients_equal_autograd_loop(objective):
    model = _mlp(classes=2)
    task = DiffusionTask(linear_schedule(T), timesteps=4, noise_draws=2, train_objective=objective)
    ex = [{**e, "x": e["x"].double()} for e in _data(5)]
    batch = task.collate(ex)
    batch["x"] = batch["x"].double()
    capture = GradientCapture(model)
    got = capture.flat(task.train_loss, batch)
    assert not capture.fallback_names  # the [B, M] layout keeps every layer on hooks
    want = _loop_grads(model, task, ex, lambda m, b: task.train_loss(m, {**b, "x": b["x"].double()}))
    torch.testing.assert_close(got, want)


@pytest.mark.slow
def test_unet_per_example_gradients_equal_autograd_loop():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=4, in_channels=1, out_channels=1, block_out_channels=(4, 8),
                                 layers_per_block=1, norm_num_groups=2,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).double()
    task = DiffusionTask(diffusers.DDPMScheduler(num_train_timesteps=T), timesteps=2)
    ex = [{k: v for k, v in e.items() if k != "y"} for e in _data(3)]
    batch = task.collate(ex)
    batch["x"] = batch["x"].double()
    with pytest.warns(UserWarning):  # the B·M rows go through torch.func
        got = GradientCapture(unet).flat(task.train_loss, batch)
    want = _loop_grads(unet, task, ex, lambda m, b: task.train_loss(m, {**b, "x": b["x"].double()}))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("method,options", [("grad-dot", {}), ("trak", {"proj_dim": 32}),
                                            ("ekfac", {})])
def test_registry_methods_run_through_the_task(method, options, tmp_path):
    model = _mlp().float()
    task = DiffusionTask(linear_schedule(T), timesteps=3)
    train, queries = _data(8), _data(2, seed=1)
    for q in queries:
        q["id"] = "q" + q["id"]
    scores = Attributor(model, task, method, workdir=tmp_path / method, progress=False, **options) \
        .fit(train).score(queries)
    assert scores.shape == (2, 8) and torch.isfinite(scores.matrix).all()
    if method == "grad-dot":  # score = -∇m(q)·∇L(i) by hand
        cap = GradientCapture(model)
        gq = cap.flat(task.measurement, task.collate(queries))
        gt = cap.flat(task.train_loss, task.collate(train))
        torch.testing.assert_close(scores.matrix, -gq @ gt.T, rtol=1e-4, atol=1e-6)


def test_ddim_and_ddpm_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    model = _mlp().float()
    noise = StoredNoise.draw(3, SHAPE, num_steps=10, seed=1)
    ddim = diffusers.DDIMScheduler(num_train_timesteps=T, clip_sample=False, set_alpha_to_one=True)
    ddim.set_timesteps(10)
    x = noise.start
    with torch.no_grad():
        for t in ddim.timesteps:
            x = ddim.step(model(x, t.expand(3)), t, x, eta=0.0).prev_sample
        ours = sample(model_eps(model), noise, ddim, kind="ddim", num_steps=10)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-5)

    ddpm = diffusers.DDPMScheduler(num_train_timesteps=T, clip_sample=False)
    ddpm.set_timesteps(10)
    g = torch.Generator().manual_seed(5)
    g2 = torch.Generator().manual_seed(5)  # diffusers draws one variance noise per step (t > 0) from g
    steps = torch.stack([torch.randn((3, *SHAPE), generator=g2) for _ in range(10)])
    x = noise.start
    with torch.no_grad():
        for t in ddpm.timesteps:
            x = ddpm.step(model(x, t.expand(3)), t, x, generator=g).prev_sample
        ours = sample(model_eps(model), StoredNoise(noise.start, steps), ddpm, kind="ddpm", num_steps=10)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-5)


def test_x0_measurement_and_trajectory():
    model = _mlp().float()
    ab = linear_schedule(T)
    noise = StoredNoise.draw(2, SHAPE, num_steps=5)
    with torch.no_grad():
        x, traj, steps = sample_trajectory(model_eps(model), noise, ab, num_steps=5)
    queries = generated_examples(x, traj, steps)
    task = DiffusionTask(ab, timesteps=2, measurement="x0")
    batch = task.collate(queries)
    got = task.measurement(model, batch)
    t = torch.tensor(steps)
    eps = model(traj[1], t)
    a = ab[t].float().reshape(-1, 1, 1, 1)
    x0 = (traj[1] - (1 - a).sqrt() * eps) / a.sqrt()
    torch.testing.assert_close(got[1], -(x0 - x[1]).pow(2).mean())
    with pytest.raises(ShapeError, match="trajectory"):
        task.measurement(model, task.collate(_data(2)))


def test_training_on_a_subset_changes_only_its_terms():
    ab = linear_schedule(T)
    images = torch.stack([e["x"] for e in _data(6)])
    a, b = _mlp().float(), _mlp().float()
    train_eps_model(a, images, ab, steps=5, batch_size=3, seed=0, keep=[0, 1, 2, 3, 4, 5])
    train_eps_model(b, images, ab, steps=5, batch_size=3, seed=0)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)
    c = _mlp().float()
    train_eps_model(c, images, ab, steps=5, batch_size=3, seed=0, keep=[0, 1, 2, 3, 4])
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_bad_input_is_refused():
    with pytest.raises(InvalidOptionError):
        DiffusionTask(linear_schedule(T), measurement="fid")
    with pytest.raises(InvalidOptionError):
        DiffusionTask(linear_schedule(T), timesteps=[T + 5])
    with pytest.raises(ShapeError, match="diffusion_examples"):
        DiffusionTask(linear_schedule(T)).collate([torch.zeros(SHAPE)])
    with pytest.raises(ShapeError):
        DiffusionTask(torch.tensor([2.0, 3.0]))
    assert predict_eps(_mlp().float(), torch.zeros(2, 3, *SHAPE), torch.zeros(2, 3, dtype=torch.long)).shape \
        == (2, 3, *SHAPE)


@pytest.mark.slow
def test_diffusion_report_in_chromium_without_console_errors(tmp_path):
    """The report of generated digits (images, a counterfactual to compare with) in headless Chromium."""
    import os
    import shutil
    from pathlib import Path

    sync_api = pytest.importorskip("playwright.sync_api")
    from sourcetrace import Scores
    from sourcetrace.views import write_report

    shots = os.environ.get("SOURCETRACE_SCREENSHOTS")

    chromium = (os.environ.get("SOURCETRACE_CHROMIUM") or shutil.which("chromium")
                or shutil.which("chromium-browser"))
    if chromium is None:
        pytest.skip("no chromium binary (apt-get install chromium, or set SOURCETRACE_CHROMIUM)")
    model = EpsMLP((1, 8, 8), hidden=8, depth=2)
    task = DiffusionTask(linear_schedule(T), timesteps=2)
    g = torch.Generator().manual_seed(0)
    train = diffusion_examples(torch.rand((10, 1, 8, 8), generator=g) * 2 - 1,
                               labels=[i % 3 for i in range(10)])
    noise = StoredNoise.draw(2, (1, 8, 8), num_steps=5)
    with torch.no_grad():
        made = sample(model_eps(model), noise, linear_schedule(T), num_steps=5, clip=1.0)
    queries = generated_examples(made) + generated_examples(made.flip(-1), prefix="counterfactual")
    scores = Attributor(model, task, "grad-dot", progress=False).fit(train).score(queries)
    image = [{"image": ((e["x"][0] + 1) / 2).tolist(), "label": str(e.get("y", ""))} for e in train]
    items = [{"image": ((q["x"][0] + 1) / 2).tolist(), "label": q["id"]} for q in queries]
    items[0]["compare_to"] = queries[2]["id"]
    path = write_report(scores, tmp_path / "diffusion.html", train_items=image, query_items=items,
                        title="generated digits")
    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--headless"])
        except Exception as exc:  # a binary that does not start is an environment problem
            pytest.skip(f"chromium does not start: {exc}")
        page = browser.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(path.as_uri())
        page.wait_for_selector("#st-root[data-ready]")
        assert page.locator(".st-query canvas.st-thumb").count() == 1
        assert page.locator("#st-bottom li").count() == 6  # signed scores: opponents too
        page.click("[data-tab='compare']")
        assert page.locator(".st-compare").count() == 1
        for fig in ("#st-img-a", "#st-img-b", "#st-img-diff"):  # generated, counterfactual, difference
            assert page.locator(f"{fig} canvas.st-thumb").count() == 1
        shown = float(page.inner_text("#st-img-dist"))
        expected = float((torch.tensor(items[0]["image"]) - torch.tensor(items[2]["image"])).norm())
        assert abs(shown - expected) < 1e-2 * expected
        if shots:
            page.screenshot(path=str(Path(shots) / "diffusion-compare.png"))
        # distances (an encoded ensemble's counterfactuals) have no sign: no opponents in the report
        distances = Scores(scores.matrix.abs(), scores.train_ids, scores.query_ids, "ensemble-counterfactual",
                           metadata={"distance": "l2"})
        path = write_report(distances, tmp_path / "ensemble.html", train_items=image, query_items=items)
        page.goto(path.as_uri())
        page.wait_for_selector("#st-root[data-ready]")
        assert page.locator("#st-top li").count() == 6 and page.locator("#st-bottom").count() == 0
        assert "Opponents" not in page.inner_text("main") and "no sign" in page.inner_text("header")
        browser.close()
    assert errors == []


@pytest.mark.slow
def test_readme_diffusion_example_runs(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    pytest.importorskip("sklearn")
    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "DiffusionTask" in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["scores"].shape == (2, 300)
    assert namespace["made"].abs().max() <= 1.0


def test_sampled_loss_gradients_give_the_gauss_newton_matrix():
    """E[g gᵀ] of the sampled objective equals Jᵀ H J with H = 2/n I, the GGN of the mean squared error."""
    torch.manual_seed(0)
    model = EpsMLP((1, 2, 2), hidden=3, depth=1).double()
    task = DiffusionTask(linear_schedule(T), timesteps=[10, 60])
    ex = diffusion_examples(torch.rand(1, 1, 2, 2).double() * 2 - 1)
    batch = task.collate(ex)
    params = list(model.parameters())
    out = task.outputs(model, batch)[0].reshape(-1)
    jac = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(o, params, retain_graph=True)])
                       for o in out])
    ggn = jac.T @ jac * (2 / out.numel())
    g = torch.Generator().manual_seed(1)
    draws = 4000  # the same example 4000 times: one independent target draw per row
    many = task.collate(ex * draws)
    grads = GradientCapture(model).flat(lambda m, b: task.sampled_loss(m, b, g), many)
    second = grads.T @ grads / draws
    assert (second - ggn).norm() < 0.1 * ggn.norm()


def test_demo_and_benchmark_are_registered():
    from sourcetrace.bench import BENCHMARKS
    from sourcetrace.demos import demo_names, load_demo

    assert "diffusion" in demo_names() and callable(load_demo("diffusion"))
    assert "diffusion-digits" in BENCHMARKS


@pytest.mark.slow
def test_validity_benchmark_picks_the_regime_that_agrees_best_on_tuning(tmp_path):
    import json

    import numpy as np

    from sourcetrace.bench.diffusion_digits import Setting, run_validity

    base = Setting(steps=20, sample_steps=5, n_loo=3, validity_samples=4)
    regimes = ({"n_train": 20, "batch_size": 20}, {"n_train": 18, "batch_size": 18})
    path = run_validity(tmp_path, tmp_path / "work", progress=False, regimes=regimes, base=base,
                        ensembles=((6, True), (6, False), (6, True, 3)), draws=((6, True, 3),))
    data = json.loads((tmp_path / "diffusion-digits-validity.json").read_text())
    agreement = [r["agreement"][0] for r in data["regimes"]]
    assert data["setting"]["n_train"] == regimes[int(np.argmax(agreement))]["n_train"]
    v = data["ensemble_validity"]
    tuning, reporting = v["examples"]["tuning"], v["examples"]["reporting"]
    assert len(reporting) == 6 and not set(tuning) & set(reporting)
    assert np.asarray(v["retraining_change"]).shape == (12, 2) and min(map(min, v["retraining_change"])) > 0
    assert "(chosen)" in path.read_text()
    # the averaged candidate is the mean of the per-draw changes; draw 0 is the single-draw candidate
    (drawn,) = v["draws"]
    per_draw = np.asarray([d["change"] for d in drawn["draws"]])
    assert [d["codes_seed"] for d in drawn["draws"]] == [0, 1, 2]
    assert np.allclose(v["ensembles"][2]["change"], per_draw.mean(0))
    assert np.allclose(v["ensembles"][0]["change"], per_draw[0])
    assert not np.allclose(per_draw[1], per_draw[0])  # other codes, other members
    reporting = drawn["summary"]["reporting"]
    rho = [d["spearman"]["reporting"] for d in drawn["draws"]]
    assert reporting["draws"] == 3 and reporting["ci_excludes_0"] == sum(r[1] > 0 for r in rho)
    assert np.isclose(reporting["median"], np.median([r[0] for r in rho]))
    text = path.read_text()
    assert "6 members, one-seed, codes seed 2" in text and "change averaged over 3 code draws" in text


def _fake_validity(draws: list[list[tuple[float, float, float]]], averaged_chosen: bool = False) -> dict:
    """A validity result with 2 candidates (one draw, and averaged over the draws of the first config)."""
    ci = (0.5, 0.2, 0.7)
    split = {"tuning": ci, "reporting": ci}

    def drawn(members: int, rho: list[tuple[float, float, float]]) -> dict:
        from sourcetrace.bench.diffusion_digits import _draw_summary

        per_draw = [{"codes_seed": d, "change": [0.1], "mean_change": 0.1, "agreement": split,
                     "spearman": {"tuning": r, "reporting": r}} for d, r in enumerate(rho)]
        return {"members": members, "seeding": "one-seed", "draws": per_draw, **_draw_summary(per_draw)}

    return {"retraining_change": [[0.05, 0.06]], "sample_norm": 5.0, "seed_agreement": split,
            "ensembles": [{"members": 64, "seeding": "one-seed", "code_draws": 1, "change": [0.1],
                           "spearman": split},
                          {"members": 64, "seeding": "one-seed", "code_draws": len(draws[0]), "change": [0.1],
                           "spearman": split}],
            "ensemble_agreement": split, "chosen": int(averaged_chosen),
            "draws": [drawn(64 * (k + 1), rho) for k, rho in enumerate(draws)]}


def test_validity_verdict_counts_the_draws_whose_reporting_ci_excludes_0():
    from sourcetrace.bench.diffusion_digits import Setting, _validity_notes

    rho = [(0.5, 0.2, 0.7), (0.3, -0.01, 0.6), (0.4, 0.1, 0.6)]
    text = "\n".join(_validity_notes(_fake_validity([rho, rho[:2]]), Setting()))
    assert "Trained again on other codes, its CI excludes 0 in 2 of 3 draws of the codes" in text
    assert "median 0.400" in text and "| 128 members, one-seed, codes seed 1 |" in text
    text = "\n".join(_validity_notes(_fake_validity([rho]), Setting()))
    assert "chosen estimator (64 members, one-seed) follows retraining at 0.500 [0.200, 0.700]" in text
    averaged = "\n".join(_validity_notes(_fake_validity([rho], averaged_chosen=True), Setting()))
    assert "chosen estimator (64 members, one-seed, change averaged over 3 code draws)" in averaged
    assert "The CI of a single 64-member draw excludes 0 in 2 of 3" in averaged
    # the chosen ensemble on one other draw: the diffusion-digits benchmark's two rows
    compact = "\n".join(_validity_notes(_fake_validity([rho[:2]]), Setting()))
    assert "| the chosen ensemble with other codes (seed 1) vs retraining |" in compact
    assert "with other codes its CI does not exclude 0." in compact
