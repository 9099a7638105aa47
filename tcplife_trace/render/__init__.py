"""The text views: every line and record the commands print.

views.py: text and JSON of transitions, lifecycles and the exit summary (TextView, the
records); batches.py: the per-transition views a batch of event columns at a time;
lifecycle_lines.py: `--lifecycles`' lines from the kernel's folded records as columns;
csv_rows.py: records as CSV rows; findings.py: findings as text lines and JSON records.
"""
