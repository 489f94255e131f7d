"""The pieces of ``python -m grokedge.report``: discovery of runs, tables, figures, W&B.

- :mod:`.discover`: a run or sweep directory -> the runs in it (files only);
- :mod:`.tables`: markdown/W&B tables from the runs' ``analyses.jsonl`` and summaries;
- :mod:`.figures`: the PNG figures;
- :mod:`.paper`: the paper's numbers the tables are set beside;
- :mod:`.wandb_records`, :mod:`.wandb_log`: reading offline W&B runs, logging the report.
"""
