"""`tda report`: one self-contained HTML page for a run (tables, figures, an explorer of top examples).

`figures` draws from plain tables and is shared with the step kinds that log the same figures to
MLflow; `build.write_report(run, out_dir)` writes the page. Importing this package is cheap: the CLI
loads `tda.report.cli` for every `tda` command.
"""
