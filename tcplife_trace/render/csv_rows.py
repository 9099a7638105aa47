"""Records (views.transition_record / lifecycle_record) as CSV rows, as bcc's tcplife -s has it:
a header line of the record's fields, then one row per record. Lists and dicts (state_ms,
path) are JSON in their cell; None is an empty cell."""
from __future__ import annotations

import csv
import io
import json


class CsvRows:
    def __init__(self):
        self.fields: list[str] | None = None
        self._buf = io.StringIO()
        self._w = csv.writer(self._buf, lineterminator="\n")

    @staticmethod
    def _cell(v):
        if v is None:
            return ""
        if isinstance(v, (list, dict)):
            return json.dumps(v, separators=(",", ":"))
        return v

    def __call__(self, record: dict) -> str:
        """The row of one record; the first call's answer starts with the header line."""
        self._buf.seek(0)
        self._buf.truncate()
        if self.fields is None:
            self.fields = [k for k in record if k != "type"]
            self._w.writerow(self.fields)
        self._w.writerow([self._cell(record.get(k)) for k in self.fields])
        return self._buf.getvalue().rstrip("\n")
