"""The pieces of ``python -m grokedge.report``: discovery of runs, tables, figures, claims, W&B.

- :mod:`.discover`: a run or sweep directory -> the runs in it (files only);
- :mod:`.report_conf`, :mod:`.paper`: the declarative configs of ``conf/report/`` (the
  paper's numbers, the verdict thresholds, the claims table);
- :mod:`.run_measures`, :mod:`.edge_series`: measurements read from one run's rows;
- :mod:`.table_format`: the :class:`Table` and number formatting; the tables by family:
  :mod:`.causal_tables`, :mod:`.run_tables`, :mod:`.class_tables`, :mod:`.sweep_tables`,
  :mod:`.event_tables`;
- :mod:`.figure_style`: the figures' shared look; the figures by family:
  :mod:`.edge_figures`, :mod:`.causal_figures`, :mod:`.readout_figures`,
  :mod:`.sweep_figures`, :mod:`.event_figures`;
- :mod:`.event_rule` (the pure event-timing verdict rule), :mod:`.event_runs` (a run's
  events from its files, trajectories, the rule over them);
- :mod:`.claims` (evaluates ``conf/report/claims.yaml``), :mod:`.claim_table` (reads and
  checks it), :mod:`.claim_rows` (the row and its verdicts), the rules
  :mod:`.edge_claims`, :mod:`.causal_claims`, :mod:`.readout_claims`;
- :mod:`.wandb_records`, :mod:`.wandb_log`: reading offline W&B runs, logging the report.
"""
