"""``hrsa report``: one self-contained HTML report from results.json files. Thin: parse, call ``write_report``, print.

This module owns the verb and its settings, :class:`ReportConfig`: every flag is a field (generated from it, so
defaults and help live in the model), RESULTS are the positional arguments, ``--config`` reads the same fields
from YAML; flags given win. Example YAML::

    # hrsa report --config configs/report.yaml
    results: [hrsa-analysis/base-vs-rlvr, hrsa-analysis/base-vs-sft]
    out: report.html
    dynamics: [hrsa-dynamics/0.5b/dynamics.json, hrsa-dynamics/1.5b/dynamics.json]   # one file per series
    min_cka: 0.9
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from pydantic import BaseModel, ConfigDict, Field, field_validator

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
from hrsa.runtime.cli_options import config_file_option, config_options
from hrsa.runtime.settings import InputLocation, LocalFilePath

__all__ = ["ReportConfig", "VerdictRules", "report"]


class VerdictRules(BaseModel):
    """The rules of the Table 2 style verdicts: hrsa's defaults (the paper states none), settable by ``hrsa report``'s
    flags and by a pipeline's ``report:`` section."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_cka: float = Field(CKA_PRESERVED, ge=0, le=1, allow_inf_nan=False, description="Linear CKA counted as preserved from this value.")
    min_knn: float = Field(KNN_PRESERVED, ge=0, le=1, allow_inf_nan=False,
                           description="k-NN overlap (mean Jaccard) counted as preserved from this value.")
    knn_k: int = Field(KNN_K, gt=0,
                       description="The k whose k-NN overlap the summary reads (else the closest analysed).")
    min_dimcorr: float = Field(DIMCORR_PRESERVED, ge=-1, le=1, allow_inf_nan=False,
                               description="Mean dimension-wise correlation counted as preserved from this value.")
    min_h_inv: float = Field(H_INV_PRESERVED, ge=0, le=1, allow_inf_nan=False, description="Procrustes H_inv counted as preserved from this value.")
    min_probe_transfer: float = Field(PROBE_TRANSFER_PRESERVED, ge=0, le=1, allow_inf_nan=False, description="Probe transfer (share of above-chance "
                                      "accuracy kept) counted as preserved from this value.")
    probe_min_signal: float = Field(PROBE_MIN_SIGNAL, ge=0, le=1, allow_inf_nan=False, description="Probe directions whose source beats chance by "
                                    "less than this are left out.")
    include_embedding_output: bool = Field(False, description="Count the embedding output (hidden state 0) in the "
                                           "verdicts' means (left out by default: it is the token embedding, not a layer).")

    def thresholds(self) -> Thresholds:
        """The summary's rules these settings give."""
        return Thresholds(cka=self.min_cka, knn=self.min_knn, knn_k=self.knn_k, dimcorr=self.min_dimcorr,
                          h_inv=self.min_h_inv, probe_transfer=self.min_probe_transfer,
                          probe_min_signal=self.probe_min_signal, exclude_embedding=not self.include_embedding_output)


class ReportConfig(VerdictRules):
    """Validated settings of one ``hrsa report`` run: equal to the flags and the YAML file (flag > YAML > default)."""

    results: tuple[str, ...] = Field((), validate_default=True, description="results.json files of `hrsa analyze`, "
                                     "or folders holding one, one per analysed pair (the RESULTS arguments); paths "
                                     "or URLs (s3://bucket/out/pairs: a pipeline's remote out).")
    out: LocalFilePath = Field(Path("report.html"), description="The HTML file to write (a regular file there is "
                               "replaced; anything else, a URL, or a path inside an hrsa store, is refused).")
    dynamics: tuple[InputLocation, ...] = Field((), description="hrsa.dynamics/1 files (one results.json per training "
                                                "step), one per series, for the training-dynamics section (repeat the "
                                                "flag for several); paths or URLs.")
    evals: tuple[InputLocation, ...] = Field((), description="eval.json files of `hrsa eval` (or a pipeline's "
                                             "<out>/eval/<name>/eval.json) for the task scores' section (repeat the "
                                             "flag for several); paths or URLs.")
    title: str | None = Field(None, description="Title of the report (default: the pairs compared).")

    @field_validator("results", "dynamics", "evals", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        """One file (a YAML scalar) or several."""
        return (value,) if isinstance(value, (str, Path)) else value

    @field_validator("results")
    @classmethod
    def _some_results(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("expected at least one results.json (or folder holding one), as the RESULTS arguments "
                             "(hrsa report RESULTS... --out FILE) or as results: in --config; got none instead")
        return value


@click.command("report")
@click.argument("results", nargs=-1, type=click.Path(path_type=str))
@config_file_option
@config_options(ReportConfig, exclude=("results",), repeatable=("dynamics", "evals"))
def report(config_file: Path | None, **flags: Any) -> None:
    """Write one self-contained HTML report (figures embedded) from RESULTS: results.json files of `hrsa analyze`,
    or folders holding one, one per analysed pair.

    Per pair: a summary by level (preserved / restructured), cross-layer heatmaps, H_inv, k-NN overlap and
    probe accuracy per hidden state; with --dynamics (once per series), the metrics against the training step;
    with --evals (once per eval.json), the task scores of each model or checkpoint.
    """
    from hrsa.analyze.report.html import read_report_inputs, report_warnings, write_report
    from hrsa.analyze.report.summary import summarize
    from hrsa.runtime.settings import load_settings

    cfg = load_settings(ReportConfig, config_file, flags, verb="report")
    inputs = read_report_inputs(list(cfg.results), dynamics=cfg.dynamics, evals=cfg.evals)  # read once: the page and the lines below
    out = write_report(inputs, cfg.out, title=cfg.title, thresholds=cfg.thresholds())
    for line in report_warnings(inputs):
        click.echo(f"hrsa: warning: {line}", err=True)
    for _, doc in inputs.docs:
        s = summarize(doc, thresholds=cfg.thresholds())
        click.echo(f"{s.a} vs {s.b}: " + ", ".join(f"{lv.level} {lv.verdict}" for lv in s.levels))
    click.echo(f"wrote {out}")
