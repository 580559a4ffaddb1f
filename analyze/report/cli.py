"""``hrsa report``: one self-contained HTML report from results.json files. Thin: parse, call ``write_report``, print.

``ReportConfig`` is equal to the flags and to the YAML file (``--config``); flags given win. Example YAML::

    # hrsa report --config configs/report.yaml
    results: [hrsa-analysis/base-vs-rlvr, hrsa-analysis/base-vs-sft]
    out: report.html
    dynamics: hrsa-dynamics/dynamics.json
    min_cka: 0.9
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from pydantic import BaseModel, ConfigDict, Field

from hrsa.analyze.report.summary import (
    CKA_PRESERVED,
    DIMCORR_PRESERVED,
    H_INV_PRESERVED,
    KNN_K,
    KNN_PRESERVED,
    PROBE_MIN_SIGNAL,
    PROBE_TRANSFER_PRESERVED,
    Thresholds,
)

__all__ = ["ReportConfig", "report"]


class ReportConfig(BaseModel):
    """Validated settings of one ``hrsa report`` run (see the flags' help for each field)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    results: tuple[str, ...] = Field(min_length=1)
    out: Path = Path("report.html")
    dynamics: Path | None = None
    title: str | None = None
    min_cka: float = CKA_PRESERVED
    min_knn: float = KNN_PRESERVED
    knn_k: int = Field(default=KNN_K, gt=0)
    min_dimcorr: float = DIMCORR_PRESERVED
    min_h_inv: float = H_INV_PRESERVED
    min_probe_transfer: float = PROBE_TRANSFER_PRESERVED
    probe_min_signal: float = Field(default=PROBE_MIN_SIGNAL, ge=0)

    def thresholds(self) -> Thresholds:
        return Thresholds(cka=self.min_cka, knn=self.min_knn, knn_k=self.knn_k, dimcorr=self.min_dimcorr,
                          h_inv=self.min_h_inv, probe_transfer=self.min_probe_transfer,
                          probe_min_signal=self.probe_min_signal)


@click.command("report")
@click.argument("results", nargs=-1, type=click.Path(path_type=str))
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML file of settings named like these flags (RESULTS as `results`); flags given here win.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="The HTML file to write.  [default: report.html]")
@click.option("--dynamics", type=click.Path(dir_okay=False, path_type=Path),
              help="A hrsa.dynamics/1 file (one results.json per training step) for the training-dynamics section.")
@click.option("--title", help="Title of the report.  [default: the pairs compared]")
@click.option("--min-cka", type=float, help=f"Linear CKA counted as preserved from this value.  [default: {CKA_PRESERVED}]")
@click.option("--min-knn", type=float, help=f"k-NN overlap (mean Jaccard) counted as preserved from this value.  [default: {KNN_PRESERVED}]")
@click.option("--knn-k", type=int, help=f"The k whose k-NN overlap the summary reads (else the closest analysed).  [default: {KNN_K}]")
@click.option("--min-dimcorr", type=float,
              help=f"Mean dimension-wise correlation counted as preserved from this value.  [default: {DIMCORR_PRESERVED}]")
@click.option("--min-h-inv", type=float, help=f"Procrustes H_inv counted as preserved from this value.  [default: {H_INV_PRESERVED}]")
@click.option("--min-probe-transfer", type=float,
              help=f"Probe transfer (share of above-chance accuracy kept) counted as preserved from this value.  "
                   f"[default: {PROBE_TRANSFER_PRESERVED}]")
@click.option("--probe-min-signal", type=float,
              help=f"Probe directions whose source beats chance by less than this are left out.  [default: {PROBE_MIN_SIGNAL}]")
def report(config_file: Path | None, **flags: Any) -> None:
    """Write one self-contained HTML report (figures embedded) from RESULTS: results.json files of `hrsa analyze`,
    or folders holding one, one per analysed pair.

    Per pair: a summary by level (preserved / restructured), cross-layer heatmaps, H_inv, k-NN overlap and
    probe accuracy per hidden state; with --dynamics, the metrics against the training step.
    """
    from hrsa.analyze.report.html import find_results, read_results, write_report
    from hrsa.analyze.report.summary import summarize
    from hrsa.runtime.settings import load_settings

    cfg = load_settings(ReportConfig, config_file, flags, verb="report")
    out = write_report(list(cfg.results), cfg.out, dynamics=cfg.dynamics, title=cfg.title, thresholds=cfg.thresholds())
    for path in find_results(cfg.results):
        s = summarize(read_results(path)[1], thresholds=cfg.thresholds())
        click.echo(f"{s.a} vs {s.b}: " + ", ".join(f"{lv.level} {lv.verdict}" for lv in s.levels))
    click.echo(f"wrote {out}")
