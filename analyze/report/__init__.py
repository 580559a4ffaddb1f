"""Presentation: everything here reads ``results.json`` mappings (and dynamics files), never a live ``PairResults``.

The mapping comes from :func:`hrsa.analyze.results.read_results` (or ``SavedResults.doc``). Figures, drawn once
for the PNGs and the report (:mod:`.figures`); Table 2 verdicts and the terminal table (:mod:`.summary`);
training dynamics files and curves (:mod:`.dynamics`); the HTML report: its page (:mod:`.html`), sections
(:mod:`.sections`) and building blocks (:mod:`.html_blocks`); and ``hrsa report`` (:mod:`.cli`).
"""
