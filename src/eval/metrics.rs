//! Answer scoring as lm-evaluation-harness's `coqa` task does it: SQuAD-style
//! normalization, exact match and token-overlap F1 (the definitions of
//! `transformers.data.metrics.squad_metrics`, which the official CoQA script
//! shares), the leave-one-out average over several gold answers, and the
//! standard error lm-eval reports for mean metrics.

use serde::{Deserialize, Serialize};

/// Whitespace as Python's `str.split()` sees it: Unicode white space plus the
/// ASCII separators U+001C..U+001F.
pub(crate) fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// A character of Python's `\w` (Unicode mode); `_` never reaches here
/// because punctuation is removed first.
fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Replaces every whole word `a`, `an` or `the` (regex `\b(a|an|the)\b`) by a space.
fn remove_articles(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if matches!(word.as_str(), "a" | "an" | "the") {
            out.push(' ');
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in text.chars() {
        if is_word_char(c) {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// SQuAD/CoQA answer normalization: lower-case, drop ASCII punctuation
/// (Python's `string.punctuation`), replace the articles a/an/the by spaces,
/// collapse white space to single spaces (trimmed).
pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punct: String = lower
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    let no_articles = remove_articles(&no_punct);
    no_articles
        .split(is_py_space)
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The normalized answer split into words.
pub fn answer_tokens(s: &str) -> Vec<String> {
    normalize_answer(s)
        .split(' ')
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// 1.0 when the normalized strings are equal, else 0.0.
pub fn exact_match(gold: &str, pred: &str) -> f64 {
    f64::from(u8::from(normalize_answer(gold) == normalize_answer(pred)))
}

/// Token-overlap F1 of the normalized answers. When either side has no
/// tokens, 1.0 if both have none, else 0.0.
pub fn f1_score(gold: &str, pred: &str) -> f64 {
    let gold_toks = answer_tokens(gold);
    let pred_toks = answer_tokens(pred);
    if gold_toks.is_empty() || pred_toks.is_empty() {
        return f64::from(u8::from(gold_toks == pred_toks));
    }
    let mut gold_counts = std::collections::HashMap::<&str, usize>::new();
    for t in &gold_toks {
        *gold_counts.entry(t).or_default() += 1;
    }
    let mut same = 0usize;
    for t in &pred_toks {
        if let Some(n) = gold_counts.get_mut(t.as_str())
            && *n > 0
        {
            *n -= 1;
            same += 1;
        }
    }
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / pred_toks.len() as f64;
    let recall = same as f64 / gold_toks.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// Exact match and F1 of one prediction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    pub em: f64,
    pub f1: f64,
}

/// Scores a prediction against its gold answers as lm-eval's CoQA does: with
/// n > 1 golds, for each gold i take the best score against the other n−1
/// and average over the n; with one gold, score against it. No golds score 0.
pub fn coqa_scores(golds: &[String], pred: &str) -> Scores {
    let best = |set: &mut dyn Iterator<Item = &String>| {
        set.fold(Scores::default(), |acc, g| Scores {
            em: acc.em.max(exact_match(g, pred)),
            f1: acc.f1.max(f1_score(g, pred)),
        })
    };
    match golds.len() {
        0 => Scores::default(),
        1 => best(&mut golds.iter()),
        n => {
            let mut sum = Scores::default();
            for i in 0..n {
                let s = best(
                    &mut golds
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| *j != i)
                        .map(|(_, g)| g),
                );
                sum.em += s.em;
                sum.f1 += s.f1;
            }
            Scores {
                em: sum.em / n as f64,
                f1: sum.f1 / n as f64,
            }
        }
    }
}

/// Mean of `xs` (0 for none).
pub fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// Standard error of the mean as lm-eval reports it: sample standard
/// deviation (n − 1 denominator) over √n; `None` for fewer than two values.
pub fn mean_stderr(xs: &[f64]) -> Option<f64> {
    let n = xs.len();
    if n < 2 {
        return None;
    }
    let m = mean(xs);
    let var = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1) as f64;
    Some(var.sqrt() / (n as f64).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golds(g: &[&str]) -> Vec<String> {
        g.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn normalization_matches_squad_rules() {
        assert_eq!(normalize_answer("The Cat!"), "cat");
        assert_eq!(normalize_answer("  An  apple, a day. "), "apple day");
        // Articles only as whole words: "theater", "again", "banana" stay.
        assert_eq!(
            normalize_answer("the theater again a banana"),
            "theater again banana"
        );
        // Punctuation goes before articles are matched: "the-end" → "theend".
        assert_eq!(normalize_answer("the-end"), "theend");
        assert_eq!(normalize_answer("a_b"), "ab");
        assert_eq!(normalize_answer("It's 20%!"), "its 20");
        assert_eq!(normalize_answer("\tTHE\nend\u{1f}x"), "end x");
        assert_eq!(normalize_answer("Ünïcödé Café"), "ünïcödé café");
        // Non-ASCII punctuation is kept, as Python's string.punctuation is ASCII only.
        assert_eq!(normalize_answer("«yes»"), "«yes»");
        assert_eq!(normalize_answer(""), "");
        assert_eq!(normalize_answer("the a an"), "");
    }

    #[test]
    fn exact_and_f1_by_hand() {
        assert_eq!(exact_match("The Eiffel Tower", "eiffel tower."), 1.0);
        assert_eq!(exact_match("Eiffel Tower", "the tower"), 0.0);
        // gold {red, car}, pred {red, bike, car}: p = 2/3, r = 1, f1 = 0.8.
        assert!((f1_score("a red car", "red bike, car") - 0.8).abs() < 1e-12);
        // Repeated tokens count with multiplicity: gold {no, no}, pred {no}:
        // p = 1, r = 1/2, f1 = 2/3.
        assert!((f1_score("no no", "no") - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(f1_score("yes", "no"), 0.0);
        // Empty sides: both empty → 1, one empty → 0 (articles-only counts as empty).
        assert_eq!(f1_score("", ""), 1.0);
        assert_eq!(f1_score("the", ""), 1.0);
        assert_eq!(f1_score("", "something"), 0.0);
        assert_eq!(f1_score("unknown", ""), 0.0);
        assert_eq!(exact_match("", "  "), 1.0);
    }

    #[test]
    fn single_gold_scores_directly() {
        let s = coqa_scores(&golds(&["white"]), "White.");
        assert_eq!(s, Scores { em: 1.0, f1: 1.0 });
        let s = coqa_scores(&golds(&["a white cat"]), "white dog");
        // gold {white, cat}, pred {white, dog}: p = r = 1/2.
        assert_eq!(s.em, 0.0);
        assert!((s.f1 - 0.5).abs() < 1e-12);
    }

    #[test]
    fn leave_one_out_over_several_golds() {
        // golds: "white", "white cat", "cat"; pred "white".
        // leave out 0: max(f1(white cat)=2/3, f1(cat)=0) = 2/3, em 0
        // leave out 1: max(f1(white)=1, 0) = 1, em 1
        // leave out 2: max(1, 2/3) = 1, em 1
        // f1 = (2/3 + 1 + 1)/3 = 8/9, em = 2/3
        let s = coqa_scores(&golds(&["white", "white cat", "cat"]), "white");
        assert!((s.f1 - 8.0 / 9.0).abs() < 1e-12, "{s:?}");
        assert!((s.em - 2.0 / 3.0).abs() < 1e-12, "{s:?}");
        // Two golds: each scored against the other only.
        // pred "blue": leave out "blue" → vs "dark blue" f1 2/3, em 0;
        // leave out "dark blue" → vs "blue" f1 1, em 1.
        let s = coqa_scores(&golds(&["blue", "dark blue"]), "blue");
        assert!((s.f1 - 5.0 / 6.0).abs() < 1e-12, "{s:?}");
        assert!((s.em - 0.5).abs() < 1e-12, "{s:?}");
        assert_eq!(coqa_scores(&[], "x"), Scores::default());
    }

    #[test]
    fn stderr_is_sample_std_over_sqrt_n() {
        // xs = 0, 1, 1, 0: mean 1/2, sample variance (4 · 1/4)/3 = 1/3,
        // stderr = sqrt(1/3)/2.
        let e = mean_stderr(&[0.0, 1.0, 1.0, 0.0]).unwrap();
        assert!((e - (1.0f64 / 3.0).sqrt() / 2.0).abs() < 1e-12);
        assert_eq!(mean_stderr(&[0.7]), None);
        assert_eq!(mean(&[]), 0.0);
        assert_eq!(mean_stderr(&[0.5, 0.5, 0.5]), Some(0.0));
    }
}
