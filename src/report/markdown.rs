//! `report.md`: the summary table, links to the plots, notes and failures.

use std::fmt::Write;

use super::Report;
use super::table::Table;

/// A table cell's text made safe for a Markdown table.
pub fn escape_cell(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('|', "\\|")
        .replace(['\n', '\r'], " ")
}

/// The table in GitHub-flavoured Markdown; numeric columns right-aligned.
pub fn table(t: &Table) -> String {
    let mut out = String::new();
    let headers: Vec<String> = t.columns.iter().map(|c| escape_cell(&c.header)).collect();
    let _ = writeln!(out, "| {} |", headers.join(" | "));
    let rules: Vec<&str> = t
        .columns
        .iter()
        .map(|c| if c.numeric { "---:" } else { "---" })
        .collect();
    let _ = writeln!(out, "|{}|", rules.join("|"));
    for row in &t.rows {
        let cells: Vec<String> = row.iter().map(|c| escape_cell(&c.text)).collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    out
}

/// A code fence longer than any run of backticks in `text`.
fn fence(text: &str) -> String {
    let mut longest = 0;
    let mut run = 0;
    for c in text.chars() {
        run = if c == '`' { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    "`".repeat(longest.max(2) + 1)
}

/// The whole Markdown report.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# quantbench report\n");
    let _ = writeln!(out, "{}\n", r.summary_line());
    for (dir, n) in &r.sources {
        let _ = writeln!(
            out,
            "- `{}`: {n} result file{}",
            dir.display(),
            if *n == 1 { "" } else { "s" }
        );
    }
    let _ = writeln!(out, "\n## Summary\n");
    out.push_str(&table(&r.table));
    out.push('\n');
    for line in super::READING_NOTES {
        let _ = writeln!(out, "- {line}");
    }
    if !r.plots.is_empty() {
        let _ = writeln!(out, "\n## Plots");
        for p in &r.plots {
            let _ = writeln!(out, "\n### {}\n", p.title);
            let _ = writeln!(out, "![{}]({}.png)\n", p.title, p.stem);
            let _ = writeln!(out, "[SVG]({}.svg)", p.stem);
            if !p.notes.is_empty() {
                out.push('\n');
                for n in &p.notes {
                    let _ = writeln!(out, "- {n}");
                }
            }
        }
    }
    if !r.notes.is_empty() {
        let _ = writeln!(out, "\n## Notes\n");
        for n in &r.notes {
            let _ = writeln!(out, "- {n}");
        }
    }
    if !r.failures.is_empty() {
        let _ = writeln!(out, "\n## Failed experiments\n");
        for (label, error) in &r.failures {
            let f = fence(error);
            let _ = writeln!(out, "### {label}\n\n{f}text\n{error}\n{f}\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::table::{Cell, Column};

    #[test]
    fn tables_escape_pipes_and_align_numbers() {
        let t = Table {
            columns: vec![
                Column {
                    header: "name".into(),
                    numeric: false,
                },
                Column {
                    header: "bits".into(),
                    numeric: true,
                },
            ],
            rows: vec![vec![
                Cell::text("a|b\nc"),
                Cell::number(Some(4.5), |v| format!("{v:.1}")),
            ]],
        };
        assert_eq!(
            table(&t),
            "| name | bits |\n|---|---:|\n| a\\|b c | 4.5 |\n"
        );
    }

    #[test]
    fn fences_outgrow_backticks() {
        assert_eq!(fence("plain"), "```");
        assert_eq!(fence("a ```` b"), "`````");
    }
}
