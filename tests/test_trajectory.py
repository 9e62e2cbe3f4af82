"""The trajectory recorder: what it records, replaying it forward, resuming, refusing another run."""

import json

import pytest
import torch
from torch import nn

import sourcetrace as st
from sourcetrace.errors import InvalidOptionError, SourcetraceError, WorkdirMismatchError
from sourcetrace.trajectory import Trajectory, TrajectoryRecorder, trajectory_callback

N, D, C, B, STEPS = 20, 4, 3, 5, 24




def data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(N, D, dtype=torch.float64, generator=g), torch.randint(0, C, (N,), generator=g)


def mlp(width=5):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, width), nn.Tanh(), nn.Linear(width, C)).double()


def order():
    g = torch.Generator().manual_seed(4)
    return [torch.randperm(N, generator=g)[:B] for _ in range(STEPS)]


def run(workdir, stop=STEPS, resume=False, finish=True, make=None, **kw):
    """The user's loop: SGD with momentum and a decaying lr, then a fresh AdamW fine-tuning stage at 12."""
    x, y = data()
    task = st.ClassificationTask()
    model = mlp()
    make = make or (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3))
    opt = make(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    kw.setdefault("checkpoint_every", 5)
    rec = TrajectoryRecorder(workdir, model, opt, **kw)
    done = 0
    if resume:
        if rec.last_checkpoint >= 12:  # the loop rebuilds the optimizer of the stage it resumes in
            opt, sched = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1), None
        done = rec.resume(model, opt)
    else:
        rec.stage("pre-train")
    for t, idx in enumerate(order()[:stop]):
        if t == 12 and t >= done:
            opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
            sched = None
            rec.stage("fine-tune", model, opt)
        if t < done:
            continue
        opt.zero_grad()
        task.train_loss(model, (x[idx], y[idx])).mean().backward()
        opt.step()
        rec.step(model, opt, [f"ex{i}" for i in idx.tolist()])
        if sched is not None:
            sched.step()
    if finish:
        rec.finish(model, opt)
    else:
        rec._wait()  # a killed run: only what was committed survives
    return model


def examples_by_id():
    x, y = data()
    return lambda ids: (x[[int(i[2:]) for i in ids]], y[[int(i[2:]) for i in ids]])


def test_records_order_rates_checkpoints_stages_and_optimizers(tmp_path):
    model = run(tmp_path)
    traj = Trajectory.load(tmp_path)
    assert traj.n_steps == STEPS and traj.reduction == "mean"
    assert traj.batch_ids[0] == [f"ex{i}" for i in order()[0].tolist()]
    assert traj.lr[:9] == pytest.approx([0.1] * 4 + [0.05] * 4 + [0.025])  # the rate each step used
    assert traj.lr[12:] == pytest.approx([0.01] * 12)
    assert traj.checkpoints == [0, 5, 10, 12, 15, 20, 24]
    assert [(s.name, s.start) for s in traj.stages] == [("pre-train", 0), ("fine-tune", 12)]
    sgd, adamw = traj.optimizers
    assert (sgd.kind, sgd.groups[0]["momentum"], sgd.groups[0]["weight_decay"]) == ("SGD", 0.9, 1e-3)
    assert (adamw.kind, adamw.start, adamw.groups[0]["weight_decay"]) == ("AdamW", 12, 0.1)
    state, opt_state = traj.checkpoint(10)
    assert set(opt_state) == {n for n, _ in model.named_parameters()}
    assert set(opt_state["0.weight"]) == {"momentum_buffer"}
    assert set(traj.checkpoint(24)[1]["0.weight"]) == {"step", "exp_avg", "exp_avg_sq"}
    assert len(traj.checkpoint_states()) == len(traj.checkpoints)


def test_replaying_the_record_forward_reproduces_the_model_exactly(tmp_path):
    model = run(tmp_path)
    traj = Trajectory.load(tmp_path)
    again = traj.replay_forward(mlp(width=5), st.ClassificationTask().train_loss, examples_by_id())
    for (n, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), n
    # and from a checkpoint in the middle of the second stage
    again = traj.replay_forward(mlp(width=5), st.ClassificationTask().train_loss, examples_by_id(), start=15)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))


def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    whole = run(tmp_path / "whole")
    run(tmp_path / "killed", stop=17, finish=False)
    assert Trajectory.load(tmp_path / "killed").n_steps == 15  # steps after the last checkpoint were lost
    with pytest.raises(SourcetraceError, match="resume"):  # continuing without resume() would corrupt it
        run(tmp_path / "killed")
    resumed = run(tmp_path / "killed", resume=True)
    a, b = Trajectory.load(tmp_path / "whole"), Trajectory.load(tmp_path / "killed")
    assert (a.batch_ids, a.lrs, a.checkpoints) == (b.batch_ids, b.lrs, b.checkpoints)
    assert [(s.name, s.start) for s in a.stages] == [(s.name, s.start) for s in b.stages]
    assert all(torch.equal(p, q) for p, q in zip(whole.parameters(), resumed.parameters()))


def test_another_run_is_refused(tmp_path):
    run(tmp_path, stop=6)
    with pytest.raises(WorkdirMismatchError, match="checkpoint_every"):
        run(tmp_path, checkpoint_every=3)
    with pytest.raises(WorkdirMismatchError, match="config"):
        run(tmp_path, config={"seed": 1})
    with pytest.raises(WorkdirMismatchError, match="optimizer"):
        run(tmp_path, make=lambda p: torch.optim.Adam(p, lr=0.1))
    with pytest.raises(WorkdirMismatchError):  # another model shape
        TrajectoryRecorder(tmp_path, mlp(6), torch.optim.SGD(mlp(6).parameters(), lr=0.1), checkpoint_every=5)
    run(tmp_path, overwrite=True)
    assert Trajectory.load(tmp_path).n_steps == STEPS
    assert json.loads((tmp_path / "manifest.json").read_text())["kind"] == "trajectory"


def test_misuse_is_explained(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(InvalidOptionError, match="exactly one"):
        TrajectoryRecorder(tmp_path / "a", model, opt)
    with pytest.raises(InvalidOptionError, match="RMSprop"):
        TrajectoryRecorder(tmp_path / "b", model, torch.optim.RMSprop(model.parameters()), at_steps=[3])
    rec = TrajectoryRecorder(tmp_path / "c", model, opt, at_steps=[2])
    with pytest.raises(SourcetraceError, match="stage"):
        rec.step(model, torch.optim.SGD(model.parameters(), lr=0.1), [0])
    with pytest.raises(FileNotFoundError, match="TrajectoryRecorder"):
        Trajectory.load(tmp_path / "nothing")


def test_transformers_callback_records_a_trainer_run(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    x, y = data()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = mlp()

        def forward(self, x, labels=None):
            logits = self.body(x)
            if labels is None:
                return {"logits": logits}
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    rows = [{"id": f"ex{i}", "x": x[i], "labels": int(y[i])} for i in range(N)]
    callback = trajectory_callback(tmp_path / "traj", checkpoint_every=3)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        num_train_epochs=2, learning_rate=0.05, lr_scheduler_type="linear", max_grad_norm=0.0,
        remove_unused_columns=False, dataloader_num_workers=0, report_to=[], save_strategy="no",
        logging_strategy="no", use_cpu=True, seed=0)
    model = Net().double()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows,
                                   data_collator=callback.collator(), callbacks=[callback])
    trainer.train()
    traj = Trajectory.load(tmp_path / "traj")
    steps = trainer.state.global_step
    assert traj.n_steps == steps
    seen = sum(traj.batch_ids, [])
    assert sorted(seen) == sorted(2 * [r["id"] for r in rows])  # two epochs, every example twice
    assert traj.lr[0] == pytest.approx(0.05) and traj.lr[-1] < traj.lr[0]
    assert traj.optimizers[0].kind == "AdamW" and traj.checkpoints == [*range(0, steps, 3), steps]
    final = traj.checkpoint(steps)[0]
    assert all(torch.equal(final[f"body.{n}"], p) for n, p in model.body.named_parameters())
    # the record is complete: replaying it with torch.optim lands on the Trainer's model
    by_id = {r["id"]: r for r in rows}

    def batch(ids):
        return torch.stack([by_id[i]["x"] for i in ids]), torch.tensor([by_id[i]["labels"] for i in ids])

    def loss(net, b):
        return nn.functional.cross_entropy(net(b[0])["logits"], b[1], reduction="none")

    again = traj.replay_forward(Net().double(), loss, batch)
    for p, q in zip(model.parameters(), again.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    # the Trainer's AdamW state is recorded: SOURCE's Adam variant reads its preconditioners
    options = traj.checkpoint_options("source")
    assert options["decoupled_weight_decay"] and len(options["preconditioners"]) == len(traj.checkpoints) - 1
    assert set(options["preconditioners"][-1]) == {n for n, _ in model.named_parameters()}


def test_checkpoint_options_for_tracin_and_source(tmp_path):
    run(tmp_path)
    traj = Trajectory.load(tmp_path)
    tracin = traj.checkpoint_options("tracin")
    assert len(tracin["checkpoints"]) == len(traj.checkpoints) - 1
    assert tracin["learning_rates"][0] == pytest.approx((4 * 0.1 + 0.05) / 5)
    with pytest.raises(InvalidOptionError, match="SGD from step 1, AdamW from step 13"):
        traj.checkpoint_options("source", train_ids=[f"ex{i}" for i in range(N)])


def test_trajectory_option_on_tracin_and_dda(tmp_path):
    """trajectory= stands for the checkpoints after the start with their mean rates (dda: from the start)."""
    model = run(tmp_path / "traj")
    traj = Trajectory.load(tmp_path / "traj")
    x, y = data()
    queries = (x[:3], y[:3])
    task = st.ClassificationTask()

    def scores(**options):
        return st.Attributor(model, task, "tracin" if "dda" not in options else "grad-dot", progress=False,
                             **options).fit((x, y)).score(queries).matrix

    torch.testing.assert_close(scores(trajectory=tmp_path / "traj"),
                               scores(**traj.checkpoint_options("tracin")))
    torch.testing.assert_close(scores(trajectory=traj, dda=True),
                               scores(checkpoints=traj.checkpoint_states(), dda=True))
    with pytest.raises(InvalidOptionError, match="not both"):
        st.Attributor(model, task, "tracin", trajectory=traj, **traj.checkpoint_options("tracin"))
    with pytest.raises(InvalidOptionError, match="uses one model"):
        st.Attributor(model, task, "grad-dot", trajectory=traj)


# ---- gradients collected during training ----------------------------------------------------------------

def separate_pass(state, x, y, folder):
    """The Attributor's own store of grad-dot rows (random projection, seed 0) at `state`: a second pass."""
    net = mlp().double()
    net.load_state_dict(state)
    attr = st.Attributor(net, st.ClassificationTask(), "grad-dot", folder, progress=False, features="random",
                         proj_dim=8, store_dtype="float64").fit((x, y))
    return attr.method.stores[0].read()


def test_collector_in_a_plain_loop_writes_the_rows_of_a_separate_pass(tmp_path):
    from sourcetrace.trajectory import GradientCollector

    x, y = data()
    x = x.double()
    torch.manual_seed(0)
    model = mlp().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    collector = GradientCollector(tmp_path / "store", model, st.ClassificationTask(), N, proj_dim=8,
                                  store_dtype="float64", shard_size=7)
    order = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    used = {}  # step -> (positions, state the step's gradient was taken at)
    for step, lo in enumerate(range(0, N, B), 1):
        idx = order[lo:lo + B]
        used[step] = (idx, {k: v.clone() for k, v in model.state_dict().items()})
        assert collector.collect(step, (x[idx], y[idx]), idx.tolist())
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    assert collector.complete and not list((tmp_path / "store").glob("partial-*"))
    rows = collector.store.read()
    for step, (idx, state) in used.items():  # each row is the row of a second pass at its step's model
        want = separate_pass(state, x, y, tmp_path / f"pass{step}")
        torch.testing.assert_close(rows[idx], want[idx], rtol=1e-12, atol=1e-14)
    assert not torch.allclose(used[1][1]["0.weight"], used[4][1]["0.weight"])  # the model did move


def test_trainer_callback_collects_the_store_of_a_separate_pass(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from sourcetrace.trajectory import GradientCollector, gradient_callback

    x, y = data()
    x = x.double()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = mlp().double()

        def forward(self, x, labels=None):
            logits = self.body(x)
            if labels is None:
                return logits  # what the task calls: Net(inputs) -> logits
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    torch.manual_seed(0)
    model = Net()
    ids = [f"ex{i}" for i in range(N)]
    rows = [{"id": ids[i], "x": x[i], "labels": int(y[i])} for i in range(N)]
    task = st.ClassificationTask(input_key="x", target_key="labels")
    collector = GradientCollector(tmp_path / "store", model, task, N, proj_dim=8, store_dtype="float64",
                                  shard_size=6)
    callback = gradient_callback(collector, ids)
    states = []

    class Snapshot(transformers.TrainerCallback):
        """Before each optimizer step: the examples it used and the parameters its gradient was taken at."""

        def on_pre_optimizer_step(self, args, state, control, **kw):
            used = [ids.index(f["id"]) for batch in callback.seen for f in batch]
            state_now = {k.removeprefix("body."): v.clone() for k, v in model.state_dict().items()}
            states.append((used, state_now))

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_train_epochs=1,
        learning_rate=0.05, max_grad_norm=0.0, remove_unused_columns=False, dataloader_num_workers=0,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows,
                                   data_collator=callback.collator(), callbacks=[Snapshot(), callback])
    trainer.train()
    assert collector.complete and len(states) == trainer.state.global_step == N // 4
    got = collector.store.read()
    for step, (used, state) in enumerate(states):
        want = separate_pass(state, x, y, tmp_path / f"pass{step}")
        torch.testing.assert_close(got[used], want[used], rtol=1e-12, atol=1e-14)


def test_collector_divides_by_adams_second_moment(tmp_path):
    """optimizer=Adam: each row is the example's gradient divided elementwise by √v̂ + ε, v̂ the
    bias-corrected second moment the optimizer holds before the collected step (computed here by hand from
    per-example autograd and the optimizer's exp_avg_sq); refused before Adam's first step."""
    from sourcetrace.errors import InvalidOptionError
    from sourcetrace.trajectory import GradientCollector

    x, y = data()
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.05, betas=(0.8, 0.9), eps=1e-3)
    collector = GradientCollector(tmp_path / "store", model, st.ClassificationTask(), N, features="identity",
                                  store_dtype="float64", steps=[3, 4, 5, 6], optimizer=opt)
    with pytest.raises(InvalidOptionError, match="collect from step 2"):
        GradientCollector(tmp_path / "early", model, st.ClassificationTask(), N, features="identity",
                          optimizer=opt).collect(1, (x[:B], y[:B]), list(range(B)))
    with pytest.raises(InvalidOptionError, match="features='random'"):
        GradientCollector(tmp_path / "k", model, st.ClassificationTask(), N, features="kronecker",
                          optimizer=opt)
    want = torch.zeros(N, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    raw = torch.zeros_like(want)
    for step, lo in enumerate(range(0, 2 * N, B), 1):  # steps 3-6 cover the training set once
        idx = torch.arange(lo, lo + B) % N
        if step in (3, 4, 5, 6):
            k = opt.state[model[0].weight]["step"].item()
            scale = torch.cat([1 / ((opt.state[p]["exp_avg_sq"] / (1 - 0.9**k)).sqrt() + 1e-3).reshape(-1)
                               for p in model.parameters()])
            for i in idx.tolist():
                loss = nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
                g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))])
                want[i], raw[i] = g * scale, g
            assert collector.collect(step, (x[idx], y[idx]), idx.tolist())
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    assert collector.complete
    torch.testing.assert_close(collector.store.read(), want, rtol=1e-10, atol=1e-12)
    ratio = (want / raw)[raw.abs() > 1e-8]
    assert ratio.min() < 0.5 * ratio.max()  # the preconditioner did reweigh the coordinates
