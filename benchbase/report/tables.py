"""The leaderboard tables: the rendered views of ``benchbase.leaderboard`` as sortable HTML."""

from __future__ import annotations

import math
from numbers import Number

import pandas as pd

from benchbase import leaderboard
from benchbase.leaderboard import Column, Table
from benchbase.report.data import RunData
from benchbase.report.html import esc


def table_html(table: Table, table_id: str | None = None, caption: str = "") -> str:
    """A sortable table: a cell showing a number carries it in ``data-v`` (the inline script
    sorts by it); a status (unavailable, incomplete, n/a) is a text cell with its reason on hover."""
    head = "".join(f'<th scope="col" title="click to sort">{esc(c.header)}</th>' for c in table.columns)
    n_rows = len(table.columns[0].text) if table.columns else 0
    rows = []
    for i in range(n_rows):
        cells = []
        for col in table.columns:
            text, value, status, note = col.text[i], col.values[i], col.statuses[i], col.notes[i]
            text = "" if text is None or (isinstance(text, float) and text != text) else str(text)
            attrs = ""
            if value is not None:
                attrs += f' data-v="{value!r}" class="num"'
            elif status:
                attrs += f' class="status {esc(status.split()[0].lower().strip("()"))}"'
            if note:
                attrs += f' title="{esc(note)}"'
            cells.append(f"<td{attrs}>{esc(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return (f'<table class="sortable" id="{esc(table_id or "table-" + table.name)}">{cap}<thead><tr>{head}</tr>'
            f'</thead><tbody>{"".join(rows)}</tbody></table>')


def frame_html(df: pd.DataFrame, table_id: str) -> str:
    """A table of plain data (provenance, cost): numbers, by their type, sort as numbers."""
    columns = []
    for name in df.columns:
        col = Column(str(name))
        for v in df[name].tolist():
            number = isinstance(v, Number) and not isinstance(v, bool) and math.isfinite(v)
            col.add("" if v is None or (isinstance(v, float) and math.isnan(v)) else v,
                    value=float(v) if number else None)
        columns.append(col)
    return table_html(Table(table_id, "", columns), table_id)


def tables_section(run: RunData) -> str:
    tables = leaderboard.render(leaderboard.views_of(run.df, run.info))  # the records already read
    parts = ['<h2 id="tables">Leaderboard</h2>',
             '<p>Mean over identities ± 95% interval (t·sd/√n), the same numbers as '
             '<code>benchbase leaderboard</code>. ↑ = higher favours the protection, ↓ = lower favours '
             'the protection. Click a column to sort; hover a status for its reason.</p>']
    for table in tables.values():
        parts.append(f"<h3>{esc(table.title)}</h3>" + table_html(table))
    df = run.df
    reasons = leaderboard.unavailable_reasons(df)  # counted apart from failures: nothing went wrong
    if reasons:
        parts.append(f"<h3>Unavailable</h3><p>{sum(r[2] for r in reasons)} records unavailable: a stage they "
                     "need cannot run here (a model, its weights or a package is absent).</p><ul>" + "".join(
                         f"<li>{count} records ({', '.join(f'<code>{esc(m)}</code>' for m in metrics)}): "
                         f"{esc(reason)}</li>" for reason, metrics, count in reasons) + "</ul>")
    failed = df[df["status"] == "failed"]
    if len(failed):
        parts.append(f"<h3>Failures</h3><p>{len(failed)} records failed.</p><ul>" + "".join(
            f"<li>{esc(r.identity)} {esc(r.attack)} / {esc(r.purifier)} / {esc(r.defense)} / "
            f"{esc(r.personalizer)} <code>{esc(r.metric)}</code>: {esc(r.error)}</li>"
            for r in failed.head(20).itertuples()) + "</ul>")
    return "\n".join(parts)


def summary_html(frame: pd.DataFrame, table_id: str, text: dict[str, str], stats: dict[str, str],
                 numbers: dict[str, str] | None = None) -> str:
    """A sortable table of a diagnostics summary: ``text`` columns ({header: column}), plain
    ``numbers`` and ``stats`` shown as ``mean ± 95% interval`` from ``<base>_mean`` and
    ``<base>_ci95`` ({header: base}), each sorting by its mean."""
    from benchbase.diagnostics import pm_text

    columns = []
    for header, name in text.items():
        col = Column(header)
        for v in frame[name].tolist():
            col.add(str(v))
        columns.append(col)
    for header, name in (numbers or {}).items():
        col = Column(header)
        for v in frame[name].tolist():
            ok = isinstance(v, Number) and math.isfinite(v)
            col.add(f"{v:.4g}" if ok else "–", value=float(v) if ok else None)
        columns.append(col)
    for header, base in stats.items():
        col = Column(header)
        for m, c in zip(frame[f"{base}_mean"].tolist(), frame[f"{base}_ci95"].tolist()):
            col.add(pm_text(m, c), value=m if math.isfinite(m) else None)
        columns.append(col)
    return table_html(Table(table_id, "", columns), table_id)
