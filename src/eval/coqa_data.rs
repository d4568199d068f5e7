//! CoQA documents from the official JSON (`coqa-dev-v1.0.json`), from the
//! Hugging Face layout of `EleutherAI/coqa` (JSON array, JSONL or parquet
//! rows whose questions/answers are column lists), or from the project's
//! bundled fixture.
//!
//! Accepted shapes of `questions`, `answers` and each `additional_answers[k]`:
//! a list of objects with `input_text` (official), an object whose
//! `input_text` is a list (HF), or, for questions, a plain list of strings.
//! Turns are matched by position, as lm-eval does.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The project's own CoQA-format fixture (`data/coqa-fixture.json`), built in
/// so that evaluation works offline from any directory.
pub const FIXTURE_JSON: &str = include_str!("../../data/coqa-fixture.json");

/// One question of a conversation with its answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CoqaTurn {
    pub question: String,
    /// The answer in `answers[]` (the one shown in the conversation history).
    pub answer: String,
    /// `additional_answers[k]` for this turn, one per answer set, keys in
    /// numeric order.
    pub additional_answers: Vec<String>,
}

/// One story and its conversation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CoqaDoc {
    /// Story id (`id`); `#<index>` when the row has none.
    pub id: String,
    /// Domain (`source`), empty when absent.
    pub source: String,
    /// The passage, exactly as stored (lm-eval does not strip it).
    pub story: String,
    pub turns: Vec<CoqaTurn>,
}

/// The bundled fixture, parsed.
pub fn fixture() -> Result<Vec<CoqaDoc>> {
    parse_text(FIXTURE_JSON, "data/coqa-fixture.json (built in)")
}

/// Loads a CoQA file: parquet (by its `PAR1` magic), a JSON document (the
/// official `{"data": [...]}` or an array of rows) or JSONL rows.
pub fn load_file(path: &Path) -> Result<Vec<CoqaDoc>> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("{}: cannot read CoQA data", path.display()))?;
    let origin = path.display().to_string();
    if bytes.starts_with(b"PAR1") {
        let rows = super::coqa_parquet::read_rows(path)?;
        return parse_rows(rows, &origin);
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!("{origin}: not UTF-8 text (byte {}) and not parquet; expected CoQA JSON, JSONL or parquet", e.utf8_error().valid_up_to())
    })?;
    parse_text(&text, &origin)
}

/// Parses CoQA JSON or JSONL text; `origin` names it in errors.
pub fn parse_text(text: &str, origin: &str) -> Result<Vec<CoqaDoc>> {
    let trimmed = text.trim_start();
    if trimmed.is_empty() {
        bail!("{origin}: the file is empty; expected CoQA JSON, JSONL or parquet");
    }
    match serde_json::from_str::<Value>(trimmed) {
        Ok(Value::Object(mut top)) if top.contains_key("data") => match top.remove("data") {
            Some(Value::Array(docs)) => parse_rows(docs, origin),
            _ => bail!("{origin}: 'data' must be a list of documents"),
        },
        Ok(Value::Array(rows)) => parse_rows(rows, origin),
        Ok(row @ Value::Object(_)) => parse_rows(vec![row], origin),
        Ok(_) => bail!("{origin}: expected a JSON object or list of CoQA documents"),
        Err(whole) => {
            // Not one JSON value: JSON Lines, one row per line.
            let mut rows = Vec::new();
            for (n, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let row = serde_json::from_str(line).map_err(|e| {
                    anyhow::anyhow!(
                        "{origin}: neither one JSON document ({whole}) nor JSON Lines: line {}: {e}",
                        n + 1
                    )
                })?;
                rows.push(row);
            }
            parse_rows(rows, origin)
        }
    }
}

/// Parses documents (official or HF rows), checking ids are unique.
pub fn parse_rows(rows: Vec<Value>, origin: &str) -> Result<Vec<CoqaDoc>> {
    let mut seen = HashSet::new();
    let mut docs = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let doc = parse_doc(row, i, origin)?;
        if !seen.insert(doc.id.clone()) {
            bail!(
                "{origin}: document {i}: id '{}' appears twice; ids must be unique",
                doc.id
            );
        }
        docs.push(doc);
    }
    if docs.is_empty() {
        bail!("{origin}: no documents");
    }
    Ok(docs)
}

/// Where an error is: file, document index and id.
struct DocCtx<'a> {
    origin: &'a str,
    index: usize,
    id: String,
}

impl DocCtx<'_> {
    fn fail(&self, what: impl std::fmt::Display) -> anyhow::Error {
        anyhow::anyhow!(
            "{}: document {} (id '{}'): {what}",
            self.origin,
            self.index,
            self.id
        )
    }
}

fn parse_doc(row: &Value, index: usize, origin: &str) -> Result<CoqaDoc> {
    let Some(obj) = row.as_object() else {
        bail!(
            "{origin}: document {index}: expected a JSON object, found {}",
            kind(row)
        );
    };
    let id = match obj.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        None | Some(Value::Null) => format!("#{index}"),
        Some(other) => bail!(
            "{origin}: document {index}: field 'id' must be a string, found {}",
            kind(other)
        ),
    };
    let ctx = DocCtx { origin, index, id };
    let story = match obj.get("story") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(ctx.fail(format!(
                "field 'story' must be a string, found {}",
                kind(other)
            )));
        }
        None => return Err(ctx.fail("missing field 'story'")),
    };
    let source = obj
        .get("source")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let questions = texts(&ctx, "questions", obj.get("questions"), true)?;
    let answers = texts(&ctx, "answers", obj.get("answers"), false)?;
    if questions.is_empty() {
        return Err(ctx.fail("'questions' is empty: a document needs at least one turn"));
    }
    if questions.len() != answers.len() {
        return Err(ctx.fail(format!(
            "{} questions but {} answers; every question needs its answer",
            questions.len(),
            answers.len()
        )));
    }
    let extra = additional(&ctx, obj.get("additional_answers"), questions.len())?;
    let turns = questions
        .into_iter()
        .zip(answers)
        .enumerate()
        .map(|(t, (question, answer))| CoqaTurn {
            question,
            answer,
            additional_answers: extra.iter().map(|set| set[t].clone()).collect(),
        })
        .collect();
    Ok(CoqaDoc {
        id: ctx.id,
        source,
        story,
        turns,
    })
}

/// The additional answer sets, in numeric key order, each one text per turn.
/// A set whose every `turn_id` is −1 is the HF train split's placeholder and
/// is dropped.
fn additional(ctx: &DocCtx, value: Option<&Value>, turns: usize) -> Result<Vec<Vec<String>>> {
    let map = match value {
        None | Some(Value::Null) => return Ok(vec![]),
        Some(Value::Object(m)) => m,
        Some(other) => {
            return Err(ctx.fail(format!(
                "field 'additional_answers' must be an object of answer lists, found {}",
                kind(other)
            )));
        }
    };
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort_by_key(|k| (k.parse::<u64>().unwrap_or(u64::MAX), k.to_string()));
    let mut sets = Vec::new();
    for key in keys {
        let field = format!("additional_answers['{key}']");
        let v = &map[key];
        if is_placeholder(v) {
            continue;
        }
        let set = texts(ctx, &field, Some(v), false)?;
        if set.len() != turns {
            return Err(ctx.fail(format!(
                "{field} has {} answers for {turns} questions; it needs one per question",
                set.len()
            )));
        }
        sets.push(set);
    }
    Ok(sets)
}

fn is_placeholder(v: &Value) -> bool {
    let ids: Vec<&Value> = match v {
        Value::Array(items) => items.iter().filter_map(|i| i.get("turn_id")).collect(),
        Value::Object(cols) => cols
            .get("turn_id")
            .and_then(Value::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default(),
        _ => vec![],
    };
    !ids.is_empty() && ids.iter().all(|t| t.as_i64() == Some(-1))
}

/// The `input_text`s of a questions/answers field in any accepted shape.
fn texts(
    ctx: &DocCtx,
    field: &str,
    value: Option<&Value>,
    plain_strings_ok: bool,
) -> Result<Vec<String>> {
    let Some(value) = value else {
        return Err(ctx.fail(format!("missing field '{field}'")));
    };
    match value {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) if plain_strings_ok => Ok(s.clone()),
                Value::Object(o) => match o.get("input_text") {
                    Some(Value::String(s)) => Ok(s.clone()),
                    Some(other) => Err(ctx.fail(format!(
                        "{field}[{i}].input_text must be a string, found {}",
                        kind(other)
                    ))),
                    None => Err(ctx.fail(format!("{field}[{i}] has no 'input_text'"))),
                },
                other => Err(ctx.fail(format!(
                    "{field}[{i}] must be an object with 'input_text', found {}",
                    kind(other)
                ))),
            })
            .collect(),
        Value::Object(cols) => match cols.get("input_text") {
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(ctx.fail(format!(
                        "{field}.input_text[{i}] must be a string, found {}",
                        kind(other)
                    ))),
                })
                .collect(),
            Some(other) => Err(ctx.fail(format!(
                "{field}.input_text must be a list, found {}",
                kind(other)
            ))),
            None => Err(ctx.fail(format!("{field} has no 'input_text' column"))),
        },
        other => Err(ctx.fail(format!(
            "field '{field}' must be a list or an object of columns, found {}",
            kind(other)
        ))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err_of(v: Value) -> String {
        parse_rows(vec![v], "t.json").unwrap_err().to_string()
    }

    #[test]
    fn fixture_parses_with_three_additional_sets() {
        let docs = fixture().unwrap();
        assert!((5..=8).contains(&docs.len()), "{}", docs.len());
        for d in &docs {
            assert!(d.turns.len() >= 4, "{}", d.id);
            assert!(
                d.turns.iter().all(|t| t.additional_answers.len() == 3),
                "{}",
                d.id
            );
        }
        assert_eq!(docs[0].id, "qb-lighthouse");
        assert_eq!(docs[0].turns[1].question, "For how long?");
        assert_eq!(docs[0].turns[1].additional_answers[1], "11 years");
    }

    #[test]
    fn hf_columns_and_official_rows_agree() {
        let official = json!({"id": "x", "story": "S", "questions": [{"input_text": "q1", "turn_id": 1}, {"input_text": "q2", "turn_id": 2}],
            "answers": [{"input_text": "a1"}, {"input_text": "a2"}],
            "additional_answers": {"1": [{"input_text": "c1"}, {"input_text": "c2"}], "0": [{"input_text": "b1"}, {"input_text": "b2"}]}});
        let hf = json!({"id": "x", "source": "", "story": "S", "questions": {"input_text": ["q1", "q2"], "turn_id": [1, 2]},
            "answers": {"input_text": ["a1", "a2"]},
            "additional_answers": {"0": {"input_text": ["b1", "b2"]}, "1": {"input_text": ["c1", "c2"]}}});
        let a = parse_rows(vec![official], "o").unwrap();
        let b = parse_rows(vec![hf], "h").unwrap();
        assert_eq!(a, b);
        assert_eq!(a[0].turns[1].additional_answers, vec!["b2", "c2"]);
    }

    #[test]
    fn train_placeholder_sets_are_dropped_and_ids_default_to_index() {
        let row = json!({"story": "S", "questions": ["q"], "answers": {"input_text": ["a"]},
            "additional_answers": {"0": {"input_text": [""], "turn_id": [-1]}}});
        let d = parse_rows(vec![row], "h").unwrap();
        assert_eq!(d[0].id, "#0");
        assert!(d[0].turns[0].additional_answers.is_empty());
    }

    #[test]
    fn bad_documents_name_document_and_field() {
        let e = err_of(json!({"id": "s1", "questions": [], "answers": []}));
        assert!(
            e.contains("document 0 (id 's1'): missing field 'story'"),
            "{e}"
        );
        let e = err_of(
            json!({"id": "s1", "story": "S", "questions": [{"input_text": "q"}, {"turn_id": 2}], "answers": [{"input_text": "a"}, {"input_text": "b"}]}),
        );
        assert!(
            e.contains("(id 's1'): questions[1] has no 'input_text'"),
            "{e}"
        );
        let e = err_of(
            json!({"id": "s2", "story": "S", "questions": [{"input_text": "q"}, {"input_text": "r"}], "answers": [{"input_text": "a"}]}),
        );
        assert!(e.contains("(id 's2'): 2 questions but 1 answers"), "{e}");
        let e = err_of(
            json!({"id": "s3", "story": "S", "questions": ["q"], "answers": [{"input_text": "a"}],
            "additional_answers": {"0": [{"input_text": "a"}, {"input_text": "b"}]}}),
        );
        assert!(
            e.contains("(id 's3'): additional_answers['0'] has 2 answers for 1 questions"),
            "{e}"
        );
        let e = err_of(json!({"id": "s4", "story": 3, "questions": ["q"], "answers": ["a"]}));
        assert!(
            e.contains("field 'story' must be a string, found a number"),
            "{e}"
        );
        let e = err_of(json!({"id": "s5", "story": "S", "answers": ["a"]}));
        assert!(e.contains("(id 's5'): missing field 'questions'"), "{e}");
        let e = parse_rows(vec![json!({"id": "d", "story": "S", "questions": ["q"], "answers": [{"input_text": "a"}]}); 2], "t.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("id 'd' appears twice"), "{e}");
    }

    #[test]
    fn text_forms_official_array_and_jsonl() {
        let row =
            r#"{"id": "a", "story": "S", "questions": ["q"], "answers": [{"input_text": "x"}]}"#;
        let official = format!(r#"{{"version": "1.0", "data": [{row}]}}"#);
        let jsonl = format!("{row}\n{}\n", row.replace("\"a\"", "\"b\""));
        assert_eq!(parse_text(&official, "o").unwrap().len(), 1);
        assert_eq!(parse_text(&format!("[{row}]"), "a").unwrap().len(), 1);
        let docs = parse_text(&jsonl, "l").unwrap();
        assert_eq!(
            docs.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        let e = parse_text("{\"id\": 1,\n garbage", "bad.json")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("bad.json: neither one JSON document"), "{e}");
        assert!(
            parse_text("  ", "e")
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
    }
}
