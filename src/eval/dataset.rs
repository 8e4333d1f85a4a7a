//! GSM8K-style datasets: one JSON object per line with a `question` and an `answer` whose final
//! line is `#### N`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// One question with its gold answer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Question {
    /// Position in the file (0-based, blank lines not counted): the stable id traces refer to.
    pub(crate) index: usize,
    /// The question text, as the search sees it.
    pub(crate) question: String,
    /// The gold final answer (what follows `####`), for the outcome check only.
    pub(crate) gold: String,
}

/// A line as GSM8K writes it; other fields are ignored.
#[derive(Deserialize)]
struct Line {
    question: String,
    answer: String,
}

/// Reads every question of `path`. Errors name the file and the 1-based line.
pub(crate) fn load(path: &Path) -> Result<Vec<Question>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the dataset {}", path.display()))?;
    parse(&text, &path.display().to_string())
}

/// Parses dataset text; `name` is how errors call the file.
pub(crate) fn parse(text: &str, name: &str) -> Result<Vec<Question>> {
    let mut questions = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: Line = serde_json::from_str(line).with_context(|| {
            format!("{name}:{line_no}: not a GSM8K line (want {{\"question\": ..., \"answer\": \"... #### N\"}})")
        })?;
        let Some((_, gold)) = parsed.answer.rsplit_once("####") else {
            bail!("{name}:{line_no}: the answer has no final `#### N` line");
        };
        let gold = gold.trim();
        if gold.is_empty() {
            bail!("{name}:{line_no}: nothing after `####` in the answer");
        }
        if parsed.question.trim().is_empty() {
            bail!("{name}:{line_no}: the question is empty");
        }
        questions.push(Question {
            index: questions.len(),
            question: parsed.question,
            gold: gold.to_owned(),
        });
    }
    if questions.is_empty() {
        bail!("{name}: no questions in the dataset");
    }
    Ok(questions)
}

/// The questions `offset..offset + limit` (to the end without a limit).
pub(crate) fn select(
    questions: Vec<Question>,
    offset: usize,
    limit: Option<usize>,
) -> Result<Vec<Question>> {
    if offset >= questions.len() {
        bail!(
            "--offset {offset} is past the end of the dataset ({} questions)",
            questions.len()
        );
    }
    let end = limit.map_or(questions.len(), |l| {
        offset.saturating_add(l).min(questions.len())
    });
    Ok(questions
        .into_iter()
        .skip(offset)
        .take(end - offset)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dataset line with these fields.
    fn line(question: &str, answer: &str) -> String {
        serde_json::json!({"question": question, "answer": answer}).to_string() + "\n"
    }

    /// Parses `text` and expects an error whose message contains `expected`.
    fn check_error(text: &str, expected: &str) {
        let err = parse(text, "data.jsonl").expect_err(text);
        let message = format!("{err:#}");
        assert!(message.contains(expected), "{message:?} lacks {expected:?}");
    }

    #[test]
    fn reads_questions_and_gold_answers() {
        let text = line("1+1?", "One and one.\n#### 2")
            + "\n"
            + r#"{"question": "Half of 3000?", "answer": "1500. \n#### 1,500 ", "extra": 1}"#;
        let qs = parse(&text, "d").unwrap();
        assert_eq!(qs.len(), 2);
        assert_eq!(qs[0].gold, "2");
        assert_eq!(qs[1].gold, "1,500");
        assert_eq!((qs[0].index, qs[1].index), (0, 1));
        assert_eq!(qs[1].question, "Half of 3000?");
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let good = line("q", "#### 1");
        check_error(&format!("{good}{{not json\n"), "data.jsonl:2:");
        check_error(
            &format!("{good}{good}{{\"question\": \"q\"}}\n"),
            "data.jsonl:3: not a GSM8K line",
        );
        check_error(
            &line("q", "no marker"),
            "data.jsonl:1: the answer has no final `#### N` line",
        );
        check_error(&line("q", "#### "), "data.jsonl:1: nothing after");
        check_error(&line(" ", "#### 3"), "data.jsonl:1: the question is empty");
        check_error("\n\n", "data.jsonl: no questions");
    }

    #[test]
    fn offset_and_limit_select_a_window() {
        let text: String = (0..5)
            .map(|i| line(&format!("q{i}"), &format!("#### {i}")))
            .collect();
        let all = parse(&text, "d").unwrap();
        let window = select(all.clone(), 1, Some(2)).unwrap();
        assert_eq!(
            window.iter().map(|q| q.index).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(select(all.clone(), 3, Some(10)).unwrap().len(), 2);
        assert_eq!(select(all.clone(), 0, None).unwrap().len(), 5);
        assert!(select(all, 5, None).is_err());
    }
}
