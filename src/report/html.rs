//! `report.html`: one self-contained page (inline CSS and script, the SVG
//! plots inlined, no external resources) with a table sortable by any column.

use std::fmt::Write;

use super::Report;
use super::table::Table;

/// `s` with HTML's special characters escaped.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "
body { font-family: 'DejaVu Sans', Verdana, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; } h3 { font-size: 1.1em; }
.wrap { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; white-space: nowrap; }
th { background: #f3f3f3; cursor: pointer; user-select: none; position: sticky; top: 0; }
th.num, td.num { text-align: right; }
th[aria-sort=ascending]::after { content: ' \\25B2'; } th[aria-sort=descending]::after { content: ' \\25BC'; }
tr:nth-child(even) td { background: #fafafa; }
tr.failed td { color: #a11; }
figure { margin: 1.5em 0; } figure svg { max-width: 100%; height: auto; border: 1px solid #eee; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; white-space: pre-wrap; }
.note { color: #555; }
";

/// Sorts the table by a clicked header: numbers by value (empty cells last),
/// text alphabetically; a second click reverses.
const SCRIPT: &str = "
document.querySelectorAll('table.sortable th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var table = th.closest('table'), body = table.tBodies[0];
    var asc = th.getAttribute('aria-sort') !== 'ascending';
    table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col], y = b.cells[col];
      if (th.classList.contains('num')) {
        var u = x.dataset.v, v = y.dataset.v;
        if (u === undefined || v === undefined) { return (u === undefined) - (v === undefined); }
        return asc ? u - v : v - u;
      }
      var c = x.textContent.localeCompare(y.textContent);
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
";

/// The table as HTML; numeric cells carry their value for sorting.
pub fn table(t: &Table) -> String {
    let mut out = String::from("<div class=\"wrap\"><table class=\"sortable\">\n<thead><tr>");
    for c in &t.columns {
        let class = if c.numeric { " class=\"num\"" } else { "" };
        let _ = write!(out, "<th{class} title=\"sort\">{}</th>", escape(&c.header));
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    let status = t.column("status");
    for row in &t.rows {
        let failed = status.is_some_and(|i| row[i].text == "failed");
        out.push_str(if failed {
            "<tr class=\"failed\">"
        } else {
            "<tr>"
        });
        for (cell, col) in row.iter().zip(&t.columns) {
            let class = if col.numeric { " class=\"num\"" } else { "" };
            match cell.sort {
                Some(v) if v.is_finite() => {
                    let _ = write!(out, "<td{class} data-v=\"{v}\">{}</td>", escape(&cell.text));
                }
                _ => {
                    let _ = write!(out, "<td{class}>{}</td>", escape(&cell.text));
                }
            }
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody></table></div>\n");
    out
}

/// Drops an XML declaration so the SVG can sit inside HTML.
fn inline_svg(svg: &str) -> &str {
    match svg.find("<svg") {
        Some(i) => &svg[i..],
        None => svg,
    }
}

/// The whole HTML report.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>quantbench report</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>quantbench report</h1>\n<p>{}</p>\n<ul>\n",
        escape(&r.summary_line())
    );
    for (dir, n) in &r.sources {
        let _ = writeln!(
            out,
            "<li><code>{}</code>: {n} result file{}</li>",
            escape(&dir.display().to_string()),
            if *n == 1 { "" } else { "s" }
        );
    }
    out.push_str("</ul>\n<h2>Summary</h2>\n<p class=\"note\">Click a column header to sort.</p>\n");
    out.push_str(&table(&r.table));
    out.push_str("<ul class=\"note\">\n");
    for line in super::READING_NOTES {
        let _ = writeln!(out, "<li>{}</li>", escape(line));
    }
    out.push_str("</ul>\n");
    if !r.plots.is_empty() {
        out.push_str("<h2>Plots</h2>\n");
        for p in &r.plots {
            let _ = writeln!(
                out,
                "<figure id=\"{}\">\n<h3>{}</h3>",
                escape(&p.stem),
                escape(&p.title)
            );
            out.push_str(inline_svg(&p.svg));
            let _ = writeln!(
                out,
                "\n<figcaption class=\"note\">Files: <a href=\"{0}.png\">{0}.png</a>, <a href=\"{0}.svg\">{0}.svg</a></figcaption>",
                escape(&p.stem)
            );
            if !p.notes.is_empty() {
                out.push_str("<ul class=\"note\">\n");
                for n in &p.notes {
                    let _ = writeln!(out, "<li>{}</li>", escape(n));
                }
                out.push_str("</ul>\n");
            }
            out.push_str("</figure>\n");
        }
    }
    if !r.notes.is_empty() {
        out.push_str("<h2>Notes</h2>\n<ul>\n");
        for n in &r.notes {
            let _ = writeln!(out, "<li>{}</li>", escape(n));
        }
        out.push_str("</ul>\n");
    }
    if !r.failures.is_empty() {
        out.push_str("<h2>Failed experiments</h2>\n");
        for (label, error) in &r.failures {
            let _ = writeln!(
                out,
                "<h3>{}</h3>\n<pre>{}</pre>",
                escape(label),
                escape(error)
            );
        }
    }
    let _ = write!(out, "<script>{SCRIPT}</script>\n</body>\n</html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::table::{Cell, Column};

    #[test]
    fn escapes() {
        assert_eq!(escape("a<b & \"c\"'"), "a&lt;b &amp; &quot;c&quot;&#39;");
    }

    #[test]
    fn numeric_cells_carry_sort_values() {
        let t = Table {
            columns: vec![
                Column {
                    header: "experiment".into(),
                    numeric: false,
                },
                Column {
                    header: "bits".into(),
                    numeric: true,
                },
                Column {
                    header: "status".into(),
                    numeric: false,
                },
            ],
            rows: vec![vec![
                Cell::text("x<y"),
                Cell::number(Some(4.25), |v| format!("{v:.2}")),
                Cell::text("failed"),
            ]],
        };
        let h = table(&t);
        assert!(
            h.contains(
                "<tr class=\"failed\"><td>x&lt;y</td><td class=\"num\" data-v=\"4.25\">4.25</td>"
            ),
            "{h}"
        );
        assert!(h.contains("<th class=\"num\" title=\"sort\">bits</th>"));
    }

    #[test]
    fn svg_declarations_are_dropped() {
        assert_eq!(
            inline_svg("<?xml version=\"1.0\"?>\n<svg a=\"1\"></svg>"),
            "<svg a=\"1\"></svg>"
        );
    }
}
