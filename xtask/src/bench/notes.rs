//! The hand-written explanations of rows below target, kept in
//! `xtask/src/bench/notes.md` so a regenerated `BENCHMARKS.md` keeps them.
//!
//! Format of that file: free text first (rendered at the end of the report,
//! HTML comments dropped), then one section per explained row:
//!
//! ```text
//! ### FIGURE | ROW
//! - **Limits:** what limits it.
//! - **Profile:** what the profile showed (command and numbers).
//! - **Tried:** what was tried, and what it changed.
//! ```
//!
//! FIGURE matches a figure whose title starts with it ("1. Image I/O"),
//! ROW a row whose name contains it (empty: every row of the figure).
//! Each row below target gets the body of every matching section under it
//! in "Rows below target", or a visible "no note" line.

/// One `### FIGURE | ROW` section.
pub(super) struct Note {
    figure: String,
    row: String,
    body: String,
}

/// The file's free text and its sections.
pub(super) struct Notes {
    pub(super) preface: String,
    notes: Vec<Note>,
}

/// Parses the notes file.
pub(super) fn parse(text: &str) -> Notes {
    let mut preface = String::new();
    let mut notes: Vec<Note> = Vec::new();
    let mut in_comment = false;
    for line in text.lines() {
        let t = line.trim_start();
        if in_comment || t.starts_with("<!--") {
            in_comment = !t.contains("-->");
            continue;
        }
        if let Some(h) = line.strip_prefix("### ") {
            let (figure, row) = h.split_once('|').unwrap_or((h, ""));
            notes.push(Note {
                figure: figure.trim().to_string(),
                row: row.trim().to_string(),
                body: String::new(),
            });
            continue;
        }
        let out = match notes.last_mut() {
            Some(n) => &mut n.body,
            None => &mut preface,
        };
        out.push_str(line);
        out.push('\n');
    }
    for n in &mut notes {
        n.body = n.body.trim().to_string();
    }
    Notes {
        preface: preface.trim().to_string(),
        notes,
    }
}

impl Notes {
    /// The bodies of the sections matching a row.
    pub(super) fn find(&self, figure: &str, row: &str) -> Vec<&str> {
        self.notes
            .iter()
            .filter(|n| figure.starts_with(&n.figure) && row.contains(&n.row))
            .map(|n| n.body.as_str())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_match_by_figure_prefix_and_row_substring() {
        let n = parse(
            "intro\n<!-- hidden\nstill -->\n### 1. Image I/O | fresh\n- **Limits:** a\n\n\
             ### 6. Checkpoint pause |\n- b\n",
        );
        assert_eq!(n.preface, "intro");
        assert_eq!(
            n.find("1. Image I/O", "64 KiB seq write, fresh (unallocated)"),
            vec!["- **Limits:** a"]
        );
        assert!(n
            .find("1. Image I/O", "64 KiB seq write, allocated")
            .is_empty());
        assert_eq!(n.find("6. Checkpoint pause", "1 TiB / 1000"), vec!["- b"]);
        assert!(n.find("2. NBD", "fresh").is_empty());
    }
}
