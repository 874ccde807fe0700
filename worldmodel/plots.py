"""`python run.py plot`: learning curves of a run, from its metrics files, as PNGs.

- ``plots/vae.png``   V per epoch: recon, KL (floored, and raw), total loss; train and validation.
- ``plots/m.png``     M per epoch: z NLL, reward, done, total loss (train and validation), and the
                      done head's precision / recall / false early deaths on real episodes.
- ``plots/dream.png`` C per CMA-ES generation: dream score (population mean ± std, best, centre)
                      and the real score of the centre where it was checked.

A plot whose metrics file does not exist yet is skipped.  Each stage may call
:func:`plot_run` when it finishes; it only reads the metrics and rewrites the PNGs.
Matplotlib draws through its Agg canvas directly, without pyplot's global state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worldmodel.io import atomic_path, read_jsonl
from worldmodel.runs import Run

VAE_TERMS = (("recon", "reconstruction  Σ(x - x̂)²"), ("kl", "KL (free bits)"), ("kl_raw", "KL (raw)"),
             ("loss", "loss = recon + β·KL"))
M_TERMS = (("z_nll", "z NLL  -log p(z'|h)"), ("reward", "reward MSE"), ("done", "done BCE"),
           ("loss", "loss"))
DONE_QUALITY = (("done_precision", "precision"), ("done_recall", "recall"),
                ("false_early_death_rate", "false early deaths"))


# ----------------------------------------------------------------- helpers

def _figure(panels: int, width: float = 4.0, height: float = 3.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = 2 if panels == 4 else min(panels, 3)
    rows = -(-panels // cols)
    fig = Figure(figsize=(width * cols, height * rows))
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(panels)]


def _save(fig, path: Path) -> str:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs and generations
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return str(path)


def _last_per(records: list[dict], key: str) -> list[dict]:
    """One record per value of ``key`` (the last one written: a resumed stage may repeat one), sorted."""
    by = {r[key]: r for r in records if isinstance(r.get(key), (int, float))}
    return [by[k] for k in sorted(by)]


def _series(records: list[dict], x_key: str, y_key: str) -> tuple[list, list]:
    pairs = [(r[x_key], r[y_key]) for r in records if isinstance(r.get(y_key), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _line(ax, records: list[dict], x_key: str, y_key: str, label: str, **style) -> bool:
    xs, ys = _series(records, x_key, y_key)
    if xs:
        ax.plot(xs, ys, label=label, **{"marker": "o", "markersize": 3, **style})
    return bool(xs)


def _has_signal(records: list[dict], keys: list[str]) -> bool:
    """Some value of ``keys`` is non-zero (a head that is not trained, such as M's reward
    with ``model.predict_reward`` off, logs 0 throughout and gets no panel)."""
    return any(v != 0 for key in keys for v in _series(records, "epoch", key)[1])


def _term_panels(records: list[dict], terms: tuple, keys: tuple[str, str], title: str, path: Path,
                 extra: tuple = ()) -> str | None:
    """One panel per loss term with train and validation lines (``keys``: formats of the two names)."""
    shown = [(t, label) for t, label in terms if _has_signal(records, [k.format(t) for k in keys])]
    extra_shown = [(k, label) for k, label in extra if _series(records, "epoch", k)[0]]
    if not shown and not extra_shown:
        return None
    fig, axes = _figure(len(shown) + bool(extra_shown))
    for ax, (term, label) in zip(axes, shown):
        for fmt, split in zip(keys, ("train", "validation")):
            _line(ax, records, "epoch", fmt.format(term), split)
        ax.set_title(label, fontsize="medium")
        ax.set_xlabel("epoch")
        ax.legend(fontsize="small")
    if extra_shown:
        ax = axes[-1]
        for key, label in extra_shown:
            _line(ax, records, "epoch", key, label)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title("done head on real episodes", fontsize="medium")
        ax.set_xlabel("epoch")
        ax.legend(fontsize="small")
    fig.suptitle(title)
    return _save(fig, path)


# ----------------------------------------------------------------- the three plots

def plot_vae(records: list[dict], path: Path) -> str | None:
    """V's loss terms per epoch; keys ``train_<term>`` / ``val_<term>`` (worldmodel/train_vae.py)."""
    return _term_panels(_last_per(records, "epoch"), VAE_TERMS, ("train_{}", "val_{}"), "V: ConvVAE", path)


def plot_m(records: list[dict], path: Path) -> str | None:
    """M's loss terms per epoch; keys ``train/<term>`` / ``val/<term>`` and done quality (train_m.py)."""
    return _term_panels(_last_per(records, "epoch"), M_TERMS, ("train/{}", "val/{}"), "M: world model",
                        path, extra=DONE_QUALITY)


def plot_dream(records: list[dict], path: Path, retrained_at: tuple[int, ...] = ()) -> str | None:
    """Dream and real score per CMA-ES generation (agents/cmaes.py's records).

    retrained_at: generations after which ``iterate`` collected new data and retrained M
    (dotted lines: the dream changes there, so dream scores before and after differ in kind).
    """
    records = _last_per(records, "generation")
    if not records:
        return None
    fig, (ax,) = _figure(1, width=7.0, height=4.0)
    xs, mean = _series(records, "generation", "dream_mean")
    _, std = _series(records, "generation", "dream_std")
    if xs:
        line = ax.plot(xs, mean, label="dream: population mean")[0]
        if len(std) == len(mean):
            lo = [m - s for m, s in zip(mean, std)]
            hi = [m + s for m, s in zip(mean, std)]
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    _line(ax, records, "generation", "dream_best", "dream: best candidate", markersize=2)
    _line(ax, records, "generation", "centre_dream", "dream: centre", markersize=2)
    real = [r for r in records if isinstance(r.get("real_mean"), (int, float))]
    if real:
        errs = [r.get("real_std") or 0.0 for r in real]
        ax.errorbar([r["generation"] for r in real], [r["real_mean"] for r in real], yerr=errs,
                    fmt="o-", color="black", capsize=3, label="real: centre")
    for i, generation in enumerate(retrained_at):
        ax.axvline(generation, color="grey", linestyle=":", label="new data, M retrained" if i == 0 else None)
    ax.set_xlabel("generation")
    ax.set_ylabel("score")
    ax.set_title("C: CMA-ES in the dream", fontsize="medium")
    ax.legend(loc="best", fontsize="small")
    return _save(fig, path)


PLOTTERS = {"vae": plot_vae, "m": plot_m, "dream": plot_dream}


def plot_run(run: Run, stages: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Write ``plots/{vae,m,dream}.png`` from the run's metrics (``stages``: a subset; default all).

    Returns {stage: PNG path, or why it was skipped}.
    """
    summary: dict[str, Any] = {}
    for stage in stages or tuple(PLOTTERS):
        metrics = run.dir / "metrics" / f"{stage}.jsonl"
        records = read_jsonl(metrics)
        if not records:
            summary[stage] = f"skipped (no records in {metrics})"
            continue
        path = run.dir / "plots" / f"{stage}.png"
        if stage == "dream":
            iterations = read_jsonl(run.dir / "metrics" / "iterate.jsonl")
            starts = tuple(r["generation"] - run.cfg.iterate.generations for r in iterations)
            written = plot_dream(records, path, retrained_at=starts)
        else:
            written = PLOTTERS[stage](records, path)
        summary[stage] = written or f"skipped (no plottable values in {metrics})"
    return summary
