"""The human-readable run report (reports/report.md): evaluation tables, other stages' metrics, every figure.

`render_report` is pure (metrics in, Markdown out); `write_report` collects the inputs from a project folder:
metrics/*.json of every stage (optional ones are skipped when absent), PNGs in reports/figures/ and other stage
reports (reports/*.md), and writes reports/report.md atomically. Figure links are relative to reports/.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pdae.evaluate import ROWS, table_rows
from pdae.io import write_text

# The paper's anchor numbers (docs/method.md §7: CelebA-HQ 128, trained on FFHQ 128, T = 100), for orientation only.
PAPER_ANCHORS = [
    ("DDIM baseline (inferred x_T)", "49,152", 0.917, 0.063, 0.002),
    ("Diff-AE @130M, random x_T", "512", 0.677, 0.073, 0.007),
    ("PDAE @64M, random x_T", "512", 0.696, 0.094, 0.005),
    ("Diff-AE @130M, inferred x_T", "49,664", 0.991, 0.011, 6.07e-5),
    ("PDAE @64M, inferred x_T", "49,664", 0.993, 0.008, 5.48e-5),
]
STAGES = ("prepare", "baseline", "train", "encode", "classify", "latent")
FID_LABELS = {
    "ddim_samples": "bare DPM samples (DDIM)",
    "latent_dpm_samples": "latent-DPM samples (PDAE decoder)",
    "random_xT_reconstructions": "PDAE reconstructions, random x_T",
    "real_test": "real test images (floor at this sample size)",
}


def fmt(value: Any) -> str:
    """Compact table cell: 4 significant digits, scientific for small numbers, '—' for None."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.3g}"
    return f"{value:.4g}"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def reconstruction_markdown(metrics: Mapping[str, Any]) -> str:
    """The reconstruction table (rows grouped by T) in Markdown."""
    order = list(ROWS)
    ranked = sorted(
        table_rows(dict(metrics)), key=lambda r: (r["T"], order.index(r["row"]) if r["row"] in order else 9)
    )

    def cell(r: Mapping[str, Any], k: str) -> str:
        return fmt(r.get(k)) if r.get(f"{k}_sd") is None else f"{fmt(r[k])} ± {fmt(r[k + '_sd'])}"

    rows = [[f"T = {r['T']}", r["label"], r.get("latent_dim"), *(cell(r, k) for k in ("ssim", "lpips", "mse"))]
            for r in ranked]  # fmt: skip
    return _table(["steps", "model", "latent dim", "SSIM ↑ (± sd)", "LPIPS ↓ (± sd)", "MSE ↓ (± sd)"], rows)


def interval_cell(res: Mapping[str, Any], key: str) -> str:
    """'value [low, high]' of res[key] and its interval keys, or the bare value / '—' when they are absent."""
    if res.get(key) is None or res.get(f"{key}_low") is None:
        return fmt(res.get(key))
    return f"{fmt(res[key])} [{fmt(res[key + '_low'])}, {fmt(res[key + '_high'])}]"


def fid_markdown(metrics: Mapping[str, Any]) -> str:
    """Classifier FD / FID / KID per set with intervals in Markdown, headline first (skipped sets show the reason)."""
    lead = (metrics.get("fid_headline") or {}).get("statistic") or "fid"
    stats = [lead] + [s for s in ("classifier_fd", "fid", "kid") if s != lead]
    names = {"classifier_fd": "classifier FD ↓", "fid": "FID ↓", "kid": "KID ↓"}
    rows = []
    for key, res in metrics.get("fid", {}).items():
        cells = [interval_cell(res, s) for s in stats]
        rows.append([FID_LABELS.get(key, key), res.get("n_generated"), res.get("n_real"), *cells,
                     res.get("reason") or ""])  # fmt: skip
    table = _table(["set", "n generated", "n real", *(names[s] for s in stats), "note"], rows)
    verdicts = [f"- {pair.replace('_vs_', ' vs ')}: " + "; ".join(f"{k}: {v}" for k, v in row.items())
                for pair, row in metrics.get("fid_comparisons", {}).items()]  # fmt: skip
    head = "\n\nRankings (only where the 95% intervals separate):\n\n"
    return table + (head + "\n".join(verdicts) if verdicts else "")


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, list) and len(obj) > 8:
        return {prefix[:-1]: f"[{len(obj)} values]"}
    return {prefix[:-1]: obj}


def stage_metrics_markdown(name: str, metrics: Mapping[str, Any], limit: int = 40) -> str:
    """Key/value table of one stage's metrics file (nested keys dotted, long lists summarised)."""
    items = list(_flat(metrics).items())
    rows = [[f"`{k}`", v if not isinstance(v, str) else v[:160]] for k, v in items[:limit]]
    more = f"\n\n… {len(items) - limit} more keys in metrics/{name}.json" if len(items) > limit else ""
    return _table(["metric", "value"], rows) + more


def render_report(
    metrics: Mapping[str, Any],
    stage_metrics: Mapping[str, Mapping[str, Any]] | None = None,
    figures: list[str] | None = None,
    other_reports: list[str] | None = None,
    info: Mapping[str, Any] | None = None,
) -> str:
    """Markdown of the run: evaluation tables, the gap, other stages' metrics and all figures.

    metrics: the evaluate metrics dict; stage_metrics: {stage: metrics dict}; figures: PNG paths relative to the
    report's folder; other_reports: Markdown files relative to it; info: run facts (commit, MLflow run id, ...).
    """
    out = ["# PDAE run report", ""]
    facts = {"generated": _dt.datetime.now().isoformat(timespec="seconds"), **(info or {})}
    out += [f"- **{k}**: {v}" for k, v in facts.items() if v not in (None, "")]
    out += ["", "## Autoencoding reconstruction (docs/method.md §6)", ""]
    if "reconstruction" in metrics:
        inv = metrics.get("inversion_steps")
        inv = f"one shared {inv}-step inversion" if isinstance(inv, int) else "T-step inversion (as decoding)"
        out += [
            f"{metrics.get('n_images')} test images; x_T inferred by DDIM {inv}; random x_T is the same Gaussian "
            "noise for every T. SSIM (Gaussian 11, σ 1.5) and MSE on [0, 1], LPIPS AlexNet v0.1; mean ± per-image "
            "standard deviation.",
            "",
            reconstruction_markdown(metrics),
            "",
        ]
        if metrics.get("lpips_reason"):
            out += [f"LPIPS not computed: {metrics['lpips_reason']}.", ""]
        out += ["Paper anchors (CelebA-HQ 128, T = 100) for orientation — not comparable to a small embedded run:", ""]
        out += [_table(["model", "latent dim", "SSIM", "LPIPS", "MSE"], [list(a) for a in PAPER_ANCHORS]), ""]
    else:
        out += ["Not computed (no image metric requested).", ""]
    out += ["## FID / KID", ""]
    if "fid" in metrics:
        s = metrics.get("fid_settings", {})
        out += [
            f"Reference: {s.get('n_real')} real {s.get('real_split')} images; generated sets decoded with "
            f"{s.get('steps')} DDIM steps. Inception-2015-12-05 pool3 features for FID/KID (KID: unbiased MMD² over "
            "the full sets), the label classifier's penultimate features for classifier FD; "
            f"[low, high] = {s.get('interval', 'bootstrap interval')}, {s.get('n_boot')} resamples. Fréchet "
            "distances are biased upwards at finite size: the real-test row is the floor. Headline statistic "
            f"(tighter intervals): {(metrics.get('fid_headline') or {}).get('statistic')}.",
            "",
            fid_markdown(metrics),
            "",
        ]
    else:
        out += ["Not computed (`fid` not in evaluate.metrics).", ""]
    out += ["## Posterior mean gap", ""]
    if metrics.get("gap_reduction") is not None:
        interval = interval_cell(metrics, "gap_reduction")
        out += [f"Gap reduction (1 − mean ratio with/without the shift, t ≥ T/10) on {metrics.get('gap_images')} "
                f"test images: **{interval}** (95% bootstrap interval over images).", ""]  # fmt: skip
    for name, values in (stage_metrics or {}).items():
        out += [f"## Stage `{name}` (metrics/{name}.json)", "", stage_metrics_markdown(name, values), ""]
    if other_reports:
        out += ["## Other reports", ""] + [f"- [{r}]({r})" for r in other_reports] + [""]
    out += ["## Figures", ""]
    for fig in figures or []:
        title = fig.removeprefix("figures/").removesuffix(".png").replace("_", " ")
        out += [f"### {title}", "", f"![{Path(fig).stem}]({fig})", ""]
    return "\n".join(out).rstrip() + "\n"


def write_report(
    metrics: Mapping[str, Any],
    report_path: str | Path = "reports/report.md",
    metrics_dir: str | Path = "metrics",
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Collect stage metrics, figures and other reports next to `report_path` and write the report atomically."""
    report_path = Path(report_path)
    folder = report_path.parent
    stage_metrics = {}
    for name in STAGES:
        path = Path(metrics_dir) / f"{name}.json"
        if path.is_file():
            try:
                stage_metrics[name] = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                stage_metrics[name] = {"error": f"{path} is not valid JSON"}
    figures = sorted(p.relative_to(folder).as_posix() for p in (folder / "figures").rglob("*.png"))
    others = sorted(p.name for p in folder.glob("*.md") if p.name != report_path.name)
    write_text(report_path, render_report(metrics, stage_metrics, figures, others, info))
    return report_path


def plot_recon_steps(metrics: Mapping[str, Any]):
    """Matplotlib figure: MSE (log) and SSIM of each reconstruction row against the number of steps T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table_rows(dict(metrics))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, metric, log in ((axes[0], "mse", True), (axes[1], "ssim", False)):
        for key, label in ROWS.items():
            pts = sorted((r["T"], r[metric]) for r in rows if r["row"] == key and r.get(metric) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log" if log else "linear")
        ax.set_xlabel("DDIM steps T")
        ax.set_ylabel(metric.upper())
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_figures(result: Any, folder: str | Path = "reports/figures/evaluate", n: int = 16) -> list[Path]:
    """Write the evaluation figures (eval_*.png) of an EvalResult to `folder`; returns their paths.

    eval_reconstructions.png: rows original / DDIM baseline / PDAE inferred x_T / PDAE random x_T at the largest T;
    eval_fid_sets.png: one row per FID/KID image set; eval_recon_steps.png: metrics vs T; eval_gap.png: the gap curve.
    """
    import torch

    from pdae.diagnostics import plot_gap
    from pdae.io import save_figure, save_image_grid

    folder = Path(folder)
    paths = []
    rec = result.recon_images
    if rec:
        grid = torch.cat([rec[k][:n] for k in ("original", "ddim_inferred", "pdae_inferred", "pdae_random")])
        paths.append(save_image_grid(folder / "eval_reconstructions.png", grid, nrow=min(n, len(rec["original"]))))
        paths.append(save_figure(folder / "eval_recon_steps.png", plot_recon_steps(result.metrics)))
    if result.fid_images:
        width = min(n, *(len(v) for v in result.fid_images.values()))
        grid = torch.cat([v[:width] for v in result.fid_images.values()])
        paths.append(save_image_grid(folder / "eval_fid_sets.png", grid, nrow=width))
    if result.gap is not None:
        paths.append(save_figure(folder / "eval_gap.png", plot_gap(result.gap)))
    return paths
