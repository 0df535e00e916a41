"""Experiment glue for the notebooks: data subsets, a training driver, plots.

Everything numerical comes from ``jaxbn`` and ``train``; this module only
wires ``train.steps`` / ``train.data`` together so that a notebook can train
a model in-process, evaluate it every few steps (``train.loop`` evaluates
once per epoch) and get the history back as plain Python lists.

``JAXBN_NOTEBOOK_QUICK=1`` switches every notebook to a reduced size (tiny
subsets, few steps) through :func:`pick`; CI runs the notebooks that way.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

QUICK = os.environ.get("JAXBN_NOTEBOOK_QUICK", "").strip().lower() not in ("", "0", "false", "no")


def pick(full, quick):
    """``full`` normally, ``quick`` under ``JAXBN_NOTEBOOK_QUICK=1``."""
    return quick if QUICK else full


def mode() -> str:
    return "QUICK (reduced size; numbers are not meaningful)" if QUICK else "full"


# --------------------------------------------------------------------------
# data


def data_dir() -> str | None:
    """``$JAXBN_DATA`` or the project's default ``../shared/data`` if it exists."""
    env = os.environ.get("JAXBN_DATA")
    if env:
        return env
    here = Path(__file__).resolve().parent
    for cand in (here.parent.parent / "shared" / "data", here.parent / "shared" / "data"):
        if cand.is_dir():
            return str(cand)
    return None


@functools.lru_cache(maxsize=4)
def _load_full(dataset: str):
    from train import data
    return data.load(dataset, data_dir(), log=lambda m: None)


def load(dataset: str, *, train: int | None = None, test: int | None = None, seed: int = 0):
    """``train.data.load`` with optional random subsets (stratified by nothing).

    The subsets are drawn with ``numpy.random.default_rng(seed)``, so the same
    arguments always give the same examples.
    """
    ds = _load_full(dataset)
    rng = np.random.default_rng(seed)
    x_tr, y_tr, x_te, y_te = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    if train is not None and train < len(x_tr):
        idx = np.sort(rng.permutation(len(x_tr))[:train])
        x_tr, y_tr = x_tr[idx], y_tr[idx]
    if test is not None and test < len(x_te):
        idx = np.sort(rng.permutation(len(x_te))[:test])
        x_te, y_te = x_te[idx], y_te[idx]
    return ds._replace(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)


# --------------------------------------------------------------------------
# models


def build(factory: Callable, seed: int = 0):
    """``factory(nnx.Rngs(params=seed))``, initialized in one compiled program.

    Same weights as calling the factory eagerly (up to float rounding, a few
    1e-8), but much faster on CPU: XLA's backend optimizations are switched
    off for this one-off program, which otherwise spends tens of seconds
    optimizing the random initializers of 4-D convolution kernels.
    """
    import jax
    from flax import nnx

    graphdef, _ = nnx.split(nnx.eval_shape(lambda: factory(nnx.Rngs(params=seed))))
    init = jax.jit(lambda key: nnx.split(factory(nnx.Rngs(params=key)))[1],
                   compiler_options={"xla_backend_optimization_level": 0})
    return nnx.merge(graphdef, init(jax.random.key(seed)))


# --------------------------------------------------------------------------
# training driver


@dataclasses.dataclass
class History:
    """What :func:`fit` measured. Per-step lists have one entry per step."""
    step_loss: list = dataclasses.field(default_factory=list)
    step_grad_norm: list = dataclasses.field(default_factory=list)
    eval_step: list = dataclasses.field(default_factory=list)
    test_loss: list = dataclasses.field(default_factory=list)
    test_acc: list = dataclasses.field(default_factory=list)
    train_loss: list = dataclasses.field(default_factory=list)   # eval mode, train subset
    train_acc: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    diverged: bool = False
    state: Any = None          # final train.steps.TrainState
    graphdefs: Any = None      # train.steps.Model (train / eval graphdefs)

    def model(self, *, eval_mode: bool = True):
        """The trained nnx model (eval mode by default), a fresh copy each call."""
        from flax import nnx
        g = self.graphdefs.eval if eval_mode else self.graphdefs.train
        return nnx.merge(g, self.state.params, self.state.model_state, copy=True)

    def predict(self, x, *, batch_stats: bool = False, batch_size: int = 500):
        """Logits for ``x``: running statistics, or (``batch_stats=True``) the
        training-mode forward pass, each chunk of ``batch_size`` examples
        normalized with its own statistics (the state update is discarded)."""
        g = self.graphdefs.train if batch_stats else self.graphdefs.eval
        f = _forward(g)
        return np.concatenate([np.asarray(f(self.state.params, self.state.model_state,
                                            x[lo:lo + batch_size]))
                               for lo in range(0, len(x), batch_size)])

    def accuracy(self, x, y, **kw) -> float:
        return float((self.predict(x, **kw).argmax(-1) == y).mean())

    def steps_to(self, acc: float) -> int | None:
        """First evaluated step whose test accuracy reached ``acc`` (None if never)."""
        for s, a in zip(self.eval_step, self.test_acc):
            if a >= acc:
                return s
        return None

    @property
    def final_test_acc(self) -> float:
        return self.test_acc[-1] if self.test_acc else float("nan")

    def summary(self) -> dict:
        out = {"steps": self.steps, "seconds": round(self.seconds, 1),
               "test_acc": self.final_test_acc, "diverged": self.diverged}
        if self.train_acc:
            out["train_acc"] = self.train_acc[-1]
        return out


@functools.lru_cache(maxsize=64)
def _forward(graphdef):
    import jax
    from flax import nnx

    @jax.jit
    def f(params, model_state, x):
        return nnx.merge(graphdef, params, model_state, copy=True)(x)
    return f


def _evaluate(eval_step, state, x, y, batch_size=500):
    import jax
    from train import data
    loss = correct = count = 0.0
    # A fixed batch size (the last batch is padded and masked): one compilation.
    for xb, yb, mb in data.eval_batches(x, y, batch_size):
        o = jax.device_get(eval_step(state, (xb, yb, mb)))
        loss += float(o["loss_sum"])
        correct += float(o["correct"])
        count += float(o["count"])
    return loss / count, correct / count


@functools.lru_cache(maxsize=32)
def _steps_for(graphdefs, optimizer, weight_decay, schedule, lr, steps):
    """Jitted train/eval steps, shared by every run of the same model structure.

    With a constant learning rate the rate lives in the optimizer state
    (``optax.inject_hyperparams``), so a learning-rate sweep compiles once.
    """
    import jax.numpy as jnp
    import optax
    from train import steps as tsteps

    if schedule == "constant":
        def tx(lr):
            return optax.inject_hyperparams(
                lambda learning_rate: tsteps.make_optimizer(optimizer, learning_rate,
                                                            weight_decay))(learning_rate=lr)
        report = lambda step: jnp.float32(0.0)  # the "lr" metric is unused here
    else:
        sched = tsteps.make_schedule(schedule, lr, steps)
        fixed = tsteps.make_optimizer(optimizer, sched, weight_decay)
        tx = lambda _lr: fixed
        report = sched
    train_step, eval_step = tsteps.jit_steps(
        tsteps.make_train_step(graphdefs.train, tx(1.0 if lr is None else lr), report),
        tsteps.make_eval_step(graphdefs.eval), None)
    return tx, train_step, eval_step


def fit(model, ds, *, steps: int | None = None, epochs: int | None = None,
        batch_size: int = 128, lr: float = 1e-3, optimizer: str = "adam",
        schedule: str = "constant", weight_decay: float = 0.0, seed: int = 0,
        eval_every: int | None = None, eval_train: int = 0, eval_batch: int = 500,
        stop_on_divergence: bool = True, on_eval: Callable | None = None,
        tx: Any = None, prepare_train: Callable | None = None) -> History:
    """Train an nnx ``model`` on ``ds`` with ``train.steps``; evaluate as it goes.

    The train step is ``train.steps.make_train_step`` (jitted, NaN-guarded)
    and evaluation ``train.steps.make_eval_step`` (running statistics); the
    data order is ``train.data.train_batches(seed, epoch)``. Evaluation runs
    every ``eval_every`` steps (default: once per epoch) and at the end, on
    the whole ``ds.x_test`` and, if ``eval_train`` > 0, on the first
    ``eval_train`` training examples (in eval mode, for train/test gaps).

    A run whose loss stays non-finite (the guard skips those steps) for 20
    consecutive steps is stopped (checked every 50 steps) and marked
    ``diverged``.

    ``tx`` replaces the optimizer (an optax transformation; ``optimizer``,
    ``lr``, ``schedule`` and ``weight_decay`` are then ignored) and
    ``prepare_train(model)`` runs after ``model.train()`` and before the
    training graph is taken (e.g. ``jaxbn.freeze_stats``). Either one means
    the steps are compiled for this run alone.
    """
    import jax
    from train import data, steps as tsteps

    n = len(ds.x_train)
    spe = data.steps_per_epoch(n, batch_size)
    if spe == 0:
        raise ValueError(f"batch_size {batch_size} > {n} training examples")
    if steps is None:
        steps = spe * (epochs or 1)
    eval_every = eval_every or spe
    if prepare_train is None:
        graphdefs, params, model_state = tsteps.split_model(model)
    else:
        from flax import nnx
        model.train()
        prepare_train(model)
        train_def, params, model_state = nnx.split(model, nnx.Param, ...)
        model.eval()
        eval_def, _, _ = nnx.split(model, nnx.Param, ...)
        model.train()
        graphdefs = tsteps.Model(train_def, eval_def)
    # The train step donates its state: train on copies so that ``model`` can
    # be trained again (other learning rates, other seeds of the data order).
    params, model_state = jax.tree.map(lambda a: a.copy(), (params, model_state))
    if tx is None and prepare_train is None:
        const = schedule == "constant"
        make_tx, train_step, eval_step = _steps_for(
            graphdefs, optimizer, weight_decay, schedule,
            None if const else lr, None if const else steps)
        tx = make_tx(lr)
    else:
        import jax.numpy as jnp
        if tx is None:
            tx = tsteps.make_optimizer(optimizer, tsteps.make_schedule(schedule, lr, steps),
                                       weight_decay)
        train_step, eval_step = tsteps.jit_steps(
            tsteps.make_train_step(graphdefs.train, tx, lambda step: jnp.float32(0.0)),
            tsteps.make_eval_step(graphdefs.eval), None)
    state = tsteps.init_state(params, model_state, tx, seed)

    h = History(graphdefs=graphdefs)

    def do_eval(step):
        h.state = state
        h.eval_step.append(step)
        tl, ta = _evaluate(eval_step, state, ds.x_test, ds.y_test, eval_batch)
        h.test_loss.append(tl)
        h.test_acc.append(ta)
        if eval_train:
            l, a = _evaluate(eval_step, state, ds.x_train[:eval_train],
                             ds.y_train[:eval_train], eval_batch)
            h.train_loss.append(l)
            h.train_acc.append(a)
        if on_eval is not None:
            on_eval(step, h)

    t0 = time.perf_counter()
    step, epoch = 0, 0
    pending = []  # per-step metrics still on the device: fetched in bulk, not every step

    def flush():
        for m in jax.device_get(pending):
            h.step_loss.append(float(m["loss"]) if bool(m["finite"]) else float("nan"))
            h.step_grad_norm.append(float(m["grad_norm"]))
            if stop_on_divergence and int(m["bad_steps"]) >= 20:
                h.diverged = True
        pending.clear()

    while step < steps and not h.diverged:
        for xb, yb in data.train_batches(ds.x_train, ds.y_train, batch_size, seed=seed,
                                         epoch=epoch):
            state, m = train_step(state, (xb, yb))
            pending.append({k: m[k] for k in ("loss", "finite", "grad_norm", "bad_steps")})
            step += 1
            evaluate_now = step % eval_every == 0 or step == steps
            if evaluate_now or len(pending) >= 50:
                flush()
                if h.diverged:
                    break
            if evaluate_now:
                do_eval(step)
            if step >= steps:
                break
        epoch += 1
    flush()
    if h.diverged:
        do_eval(step)
    h.seconds = time.perf_counter() - t0
    h.steps = step
    h.state = state
    return h


def accuracy(model, x, y, *, batch_size: int = 500) -> float:
    """Test accuracy of an nnx ``model`` in its current mode (jitted per structure)."""
    from flax import nnx
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    f = _forward(graphdef)
    logits = np.concatenate([np.asarray(f(params, rest, x[lo:lo + batch_size]))
                             for lo in range(0, len(x), batch_size)])
    return float((logits.argmax(-1) == y).mean())


def table(rows: Sequence[dict], columns: Sequence[str] | None = None, *, fmt: dict | None = None,
          title: str | None = None) -> None:
    """A plain-text table (printed, so it survives in any notebook viewer)."""
    rows = list(rows)
    columns = list(columns or rows[0].keys())
    fmt = fmt or {}

    def cell(row, c):
        v = row.get(c, "")
        if v is None:
            return "-"
        f = fmt.get(c)
        if f is not None and not isinstance(v, str):
            return f.format(v)
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    body = [[cell(r, c) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    for b in body:
        lines.append("  ".join(v.ljust(w) for v, w in zip(b, widths)))
    print("\n".join(lines))


def smooth(values, window: int):
    """Trailing moving average that ignores NaN."""
    v = np.asarray(values, dtype=float)
    out = np.empty_like(v)
    for i in range(len(v)):
        w = v[max(0, i - window + 1):i + 1]
        w = w[np.isfinite(w)]
        out[i] = w.mean() if len(w) else np.nan
    return out


def setup_plots():
    import matplotlib.pyplot as plt
    plt.rcParams.update({"figure.dpi": 90, "savefig.dpi": 90, "axes.grid": True,
                         "grid.alpha": 0.3, "figure.figsize": (7.0, 4.0),
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt
