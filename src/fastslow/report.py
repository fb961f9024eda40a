"""The HTML report and its PNG plots, built from run directories (and a demo directory's extra files).

`build_report` accepts run dirs (with summary.json / metrics.jsonl) and demo dirs holding run dirs as
subfolders plus optional `plasticity.json` and `attribution.json`. The HTML is self-contained (PNGs as
base64 data URIs, inline CSS, no scripts, no network) so it opens offline. Anything missing is skipped
with a short note rather than an error: a partial run should still produce a readable report.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are built on servers and in CI
# Labels are user text (task names, run labels): '$...$' in one is not mathtext to parse (or to fail on).
matplotlib.rcParams["text.parse_math"] = False
import matplotlib.pyplot as plt  # noqa: E402

from fastslow.analysis import (  # noqa: E402
    Run,
    compare_runs,
    eval_curve,
    load_run,
    matrix_columns,
    reward_halfwidth,
    run_label,
)
from fastslow.stream import normalise_stage_curves, stage_spans  # noqa: E402

_METHOD_ORDER = ["base", "rl", "gepa", "memory", "fst", "fst+memory", "fst+gepa+memory"]
_COLORS = {"base": "#7f7f7f", "rl": "#1f77b4", "gepa": "#2ca02c", "memory": "#17becf", "fst": "#d62728",
           "fst+memory": "#ff7f0e", "fst+gepa+memory": "#9467bd"}
_FALLBACK_COLORS = ["#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#ff7f0e"]


# ---------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------


def _is_run_dir(d: Path) -> bool:
    return (d / "summary.json").exists() or (d / "metrics.jsonl").exists()


def discover(dirs: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """(run dirs, places to look for plasticity/attribution files), deduplicated, in a stable order.

    A given dir that is not itself a run dir is searched one level down for run dirs. Extra files are
    looked for in every given dir and in the parent of each given run dir.
    """
    runs: list[Path] = []
    extras: list[Path] = []

    def add(lst: list[Path], p: Path) -> None:
        p = p.resolve()
        if p not in lst:
            lst.append(p)

    for d in map(Path, dirs):
        if _is_run_dir(d):
            add(runs, d)
            add(extras, d)
            add(extras, d.parent)
        elif d.is_dir():
            add(extras, d)
            for sub in sorted(p for p in d.iterdir() if p.is_dir()):
                if _is_run_dir(sub):
                    add(runs, sub)
    return runs, extras


def _load_json(places: Sequence[Path], name: str) -> dict | None:
    for d in places:
        p = d / name
        if p.exists():
            try:
                data = json.loads(p.read_text(errors="replace"))
            except json.JSONDecodeError:
                continue
            if isinstance(data, dict):
                return data
    return None


def _method_key(label: str) -> tuple[int, str]:
    base = label.split("-")[0]
    return (_METHOD_ORDER.index(base) if base in _METHOD_ORDER else len(_METHOD_ORDER), label)


def _color(label: str, i: int = 0) -> str:
    return _COLORS.get(label.split("-")[0], _FALLBACK_COLORS[i % len(_FALLBACK_COLORS)])


# ---------------------------------------------------------------------------------------------------------
# Plots (each returns the PNG path, or None when there is nothing to draw)
# ---------------------------------------------------------------------------------------------------------


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reward_vs_rollouts(runs: dict[str, Run], path: Path) -> Path | None:
    curves = {lab: (eval_curve(r, "rollouts"), eval_curve(r, "total_rollouts")) for lab, r in runs.items()}
    if not any(c[0].reward for c in curves.values()):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for i, (lab, (slow, total)) in enumerate(curves.items()):
        if not slow.reward:
            continue
        col = _color(lab, i)
        for ax, c in zip(axes, (slow, total), strict=True):
            if max(c.x) == 0:
                # A fast-only run spends no rollouts on this axis: show its best level as a ceiling line.
                ax.axhline(c.peak[-1], color=col, ls="-.", lw=1.5, label=f"{lab} (0 rollouts; peak)")
            else:
                ax.plot(c.x, c.reward, color=col, lw=1.8, marker="o", ms=3, label=lab)
                ax.plot(c.x, c.peak, color=col, lw=1, ls=":", alpha=0.8)
    axes[0].set_xlabel("slow-channel rollouts")
    axes[1].set_xlabel("slow + fast-channel rollouts")
    axes[0].set_ylabel("mean eval reward (best prompt)")
    axes[0].set_title("counting slow rollouts only")
    axes[1].set_title("counting fast-channel rollouts too")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Reward vs rollouts (dotted: running peak)", fontsize=11)
    return _save(fig, path)


def plot_drift_frontier(runs: dict[str, Run], path: Path) -> Path | None:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    drawn = False
    for i, (lab, run) in enumerate(runs.items()):
        c = eval_curve(run, "step")
        pts = [(r, k) for r, k in zip(c.reward, c.kl, strict=True) if k is not None]
        if not pts:
            continue
        drawn = True
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=_color(lab, i), marker="o", ms=3, lw=1.3,
                label=lab)
        ax.plot(pts[-1][0], pts[-1][1], color=_color(lab, i), marker="*", ms=12)
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("mean eval reward (best prompt)")
    ax.set_ylabel("KL(pi || base) per token")
    ax.set_title("Drift frontier (star: final; lower-right is better)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_frontier(frontier: dict, regime: str, path: Path) -> Path | None:
    """The drift-plasticity frontier of one regime (``frontier.json`` of benchmarks/claims.py): final
    KL(pi||base) and KL(base||pi) against plasticity AUC and against forgetting, one point per run."""
    pts = [p for p in frontier.get("points") or [] if p.get("regime") == regime]
    if not pts:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    series = sorted({p["series"] for p in pts})
    markers = {m: "o^sDvP"[i % 6] for i, m in enumerate(sorted({p["method"] for p in pts}))}
    for row, y in enumerate(("plasticity_auc", "forgetting")):
        for col, kl in enumerate(("kl_rev", "kl_fwd")):
            ax = axes[row][col]
            for i, ser in enumerate(series):
                for method, marker in markers.items():
                    xy = [(p[kl], p[y]) for p in pts if p["series"] == ser and p["method"] == method
                          and p.get(kl) is not None and p.get(y) is not None]
                    if xy:
                        ax.scatter([a for a, _ in xy], [b for _, b in xy], marker=marker, s=28,
                                   color=_FALLBACK_COLORS[i % len(_FALLBACK_COLORS)],
                                   label=f"{method} {ser}" if row == col == 0 else None)
            rho = ((frontier.get("spearman") or {}).get(f"{regime}/{kl}~{y}") or {}).get("pooled") or {}
            tag = "" if rho.get("rho") is None else f"  rho={rho['rho']:.2f}"
            ax.set_xscale("symlog", linthresh=1e-3)
            ax.set_xlabel({"kl_rev": "final KL(pi || base)", "kl_fwd": "final KL(base || pi)"}[kl])
            ax.set_ylabel(y.replace("_", " "))
            ax.set_title(f"{kl} vs {y}{tag}", fontsize=9)
            ax.grid(alpha=0.3)
    fig.legend(fontsize=7, loc="upper center", ncol=5)
    fig.suptitle(f"Drift-plasticity frontier, {regime}-dominant stream (one point per run)", fontsize=10, y=0.0)
    return _save(fig, path)


def _bench_html(claims: dict | None, frontier: dict | None, plots: Path) -> list[str]:
    """The study's verdict table and frontier plots (benchmarks/claims.py), when its results are present."""
    out: list[str] = []
    if claims and claims.get("verdicts"):
        rows = [[html.escape(v["claim"]), html.escape(v["regime"]), f"<b>{html.escape(v['verdict'])}</b>",
                 html.escape(v["evidence"])] for v in claims["verdicts"]]
        out.append(_section(f"Paper claims over seeds {claims.get('seeds')}",
                            _table(["claim", "regime", "verdict", "evidence"], rows, text_cols=4)))
    if frontier and frontier.get("points"):
        body = []
        for regime in sorted({p["regime"] for p in frontier["points"]}):
            png = plot_frontier(frontier, regime, plots / f"frontier_{regime}.png")
            if png:
                body.append(_img(png, f"drift-plasticity frontier ({regime})"))
        def rho(v: dict) -> str:
            ci = "" if not v.get("ci") else f" [{v['ci'][0]:.2f}, {v['ci'][1]:.2f}]"
            return _fmt(v.get("rho"), 2) + ci

        rows = [[html.escape(k), rho(v["pooled"]), rho(v["partial"]),
                 "; ".join(f"{html.escape(m)} {rho(w)}" for m, w in v["within"].items()), str(v["pooled"]["n"])]
                for k, v in (frontier.get("spearman") or {}).items()]
        body.append(_table(["regime / pair", "pooled rho [95% CI]", "partial (method held)", "within each method",
                            "points"], rows)
                    + '<p class="meta">Intervals: cluster bootstrap over seeds (one point per run).</p>')
        out.append(_section("Drift-plasticity frontier", "".join(body)))
    return out


def plot_stream(runs: dict[str, Run], path: Path) -> Path | None:
    stages = next((r.summary.get("stages") for r in runs.values() if r.summary.get("stages")), None)
    if not stages:
        return None
    spans = stage_spans(stages)
    tasks = list(dict.fromkeys(st.get("task") for st in stages))
    raw = {}
    for lab, run in runs.items():
        raw[lab] = {}
        for t in tasks:
            k = f"eval/{t}/reward"
            raw[lab][t] = [(float(r["step"]), float(r[k])) for r in run.rows if r.get(k) is not None]
    if not any(pts for per in raw.values() for pts in per.values()):
        return None
    norm = normalise_stage_curves(raw, spans)
    fig, axes = plt.subplots(len(tasks), 1, figsize=(10, 2.3 * len(tasks) + 0.6), sharex=True, squeeze=False)
    for ti, t in enumerate(tasks):
        ax = axes[ti][0]
        for si, (st, (a, b)) in enumerate(zip(stages, spans, strict=True)):
            if st.get("task") == t:
                ax.axvspan(a, b, color="#f2e6b3", alpha=0.6, lw=0, label="training on the task" if ti == 0
                           and si == 0 else None)
        for a, _ in spans[1:]:
            ax.axvline(a, color="k", lw=0.8, ls="--", alpha=0.6)
        for i, (lab, per) in enumerate(norm.items()):
            pts = [(s, 100 * v) for s, v in per.get(t, []) if v is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=_color(lab, i), marker="o", ms=2.5,
                        lw=1.5, label=lab)
        ax.set_ylabel(f"{t}\n% of stage peak", fontsize=9)
        ax.set_ylim(-5, 110)
        ax.grid(alpha=0.3)
    axes[-1][0].set_xlabel("step (dashed: stage boundaries; shaded: stages training on that task)")
    # One legend above all panels, so it never hides a curve.
    handles, labels = axes[0][0].get_legend_handles_labels()
    seen = dict(zip(labels, handles, strict=True))
    fig.legend(list(seen.values()), list(seen), loc="upper center", ncol=len(seen), fontsize=9,
               bbox_to_anchor=(0.5, 0.995 - 0.35 / fig.get_figheight()))
    fig.suptitle("Task stream: per-task eval reward, normalised to the best method's peak in each stage",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.75 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_matrices(runs: dict[str, Run], path: Path) -> Path | None:
    items = [(lab, r.summary.get("matrix")) for lab, r in runs.items() if r.summary.get("matrix")]
    if not items:
        return None
    fig, axes = plt.subplots(1, len(items), figsize=(2.9 * len(items) + 1.8, 3.3), squeeze=False,
                             layout="constrained")
    im = None
    for k, (ax, (lab, m)) in enumerate(zip(axes[0], items, strict=True)):
        run = runs[lab]
        stage_tasks = [str(st.get("task", "?")) for st in run.summary.get("stages") or []]
        ncols = len(m[0]) if m else 0
        cols = matrix_columns(run.summary)
        cols = (cols + [f"task {j}" for j in range(len(cols), ncols)])[:ncols]
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i, row in enumerate(m):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=9,
                        color="white" if v < 0.6 else "black")
        ax.set_xticks(range(ncols), cols, rotation=30, ha="right", fontsize=8)
        rows = [f"after {t}" for t in stage_tasks[: len(m)]]
        rows += [f"stage {i}" for i in range(len(rows), len(m))]
        # Rows are labelled once, on the left panel, so labels never collide with the neighbour.
        ax.set_yticks(range(len(m)), rows if k == 0 else [""] * len(m), fontsize=8)
        ax.set_title(lab, fontsize=10)
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), shrink=0.85, label="reward")
    fig.suptitle("Accuracy matrix R[i][j]: reward on task j (column) after stage i (row)", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_plasticity(plast: dict, path: Path) -> Path | None:
    arms = plast.get("arms") or {}
    if not arms:
        return None
    names = sorted(arms, key=_method_key)
    cols = [_color(n, i) for i, n in enumerate(names)]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, title in ((axes[0], "final", "final reward"), (axes[1], "auc", "area under curve")):
        vals = [float(arms[n].get(key) or 0.0) for n in names]
        bars = ax.bar(names, vals, color=cols)
        for b, v in zip(bars, vals, strict=True):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("initialisation")
        ax.grid(axis="y", alpha=0.3)
    for i, n in enumerate(names):
        curve = arms[n].get("curve") or []
        if curve:
            axes[2].plot([p[0] for p in curve], [p[1] for p in curve], color=cols[i], lw=1.5, label=n)
    axes[2].set_title("fresh-RL curves", fontsize=10)
    axes[2].set_xlabel("probe step")
    axes[2].grid(alpha=0.3)
    if any(arms[n].get("curve") for n in names):
        axes[2].legend(fontsize=8)
    fig.suptitle(f"Plasticity: fresh RL on {plast.get('task', '?')} for {plast.get('steps', '?')} steps",
                 fontsize=11)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------
# HTML pieces
# ---------------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1180px;margin:24px auto;
padding:0 20px;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:4px}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:3px;
margin-top:34px}h3{font-size:1.02em;margin:18px 0 6px}
table{border-collapse:collapse;margin:8px 0 14px;font-size:0.9em}
th,td{border:1px solid #ccc;padding:4px 9px;text-align:right}th{background:#f3f3f3}
.l{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:6px 0}
pre{background:#f7f7f7;border:1px solid #e3e3e3;padding:8px;white-space:pre-wrap;font-size:0.85em;
max-height:260px;overflow:auto}
.note{color:#777;font-style:italic}.meta{color:#666;font-size:0.9em}
ul.happened li{margin:4px 0}
"""


def _fmt(v: object, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            return "n/a"
        if isinstance(v, int) or float(v).is_integer() and abs(v) >= 100:
            return f"{int(v):,}"
        if 0 < abs(v) < 10**-digits:
            return f"{v:.1e}"  # tiny drift early in training is not zero: don't print it as 0.000
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _count(v: float | None) -> str:
    """Rollout / step counts: whole numbers with thousands separators."""
    return "n/a" if v is None else f"{round(v):,}"


def _ratio(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}×"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], text_cols: int = 1) -> str:
    """Cells are pre-formatted HTML (already escaped where they carry user text).

    The first `text_cols` columns hold labels and are left-aligned; the rest are numbers, right-aligned.
    """

    # Free-text "note" columns read better left-aligned too.
    left = {i for i, h in enumerate(header) if i < text_cols or h == "note"}

    def cell(tag: str, i: int, c: str) -> str:
        return f'<{tag} class="l">{c}</{tag}>' if i in left else f"<{tag}>{c}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _section(title: str, body: str) -> str:
    return f"<h2>{html.escape(title)}</h2>\n{body}\n"


def _plain(v: object, digits: int = 3) -> str:
    """:func:`_fmt` as plain text (for sentences the page escapes as a whole)."""
    return html.unescape(_fmt(v, digits))


def _times(ratio: float | None, what: str) -> str:
    """'3.00x fewer X' / '2.00x more X' from an RL/method ratio (above 1 means the method needed fewer)."""
    if ratio is None:
        return "ratio undefined"
    if ratio >= 1:
        return f"{ratio:.2f}\u00d7 fewer {what}"
    return f"{1 / ratio:.2f}\u00d7 more {what}" if ratio > 0 else f"RL needed no {what}"


def _ci(ci: Sequence[float] | None, digits: int = 3) -> str:
    if not ci:
        return "[no interval]"
    return "[" + ", ".join("∞" if math.isinf(v) else f"{v:.{digits}f}" for v in ci) + "]"


def _pm(h: float | None) -> str:
    return "an unknown margin (eval n not recorded)" if h is None else f"±{h:.3f}"


def _band(d: dict) -> str:
    n = d.get("eval_n")
    return f"{_ci(d.get('peak_ci'))} (eval n={n} x {d.get('eval_tasks')} task(s))" if n else "(eval n unknown)"


def _evals(info: dict, *labels: str | None) -> str:
    ns = {lab: info[lab].get("eval_n") for lab in labels if lab in info}
    return "eval n " + ", ".join(f"{lab} {n if n else '?'}" for lab, n in ns.items())


def _what_happened(cmp: dict, runs: dict[str, Run], plast: dict | None) -> list[str]:
    """Plain sentences from the numbers, favourable or not (plain text: the page escapes them)."""
    out: list[str] = []
    info = cmp["runs"]
    peaks = {lab: d["peak"] for lab, d in info.items() if d["peak"] is not None}
    if peaks:
        best = max(peaks, key=peaks.get)
        out.append("Highest running-peak mean eval reward (95% interval from the eval size): "
                   + ", ".join(f"{lab} {peaks[lab]:.3f} {_band(info[lab])}" for lab in sorted(peaks, key=_method_key))
                   + (f" (best: {best})." if len(peaks) > 1 else "."))
    for method, agg in sorted((cmp.get("by_method") or {}).items(), key=lambda kv: _method_key(kv[0])):
        f = agg["final_eval"]
        out.append(f"{method} over {f['seeds']} seeds: final mean eval reward {_plain(f['mean'])} "
                   f"{_ci(f['ci'])} (Student t, 95%).")
    base = cmp.get("baseline")
    for lab, d in sorted(cmp["vs_rl"].items(), key=lambda kv: _method_key(kv[0])):
        se, mk = d["sample_efficiency"], d["kl_at_matched_reward"]
        ev, kv_ = se.get("evidence") or {}, mk.get("evidence") or {}
        if se.get("target") is None:
            out.append(f"{lab}: no RL eval curve to compare against.")
        elif not se["reached"]:
            best = info[lab]["peak"]
            out.append(f"{lab} did not reach RL's peak eval reward {se['target']:.3f} (its best: "
                       f"{_plain(best)}), so it has no sample-efficiency ratio.")
        elif ev.get("interval") is not None and not ev["enough"]:
            out.append(f"Sample efficiency of {lab} vs RL: too little evidence for a ratio: with RL's peak "
                       f"{se['target']:.3f} known to {_pm(ev.get('halfwidth'))} ({_evals(info, lab, base)}), the "
                       f"slow-rollout ratio could be anywhere in {_ci(ev.get('interval'), 2)}, which includes 1 "
                       f"(measured: {_ratio(se['slow']['ratio'])}).")
        else:
            slow, total = se["slow"], se["total"]
            s = (f"{lab} reached RL's peak ({se['target']:.3f}) after {_count(slow['fst'])} slow rollouts vs "
                 f"RL's {_count(slow['rl'])}: {_times(slow['ratio'], 'slow rollouts')} ("
                 + (f"interval {_ci(ev['interval'], 2)}, {_evals(info, lab, base)})" if ev.get("interval")
                    else "no interval: eval n not recorded)"))
            if total["ratio"] is not None:
                s += (f"; counting fast-channel rollouts too, {_count(total['fst'])} vs "
                      f"{_count(total['rl'])}: "
                      f"{_times(total['ratio'], 'rollouts')}")
            out.append(s + ".")
        fin = kv_.get("final") or {}
        final = (f"final KL {lab} {_plain(fin.get('kl_other'), 4)} vs RL {_plain(fin.get('kl_rl'), 4)}"
                 if fin.get("kl_rl") is not None else "")
        if mk.get("ratio") is not None and mk["kl_fst"] == 0:
            out.append(f"{lab}'s weights did not move (KL 0) while reaching reward {mk['reward']:.3f}; "
                       f"RL was at KL {mk['kl_rl']:.4f} there.")
        elif mk.get("ratio") is not None and kv_.get("interval") is not None and not kv_["enough"]:
            out.append(f"Drift at matched reward {mk['reward']:.3f} (known to {_pm(kv_.get('halfwidth'))}): "
                       f"too little evidence to compare: the KL ratio {lab}/RL could be anywhere in "
                       f"{_ci(kv_.get('interval'), 2)}, which includes 1 (interpolated: {lab} "
                       f"{mk['kl_fst']:.4f} vs RL {mk['kl_rl']:.4f}); {final}.")
        elif mk.get("ratio") is not None:
            change = (1 - mk["ratio"]) * 100
            word = f"{change:.0f}% less" if change > 0 else f"{-change:.0f}% more"
            out.append(f"At matched reward {mk['reward']:.3f}, {lab}'s KL(pi||base) is {mk['kl_fst']:.4f} vs "
                       f"RL's {mk['kl_rl']:.4f} (interpolated): {word} drift ({mk['ratio']:.2f}×, "
                       + (f"interval {_ci(kv_['interval'], 2)}" if kv_.get("interval")
                          else "no interval: eval n not recorded") + (f"); {final}." if final else ")."))
    if base is None and len(info) > 1:
        out.append("No rl run was given, so no comparison against RL was made.")
    # An asymptote only means something when the curve has bent: midpoint inside the data, A off its bound.
    fits = {lab: d["sigmoid"] for lab, d in info.items() if d["sigmoid"]}
    reliable = {lab for lab, f in fits.items() if _fit_reliable(f)}
    if base in fits and len(fits) > 1:
        for lab, f in fits.items():
            if lab == base:
                continue
            if lab in reliable and base in reliable:
                diff = (f["A"] - fits[base]["A"]) * 100
                out.append(f"Fitted asymptote A: {lab} {f['A']:.3f} vs RL {fits[base]['A']:.3f} "
                           f"({diff:+.1f} pp; one fit per run, no interval: read it beside the final evals).")
            else:
                shaky = ", ".join(x for x in (lab, base) if x not in reliable)
                out.append(f"No asymptote comparison for {lab} vs RL: the sigmoid fit of {shaky} is not "
                           "reliable (curve has not bent yet, or A sits on its bound).")
    for lab, d in info.items():
        cl = d.get("cl") or {}
        if cl.get("forgetting") is None or cl["forgetting"] <= 0.02:
            continue
        # a difference of two evals of one task: its margin is sqrt(2) times one eval's
        h = reward_halfwidth(d["final_eval"] or 0.5, d.get("eval_n"))
        margin = None if h is None else math.sqrt(2) * h
        if margin is not None and cl["forgetting"] <= margin:
            out.append(f"{lab}'s forgetting {cl['forgetting']:.3f} is within the eval margin "
                       f"±{margin:.3f} (eval n={d.get('eval_n')}): too little evidence that it forgot.")
        else:
            out.append(f"{lab} forgot: mean max-based forgetting {cl['forgetting']:.3f} "
                       f"({'margin unknown' if margin is None else f'eval margin ±{margin:.3f}'}), "
                       f"BWT {_plain(cl.get('bwt'))}.")
    if plast and plast.get("arms"):
        arms = plast["arms"]
        parts = ", ".join(f"{n} {_plain(arms[n].get('final'))}" for n in sorted(arms, key=_method_key))
        task = str(plast.get("task", "?"))
        out.append(f"Plasticity (final reward of fresh RL on {task}; one probe each, no interval): {parts}.")
        floor = (arms.get("base") or {}).get("final")
        if floor is not None:
            lost = [n for n in arms if n != "base" and (arms[n].get("final") or 0) < floor - 0.02]
            if lost:
                out.append("Lower plasticity than the base model: " + ", ".join(sorted(lost, key=_method_key))
                           + ".")
    return out


def _fit_reliable(f: dict) -> bool:
    return bool(f["success"] and not f["extrapolated"] and 1e-3 < f["A"] < 1 - 1e-3)


def _attribution_html(attr: dict) -> str:
    parts = []
    for method in sorted(attr, key=_method_key):
        per_task = attr[method] or {}
        rows = []
        for task, cell in per_task.items():
            g = {k: cell.get(k) for k in ("base_seed", "base_evolved", "trained_seed", "trained_evolved")}

            def gain(a: str, b: str, g: dict = g) -> str:
                return _fmt(g[a] - g[b]) if g[a] is not None and g[b] is not None else "n/a"

            rows.append([html.escape(task), "base", _fmt(g["base_seed"]), _fmt(g["base_evolved"]),
                         gain("base_evolved", "base_seed")])
            rows.append(["", f"trained ({html.escape(method)})", _fmt(g["trained_seed"]),
                         _fmt(g["trained_evolved"]), gain("trained_evolved", "trained_seed")])
            rows.append(["", "<i>weights gain</i>", gain("trained_seed", "base_seed"),
                         gain("trained_evolved", "base_evolved"), ""])
        parts.append(f"<h3>{html.escape(method)}</h3>" + _table(
            ["task", "weights", "seed prompt", "evolved best prompt", "prompt gain"], rows, text_cols=2))
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------


def _json_safe(o: object) -> object:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    return o


def _figures_html(runs: dict[str, Run], plast: dict | None, plots: Path) -> list[str]:
    def figure(title: str, png: Path | None, missing: str, caption: str = "") -> str:
        if png is None:
            return _section(title, _note(missing))
        return _section(title, _img(png, title) + (f'<p class="meta">{caption}</p>' if caption else ""))

    sec = [
        figure("Reward vs rollouts", plot_reward_vs_rollouts(runs, plots / "reward_vs_rollouts.png"),
               "No eval rows logged.",
               "Mean eval reward over the run's tasks with the best prompt. Left: x counts slow-channel (RL) "
               "rollouts only, as the paper does; right: fast-channel (GEPA) rollouts added."),
        figure("Drift frontier", plot_drift_frontier(runs, plots / "drift_frontier.png"),
               "No steps log both an eval reward and drift/kl_rev.",
               "KL(pi||base) is measured on fixed probes with the seed prompt, so it reflects the weights "
               "alone."),
        figure("Stream", plot_stream(runs, plots / "stream.png"), "No stages in the summaries.",
               "Each point is divided by the highest reward any method reached on that task within the same "
               "stage."),
        figure("Accuracy matrix", plot_matrices(runs, plots / "accuracy_matrix.png"),
               "No accuracy matrix in the summaries."),
        figure("Plasticity", plot_plasticity(plast, plots / "plasticity.png") if plast else None,
               "No plasticity.json found."),
    ]
    if plast and plast.get("arms"):
        arms = plast["arms"]
        sec[-1] += _table(["initialisation", "final reward", "AUC"],
                          [[html.escape(n), _fmt(arms[n].get("final")), _fmt(arms[n].get("auc"))]
                           for n in sorted(arms, key=_method_key)])
    return sec


def _tables_html(runs: dict[str, Run], cmp: dict) -> str:
    info = cmp["runs"]
    parts = []
    # Final reward per task: seed prompt / best prompt, plus the base model's seed-prompt reward if known.
    tasks = list(dict.fromkeys(t for r in runs.values() for t in r.tasks))
    base_rewards = next((r.summary["base_rewards"] for r in runs.values()
                         if isinstance(r.summary.get("base_rewards"), dict)), None)
    agnostic = any("reward_agnostic" in (c or {}) for d in info.values() for c in d["final"].values())
    rows = [["base model"] + [f"{_fmt(base_rewards.get(t))} / n/a" for t in tasks]] if base_rewards else []
    for lab, d in info.items():
        cells = [d["final"].get(t) or {} for t in tasks]
        rows.append([html.escape(lab)] + [
            f"{_fmt(c.get('reward_seed_prompt'))} / <b>{_fmt(c.get('reward'))}</b>"
            + (f" / {_fmt(c.get('reward_agnostic'))}" if agnostic else "") for c in cells])
    head = "seed prompt / best prompt" + (" (task-aware) / one context for all tasks (task-agnostic)" if agnostic
                                          else "")
    parts.append(f"<h3>Final reward per task ({head})</h3>"
                 + (_table(["method"] + [html.escape(t) for t in tasks], rows) if tasks and info
                    else _note("No final rewards.")))
    cl_rows = [[html.escape(lab)] + [_fmt(d["cl"].get(k)) for k in ("acc", "bwt", "fwt", "forgetting")]
               for lab, d in info.items()]
    cl_rows += [[f"{html.escape(lab)} (task-agnostic)"] + [_fmt(r.summary["cl_agnostic"].get(k))
                                                        for k in ("acc", "bwt", "fwt", "forgetting")]
                for lab, r in runs.items() if isinstance(r.summary.get("cl_agnostic"), dict)]
    parts.append("<h3>Continual-learning metrics</h3>" + _table(["method", "ACC", "BWT", "FWT", "forgetting"], cl_rows)
                 + ('<p class="meta">Task-agnostic rows: every task evaluated with one context, as if the method '
                    "were not told the task; the others are task-aware.</p>" if len(cl_rows) > len(info) else ""))
    per_task_rows = [
        [html.escape(lab), html.escape(name), str(t.get("first")), str(t.get("last"))]
        + [_fmt(t.get(k)) for k in ("final", "bwt", "forgetting", "fwt")]
        for lab, d in info.items() for name, t in ((d["cl"] or {}).get("per_task") or {}).items()
    ]
    if per_task_rows:
        parts.append("<h4>Per task (stages counted from 0; empty = no term)</h4>" + _table(
            ["method", "task", "first stage", "last stage", "final", "BWT", "forgetting", "FWT"], per_task_rows))
    drift_keys = ("kl_rev", "kl_fwd", "weight_l2", "entropy")
    parts.append("<h3>Final drift</h3>" + _table(
        ["method", "KL(pi||base)", "KL(base||pi)", "weight L2", "entropy"],
        [[html.escape(lab)] + [_fmt(d["drift"].get(k), 4) for k in drift_keys] for lab, d in info.items()]))
    health = [(lab, r.summary["fast"]) for lab, r in runs.items() if isinstance(r.summary.get("fast"), dict)]
    if health:  # a dead reflector must show: calls, failures, what was accepted
        parts.append("<h3>Fast channel health</h3>" + _table(
            ["method", "reflection calls", "reflection errors", "failed calls", "accepted", "rounds, none accepted"],
            [[html.escape(lab)] + [_count(f.get(k)) for k in ("reflection_calls", "reflection_errors",
                                                              "failed_reflection_calls", "accepted_total",
                                                              "rounds_nothing_accepted")] for lab, f in health]))
    memory = [(lab, r.summary["memory"]) for lab, r in runs.items() if isinstance(r.summary.get("memory"), dict)]
    if memory:  # the experience memory's size at the end, and what the caps and the curator threw away
        keys = ("lessons", "cases", "evicted_total", "refused_lessons", "context_tokens_max", "round_errors",
                "retrieval_errors", "eval_leaks_refused")
        parts.append("<h3>Experience memory at the end</h3>" + _table(
            ["method", "lessons", "cases", "evicted + dropped", "lessons refused (too long)", "max context tokens",
             "curator round errors", "retrieval errors", "eval problems refused"],
            [[html.escape(lab)] + [_count(m.get(k)) for k in keys] for lab, m in memory]))
    if cmp["vs_rl"]:
        se_rows, mk_rows = [], []
        for lab, d in cmp["vs_rl"].items():
            se, mk = d["sample_efficiency"], d["kl_at_matched_reward"]
            slow, total = se["slow"], se["total"]
            ev, kv_ = se.get("evidence") or {}, mk.get("evidence") or {}
            fin = kv_.get("final") or {}
            se_rows.append([html.escape(lab), _fmt(se["target"]), _fmt(se["reached"]), _count(slow["rl"]),
                            _count(slow["fst"]), _ratio(slow["ratio"]),
                            _ci(ev.get("interval"), 2) + ("" if ev.get("enough") else " too little evidence"),
                            _count(total["rl"]),
                            _count(total["fst"]), _ratio(total["ratio"]),
                            _ratio(se["steps"]["ratio"]), html.escape(se.get("note", ""))])
            mk_rows.append([html.escape(lab), _fmt(mk["reward"]), _fmt(mk["kl_rl"], 4), _fmt(mk["kl_fst"], 4),
                            _fmt(mk["ratio"]),
                            _ci(kv_.get("interval"), 2) + ("" if kv_.get("enough") else " too little evidence"),
                            _fmt(fin.get("kl_rl"), 4), _fmt(fin.get("kl_other"), 4), _fmt(fin.get("ratio")),
                            html.escape(mk.get("note", ""))])
        parts.append("<h3>Sample efficiency vs RL</h3>" + _table(
            ["method", "RL peak R*", "reached", "RL slow", "it slow", "ratio (slow)", "95% range", "RL total",
             "it total",
             "ratio (slow+fast)", "steps ratio", "note"], se_rows)
            + '<p class="meta">Rollouts at the first eval where each run\'s running max reaches R*; '
              "ratio = RL's / this method's (above 1: fewer needed).</p>")
        parts.append("<h3>KL at matched reward</h3>" + _table(
            ["method", "matched reward", "KL RL", "KL method", "ratio (method / RL)", "95% range", "final KL RL",
             "final KL method", "final ratio", "note"], mk_rows)
            + '<p class="meta">Interpolated at the matched reward; the range reads both trajectories at the reward '
              "level plus and minus its 95% margin from the eval size. Final KLs are measured, not interpolated.</p>")
    else:
        parts.append(_note("Sample efficiency and KL at matched reward need an rl run and another method."))
    fit_rows = []
    for lab, d in info.items():
        f = d["sigmoid"]
        fit_cells = ([_fmt(f["A"]), _fmt(f["B"], 2), _fmt(f["C_mid"], 1), _fmt(f["R0"]),
                      "reliable" if _fit_reliable(f) else "unreliable" if f["success"] else "failed"]
                     if f else ["n/a"] * 4 + ["too few points"])
        fit_rows.append([html.escape(lab), _fmt(d["peak"])] + fit_cells)
    parts.append("<h3>Sigmoid fit (ScaleRL) over steps</h3>" + _table(
        ["method", "observed peak", "asymptote A", "B", "C_mid", "R0", "fit"], fit_rows)
        + '<p class="meta">R - R0 = (A - R0) / (1 + (C_mid / C)^B) fit to the mean eval reward over steps; '
          "unreliable: the midpoint lies beyond the data or A sits on its bound.</p>")
    return _section("Tables", "".join(parts))


def _prompts_html(runs: dict[str, Run]) -> str:
    parts = []
    for lab, run in runs.items():
        ps = run.summary.get("prompts") or []
        parts.append(f"<h3>{html.escape(lab)} ({len(ps)} prompt{'s' if len(ps) != 1 else ''})</h3>")
        parts.extend(f"<pre>{html.escape(str(p))}</pre>" for p in ps)
        if not ps:
            parts.append(_note("No prompts recorded."))
    return _section("Final prompt population", "".join(parts) if parts else _note("No runs."))


def _serve_rows(run_dir: Path) -> list[dict]:
    """The ``serve_*`` event rows of a serving run's metrics.jsonl, in order (unmerged: several share a step)."""
    path = Path(run_dir) / "metrics.jsonl"
    found = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and str(row.get("event", "")).startswith("serve_"):
            found.append(row)
    return found


def _serve_html(runs: dict[str, Run], plots: Path) -> list[str]:
    """Serving runs (fastslow serve --learn): served reward and the served version's drift over time, and every
    promotion and rejection of the drift gate."""
    out = []
    for label, run in runs.items():
        rows = _serve_rows(run.path)
        if not rows:
            continue
        t0 = rows[0]["time"]
        windows = [r for r in rows if r["event"] == "serve_window"]
        gates = [r for r in rows if r["event"] in ("serve_promoted", "serve_rejected")]
        parts = []
        if windows or gates:
            fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
            ax1.plot([(r["time"] - t0) for r in windows], [r["serve/reward"] for r in windows], marker=".",
                     label="served (feedback)")
            promoted = [r for r in gates if r["event"] == "serve_promoted"]
            ax1.plot([(r["time"] - t0) for r in promoted], [r["serve/candidate_reward"] for r in promoted], "^",
                     label="held-out, promoted version")
            ax1.set(xlabel="seconds since start", ylabel="reward", title="served reward")
            ax1.legend(fontsize=8)
            kl = [(r["time"] - t0, r["drift/kl_rev"]) for r in rows if "drift/kl_rev" in r]
            ax2.step([t for t, _ in kl], [v for _, v in kl], where="post", label="served version")
            for r in gates:
                ax2.plot(r["time"] - t0, r["serve/candidate_kl"], "^" if r["event"] == "serve_promoted" else "x",
                         color="green" if r["event"] == "serve_promoted" else "red")
            ax2.set(xlabel="seconds since start", ylabel="KL(pi||base) per token", title="drift (x: rejected)")
            name = "".join(c if c.isalnum() else "_" for c in label)
            parts.append(_img(_save(fig, plots / f"serve_{name}.png"), f"serving {label}"))
        table = [[r["event"].removeprefix("serve_"), f"{r['time'] - t0:.1f}", f"w{r['serve/weights_version']}",
                  _fmt(r.get("serve/candidate_kl")), _fmt(r.get("serve/candidate_reward")),
                  _fmt(r.get("serve/served_reward")), html.escape(str(r.get("reason", "")))] for r in gates]
        parts.append(_table(["gate", "at (s)", "served after", "KL", "held-out reward", "served before", "reason"],
                            table) if table else _note("No candidate gated yet."))
        out.append(_section(f"Serving: {label}", "".join(parts)))
    return out


def build_report(dirs: Sequence[Path], out: Path) -> Path:
    """Write out/report.html, out/plots/*.png and out/analysis.json from run or demo dirs.

    Returns the path of report.html. Never fails on missing pieces: each is replaced by a short note.
    """
    out = Path(out)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    run_dirs, extras = discover([Path(d) for d in dirs])
    loaded = [load_run(d) for d in run_dirs]
    runs = dict(sorted(((run_label(r, loaded), r) for r in loaded), key=lambda kv: _method_key(kv[0])))
    plast = _load_json(extras, "plasticity.json")
    attr = _load_json(extras, "attribution.json")
    cmp = compare_runs(list(runs.values()))
    (out / "analysis.json").write_text(json.dumps(_json_safe(cmp), indent=2))

    sec: list[str] = []
    if not runs:
        sec.append(_note("No run directories found (looked for summary.json or metrics.jsonl)."))
    happened = _what_happened(cmp, runs, plast)
    # every value in them may be the runs' text (a method, a task name): escaped whole, the verdict then marked
    items = "".join("<li>" + html.escape(s).replace("too little evidence", "<b>too little evidence</b>") + "</li>"
                    for s in happened)
    sec.append(_section("What happened", f'<ul class="happened">{items}</ul>' if happened
                        else _note("Not enough data to say.")))
    sec += _figures_html(runs, plast, plots)
    sec += _serve_html(runs, plots)
    sec.append(_section("Channel attribution (2x2)", _attribution_html(attr) if attr
                        else _note("No attribution.json found.")))
    sec.append(_tables_html(runs, cmp))
    sec += _bench_html(_load_json(extras, "claims.json"), _load_json(extras, "frontier.json"), plots)
    sec.append(_prompts_html(runs))

    listing = ", ".join(html.escape(str(d)) for d in run_dirs) or "none"
    doc = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>fastslow report</title>'
           f"<style>{_CSS}</style></head><body><h1>fastslow report</h1>"
           f'<p class="meta">Runs: {listing}</p>{"".join(sec)}</body></html>')
    path = out / "report.html"
    path.write_text(doc)
    return path
