//! What lm-evaluation-harness's `coqa` task (version 3, zero-shot) makes of
//! a document: the prompt, the gold answers and the prediction taken from a
//! generation. Verified against `lm_eval/tasks/coqa/utils.py` and
//! `default.yaml`: one example per story, asking only its last question.

use super::coqa_data::CoqaDoc;
use super::metrics::is_py_space;

/// Generation stops at this string (and at EOS).
pub const STOP: &str = "\nQ:";
/// lm-eval's default `max_gen_toks`.
pub const MAX_NEW_TOKENS: usize = 256;

/// The prompt for asking turn `turn` (0-based) of `doc`: the story as stored,
/// a blank line, then `Q: {q}\n\nA: {a}\n\n` for each earlier turn and
/// `Q: {q}\n\nA:` for the asked one.
pub fn prompt_for_turn(doc: &CoqaDoc, turn: usize) -> String {
    let mut text = String::with_capacity(doc.story.len() + 64 * (turn + 1));
    text.push_str(&doc.story);
    text.push_str("\n\n");
    for (i, t) in doc.turns.iter().enumerate().take(turn + 1) {
        text.push_str("Q: ");
        text.push_str(&t.question);
        text.push_str("\n\n");
        if i < turn {
            text.push_str("A: ");
            text.push_str(&t.answer);
            text.push_str("\n\n");
        } else {
            text.push_str("A:");
        }
    }
    text
}

/// The lm-eval prompt of `doc`: its last question asked.
pub fn prompt(doc: &CoqaDoc) -> String {
    prompt_for_turn(doc, doc.turns.len().saturating_sub(1))
}

/// Gold answers of turn `turn`: its answer, then each additional answer whose
/// lower-case form is not yet among the lower-cased golds.
pub fn golds_for_turn(doc: &CoqaDoc, turn: usize) -> Vec<String> {
    let Some(t) = doc.turns.get(turn) else {
        return vec![];
    };
    let mut golds = vec![t.answer.clone()];
    for extra in &t.additional_answers {
        let lower = extra.to_lowercase();
        if !golds.iter().any(|g| g.to_lowercase() == lower) {
            golds.push(extra.clone());
        }
    }
    golds
}

/// The lm-eval golds of `doc` (its last turn).
pub fn golds(doc: &CoqaDoc) -> Vec<String> {
    golds_for_turn(doc, doc.turns.len().saturating_sub(1))
}

/// The prediction lm-eval scores: the continuation (already cut at the stop
/// string) stripped of surrounding white space, up to its first newline.
pub fn prediction(output: &str) -> String {
    output
        .trim_matches(is_py_space)
        .split('\n')
        .next()
        .unwrap_or_default()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::coqa_data::{CoqaTurn, fixture};

    fn doc(turns: &[(&str, &str, &[&str])]) -> CoqaDoc {
        CoqaDoc {
            id: "d".into(),
            source: String::new(),
            story: "Story text.".into(),
            turns: turns
                .iter()
                .map(|(q, a, extra)| CoqaTurn {
                    question: q.to_string(),
                    answer: a.to_string(),
                    additional_answers: extra.iter().map(|s| s.to_string()).collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn fixture_prompt_is_byte_exact() {
        let docs = fixture().unwrap();
        let kite = docs.iter().find(|d| d.id == "qb-kite").unwrap();
        let expected = "Ben had a red kite shaped like a fish. On Saturday he took it to the park with his sister Lulu. \
The wind was strong, and the kite flew higher than the oak trees. Then the string snapped and the kite drifted away over the pond.\n\
Ben was sad. Lulu said they should look for it. They walked around the pond and found the kite stuck in a hedge behind the ice cream stand. \
The man who sold ice cream helped them pull it out. It had a small tear, so at home their dad fixed it with blue tape.\n\n\
Q: What colour was Ben's kite?\n\nA: red\n\n\
Q: What was it shaped like?\n\nA: a fish\n\n\
Q: Who went with him to the park?\n\nA: his sister Lulu\n\n\
Q: Why did the kite fly away?\n\nA: the string snapped\n\n\
Q: Where did they find it?\n\nA: in a hedge behind the ice cream stand\n\n\
Q: Who fixed it?\n\nA:";
        assert_eq!(prompt(kite), expected);
        assert_eq!(golds(kite), vec!["their dad", "Dad", "their father"]);
    }

    #[test]
    fn story_is_not_stripped() {
        let docs = fixture().unwrap();
        let river = docs.iter().find(|d| d.id == "qb-river-ost").unwrap();
        assert!(river.story.ends_with(".\n"));
        assert!(
            prompt(river)
                .contains("31,000 inhabitants.\n\n\nQ: What is the Ostwater?\n\nA: a river\n\n")
        );
    }

    #[test]
    fn single_turn_and_earlier_turns() {
        let d = doc(&[("Q1?", "A1", &[]), ("Q2?", "A2", &[])]);
        assert_eq!(prompt_for_turn(&d, 0), "Story text.\n\nQ: Q1?\n\nA:");
        assert_eq!(prompt(&d), "Story text.\n\nQ: Q1?\n\nA: A1\n\nQ: Q2?\n\nA:");
        assert_eq!(golds_for_turn(&d, 0), vec!["A1"]);
    }

    #[test]
    fn golds_drop_case_insensitive_duplicates_keeping_first_spelling() {
        let d = doc(&[("Q?", "Pilot", &["pilot", "PILOT ", "a pilot", "A Pilot"])]);
        // "PILOT " differs by the trailing space, as in lm-eval (no strip).
        assert_eq!(golds(&d), vec!["Pilot", "PILOT ", "a pilot"]);
    }

    #[test]
    fn prediction_is_first_line_of_stripped_output() {
        assert_eq!(prediction(" their dad\n\nQ"), "their dad");
        // Python's `strip()` trims the whole string, so spaces before the
        // first newline stay (normalization removes them before scoring).
        assert_eq!(prediction("\n\n  blue tape  \nmore"), "blue tape  ");
        assert_eq!(prediction("   "), "");
        assert_eq!(prediction("a\r\nb"), "a\r");
    }
}
