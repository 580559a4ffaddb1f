"""Presentation: everything here reads ``results.json`` (and dynamics files), never a live ``PairResults``.
Figures (:mod:`.figures`), Table 2 verdicts (:mod:`.summary`), training dynamics (:mod:`.dynamics`), the HTML
report (:mod:`.html`) and ``hrsa report`` (:mod:`.cli`)."""
