//! Naming the first line on which two canonical layout texts differ.

use crate::channel::NodeId;

/// Longest line quoted in a message; layout lines are short, a longer one is cut.
const MAX_QUOTED: usize = 160;

/// ``layout differs from node 1 at line 4: here `vcpu 1 node 1`, node 1 has `vcpu 1 node 0` ``.
pub(crate) fn first_difference(ours: &str, theirs: &str, peer: NodeId) -> String {
    let mut our_lines = ours.split('\n');
    let mut their_lines = theirs.split('\n');
    for line_no in 1usize.. {
        match (our_lines.next(), their_lines.next()) {
            (Some(a), Some(b)) if a == b => continue,
            (None, None) => break,
            (a, b) => {
                return format!(
                "layout differs from node {peer} at line {line_no}: here {}, node {peer} has {}",
                quote(a),
                quote(b)
            )
            }
        }
    }
    format!("layout hashes differ from node {peer}'s although the texts are identical")
}

fn quote(line: Option<&str>) -> String {
    match line {
        None => "the end of the layout".to_string(),
        Some(line) => {
            let mut shown: String = line.chars().take(MAX_QUOTED).collect();
            if shown.len() < line.len() {
                shown.push_str("...");
            }
            format!("`{shown}`")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_first_differing_line_from_our_side() {
        let ours = "spanvm-layout 1\nnodes 2\nvcpus 2\nvcpu 1 node 1\nmemory 0x1000\n";
        let theirs = "spanvm-layout 1\nnodes 2\nvcpus 2\nvcpu 1 node 0\nmemory 0x2000\n";
        assert_eq!(
            first_difference(ours, theirs, 1),
            "layout differs from node 1 at line 4: here `vcpu 1 node 1`, node 1 has `vcpu 1 node 0`"
        );
    }

    #[test]
    fn a_shorter_text_ends_where_the_other_goes_on() {
        assert_eq!(
            first_difference("a\nb", "a\nb\nc", 3),
            "layout differs from node 3 at line 3: here the end of the layout, node 3 has `c`"
        );
    }

    #[test]
    fn long_lines_are_cut() {
        let long = "x".repeat(1000);
        let message = first_difference(&long, "y", 0);
        assert!(message.len() < 400, "{message}");
        assert!(message.contains("...`"));
    }
}
