//! Final-answer extraction and equivalence, so that votes count equal answers as one.
//!
//! Extraction looks, in order, for `\boxed{...}` (nested braces allowed), a GSM8K `#### N` line,
//! "the answer is ...", and finally the last number in the text. Normalisation turns numbers into
//! exact reduced fractions (commas, `$`, units, trailing zeros and `\frac{a}{b}` all vanish, so
//! `3/4`, `0.75` and `\frac{3}{4}` are one answer), plain arithmetic into its value, and a
//! statement ending `= N` into N (so `48 + 24`, `48 + 24 = 72` and `\( 48 + 24 = 72 \)` vote
//! with `72`), and other text into a lowercase form without whitespace.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A final answer as written, plus the canonical key that equal answers share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// The answer text as extracted from the solution.
    pub raw: String,
    /// Canonical form: two answers are equivalent exactly when their keys are equal.
    pub key: String,
}

impl Answer {
    /// Wraps an already extracted answer, computing its key.
    pub fn new(raw: impl Into<String>) -> Self {
        let raw = raw.into();
        let key = normalize(&raw);
        Answer { raw, key }
    }
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// Extracts the final answer from a solution, or `None` when it contains none.
pub fn extract_answer(text: &str) -> Option<Answer> {
    extract_raw(text).map(Answer::new)
}

/// True when `text` (a step cut short by its token limit) already states its final answer in
/// full: a closed `\boxed{...}`, a `#### N` line that ended, or "the answer is N" whose sentence
/// ended. A real engine needs one token position more for end-of-sequence, so a final step
/// that exactly fills the tokens left stops at the limit with its answer written; a number at
/// the very end of the text may itself be cut ("#### 7" of "#### 72") and does not count.
pub fn states_final_answer(text: &str) -> bool {
    let boxed = ["\\boxed{", "\\fbox{"]
        .iter()
        .filter_map(|m| text.rfind(m).map(|i| i + m.len()))
        .max()
        .is_some_and(|open| matching_brace(text, open).is_some());
    let ended = |rest: &str| {
        // The answer is followed by the end of its sentence or line.
        let rest = rest.trim_start_matches([' ', ':', '\t']);
        let bytes = rest.as_bytes();
        let answer_end = rest.char_indices().find_map(|(i, c)| {
            // A '.' that is a decimal point does not end the sentence.
            let decimal = c == '.' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit);
            ((c == '\n' || c == '.') && !decimal).then_some(i)
        });
        answer_end.is_some_and(|i| rest[..i].chars().any(|c| c.is_ascii_alphanumeric()))
    };
    let hashes = text.rfind("####").is_some_and(|at| {
        let rest = text[at + 4..].trim_start_matches([' ', '\t']);
        rest.find('\n')
            .is_some_and(|i| rest[..i].chars().any(|c| c.is_ascii_alphanumeric()))
    });
    let lower = text.to_ascii_lowercase();
    let answer_is = ["answer is", "answer:"]
        .iter()
        .filter_map(|m| lower.rfind(m).map(|i| i + m.len()))
        .max()
        .is_some_and(|at| ended(&text[at..]));
    boxed || hashes || answer_is
}

/// True when `a` and `b` are the same answer after normalisation.
pub fn equivalent(a: &str, b: &str) -> bool {
    normalize(a) == normalize(b)
}

/// Finds the answer text in a solution without normalising it.
pub fn extract_raw(text: &str) -> Option<String> {
    last_boxed(text)
        .or_else(|| after_hashes(text))
        .or_else(|| after_answer_is(text))
        .or_else(|| last_number(text).map(str::to_owned))
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Contents of the last `\boxed{...}` or `\fbox{...}`, with nested braces.
fn last_boxed(text: &str) -> Option<String> {
    let start = ["\\boxed", "\\fbox"]
        .iter()
        .filter_map(|m| text.rfind(m).map(|i| i + m.len()))
        .max()?;
    let rest = text[start..].trim_start();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut depth = 1usize;
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(inner[..i].to_owned());
                    }
                }
                _ => {}
            }
        }
        None
    } else {
        // `\boxed 5`: the next whitespace-delimited token.
        rest.split_whitespace()
            .next()
            .map(|t| t.trim_end_matches(['$', '.']).to_owned())
    }
}

/// The rest of the line after the last GSM8K `####` marker.
fn after_hashes(text: &str) -> Option<String> {
    let at = text.rfind("####")?;
    let line = text[at + 4..].lines().next().unwrap_or("").trim();
    (!line.is_empty()).then(|| line.to_owned())
}

/// What follows the last "answer is" / "answer:" up to the end of its sentence.
fn after_answer_is(text: &str) -> Option<String> {
    // ASCII lowercasing keeps byte offsets valid for the original text.
    let lower = text.to_ascii_lowercase();
    let (at, len) = ["answer is", "answer:"]
        .iter()
        .filter_map(|m| lower.rfind(m).map(|i| (i, m.len())))
        .max_by_key(|&(i, _)| i)?;
    let rest = text[at + len..].trim_start_matches([' ', ':', '\t']);
    let line = rest.lines().next().unwrap_or("");
    // The sentence ends at ". " or at a final '.', but not at a decimal point.
    let end = line.find(". ").unwrap_or(line.len());
    let answer = line[..end].trim().trim_end_matches('.').trim();
    (!answer.is_empty()).then(|| answer.to_owned())
}

/// The last number-like token (`-1,234.5`, `3/4`) in the text.
fn last_number(text: &str) -> Option<&str> {
    let bytes = text.as_bytes();
    let mut last = None;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() {
            let mut start = i;
            if start > 0
                && bytes[start - 1] == b'-'
                && (start < 2 || !bytes[start - 2].is_ascii_alphanumeric())
            {
                start -= 1;
            }
            let end = number_end(bytes, i);
            last = Some(&text[start..end]);
            i = end;
        } else {
            i += 1;
        }
    }
    last
}

/// End of the number that starts at `i`: digits, `,ddd` groups, one decimal part, one `/d...`.
fn number_end(bytes: &[u8], mut i: usize) -> usize {
    let digits = |bytes: &[u8], mut j: usize| {
        while j < bytes.len() && bytes[j].is_ascii_digit() {
            j += 1;
        }
        j
    };
    i = digits(bytes, i);
    while bytes.get(i) == Some(&b',')
        && bytes.len() >= i + 4
        && bytes[i + 1..i + 4].iter().all(u8::is_ascii_digit)
        && !bytes.get(i + 4).is_some_and(u8::is_ascii_digit)
    {
        i += 4;
    }
    for sep in [b'.', b'/'] {
        if bytes.get(i) == Some(&sep) && bytes.get(i + 1).is_some_and(u8::is_ascii_digit) {
            i = digits(bytes, i + 1);
        }
    }
    i
}

/// The canonical key of an answer.
pub fn normalize(raw: &str) -> String {
    let text = strip_markup(raw);
    let text = strip_assignment(&text);
    match parse_number(text).or_else(|| arithmetic(text)) {
        Some(n) => n.to_string(),
        None => {
            let mut key: String = text
                .chars()
                .filter(|c| !c.is_whitespace())
                .flat_map(char::to_lowercase)
                .collect();
            while key.ends_with('.') {
                key.pop();
            }
            key
        }
    }
}

/// Removes LaTeX and currency decoration that never changes an answer's value.
fn strip_markup(raw: &str) -> String {
    let mut s = raw.trim().to_owned();
    if let Some(inner) =
        last_boxed(&s).filter(|_| s.starts_with("\\boxed") || s.starts_with("\\fbox"))
    {
        s = inner;
    }
    for wrapper in ["\\text{", "\\textbf{", "\\mathrm{", "\\mbox{"] {
        while let Some(at) = s.find(wrapper) {
            let open = at + wrapper.len();
            let Some(close) = matching_brace(&s, open) else {
                break;
            };
            s = format!("{}{}{}", &s[..at], &s[open..close], &s[close + 1..]);
        }
    }
    for (from, to) in [
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("\\left", ""),
        ("\\right", ""),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("\\ ", " "),
        ("~", " "),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("°", ""),
        ("\\$", ""),
        ("$", ""),
        // Inline and display math delimiters.
        ("\\(", ""),
        ("\\)", ""),
        ("\\[", ""),
        ("\\]", ""),
        ("\u{2212}", "-"),
    ] {
        s = s.replace(from, to);
    }
    s.trim().trim_end_matches('.').trim().to_owned()
}

/// Byte index of the `}` closing the brace group whose content starts at `open`.
fn matching_brace(s: &str, open: usize) -> Option<usize> {
    let mut depth = 1usize;
    for (i, c) in s[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(open + i);
                }
            }
            _ => {}
        }
    }
    None
}

/// `x = 5` → `5`: a single variable on the left of `=` is not part of the answer. And an
/// answer that ends `= N` states N, whatever comes before (`48 + 24 = 72`, `a total of
/// 48 + 24 = 72 clips`): the number after the last `=` is the answer.
fn strip_assignment(s: &str) -> &str {
    if let Some((_, rhs)) = s.rsplit_once('=') {
        let rhs = rhs.trim();
        if parse_number(rhs).or_else(|| arithmetic(rhs)).is_some() {
            return rhs;
        }
    }
    match s.split_once('=') {
        Some((lhs, rhs))
            if !rhs.contains('=')
                && lhs.trim().chars().next().is_some_and(char::is_alphabetic)
                && lhs.trim().chars().all(|c| c.is_alphanumeric() || c == '_') =>
        {
            rhs.trim()
        }
        _ => s,
    }
}

/// An exact rational number, always reduced with a positive denominator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rational {
    num: i128,
    den: i128,
}

/// Numbers longer than this many digits are compared as text rather than risk overflow.
const DIGITS_MAX: usize = 30;

impl Rational {
    fn new(num: i128, den: i128) -> Option<Rational> {
        if den == 0 {
            return None;
        }
        let g = gcd(num.unsigned_abs(), den.unsigned_abs()) as i128;
        let sign = if den < 0 { -1 } else { 1 };
        Some(Rational {
            num: sign * num / g.max(1),
            den: sign * den / g.max(1),
        })
    }
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl fmt::Display for Rational {
    /// Integers as integers, terminating fractions as decimals, others as `p/q`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.den == 1 {
            return write!(f, "{}", self.num);
        }
        let (mut twos, mut fives, mut rest) = (0u32, 0u32, self.den);
        while rest % 2 == 0 {
            rest /= 2;
            twos += 1;
        }
        while rest % 5 == 0 {
            rest /= 5;
            fives += 1;
        }
        let places = twos.max(fives);
        let scaled = 10i128
            .checked_pow(places)
            .and_then(|p| (self.num).checked_mul(p / self.den));
        match (rest, scaled) {
            (1, Some(scaled)) => {
                let sign = if scaled < 0 { "-" } else { "" };
                let digits = format!(
                    "{:0>width$}",
                    scaled.unsigned_abs(),
                    width = places as usize + 1
                );
                let (int, frac) = digits.split_at(digits.len() - places as usize);
                write!(f, "{sign}{int}.{}", frac.trim_end_matches('0'))
            }
            _ => write!(f, "{}/{}", self.num, self.den),
        }
    }
}

/// Parses `-1,234.50`, `3/4`, `\frac{3}{4}`, `$5`, `12 apples`, `50%`; `None` for anything else.
fn parse_number(s: &str) -> Option<Rational> {
    let s = s.trim();
    // No number, with its unit, is this long (and nested fractions recurse).
    if s.len() > ARITHMETIC_MAX {
        return None;
    }
    let (negative, body) = match s.strip_prefix('-') {
        Some(rest) => (true, rest.trim_start()),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let body = body.trim_start_matches(['€', '£']).trim_start();
    let (value, rest) = if let Some(frac) = body.strip_prefix("\\frac") {
        let a_open = frac.strip_prefix('{')?;
        let a_end = a_open.find('}')?;
        let b_open = a_open[a_end + 1..].strip_prefix('{')?;
        let b_end = b_open.find('}')?;
        let a = parse_number(&a_open[..a_end])?;
        let b = parse_number(&b_open[..b_end])?;
        (divide(a, b)?, &b_open[b_end + 1..])
    } else {
        let end = number_end(body.as_bytes(), 0);
        if end == 0 {
            return None;
        }
        (parse_plain(&body[..end])?, &body[end..])
    };
    // What follows may be a unit or a percent sign, but nothing that changes the value.
    let unit_like = rest
        .chars()
        .all(|c| c.is_alphabetic() || c.is_whitespace() || c == '%' || c == '.');
    if !unit_like {
        return None;
    }
    Some(if negative {
        Rational {
            num: -value.num,
            den: value.den,
        }
    } else {
        value
    })
}

fn divide(a: Rational, b: Rational) -> Option<Rational> {
    Rational::new(a.num.checked_mul(b.den)?, a.den.checked_mul(b.num)?)
}

/// `1,234.50` or `3/4` (no sign), exactly.
/// Longest text [`arithmetic`] evaluates, in bytes.
const ARITHMETIC_MAX: usize = 200;

/// The exact value of plain arithmetic on numbers (`48 + 24`, `$13 + $36 * 2`, `(3 + 5) / 2`,
/// `12 \\times 5`): `+ - * / × ÷ ·`, `\\times`, `\\cdot`, `\\div` and parentheses, with the usual
/// precedence; `None` for anything else (a letter, a unit, a comma list) or on overflow. An
/// answer written as a sum is the sum.
fn arithmetic(s: &str) -> Option<Rational> {
    // Longer text is not an answer written as a sum (and bounds the parser's recursion).
    if s.len() > ARITHMETIC_MAX {
        return None;
    }
    let s = s
        .replace("\\times", "*")
        .replace("\\cdot", "*")
        .replace("\\div", "/")
        .replace(['×', '·'], "*")
        .replace('÷', "/");
    let bytes = s.as_bytes();
    let mut tokens: Vec<Result<Rational, u8>> = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if b"+-*/()".contains(&c) {
            tokens.push(Err(c));
            i += 1;
        } else if c.is_ascii_digit() || c == b'.' {
            // A number without its own '/' (that is division here).
            let mut end = i;
            while end < bytes.len()
                && (bytes[end].is_ascii_digit()
                    || bytes[end] == b'.'
                    || (bytes[end] == b','
                        && bytes.len() >= end + 4
                        && bytes[end + 1..end + 4].iter().all(u8::is_ascii_digit)))
            {
                end += 1;
            }
            tokens.push(Ok(parse_plain(&s[i..end])?));
            i = end;
        } else {
            return None;
        }
    }
    if !tokens
        .iter()
        .any(|t| matches!(t, Err(b'+' | b'-' | b'*' | b'/')))
    {
        return None;
    }
    let mut at = 0;
    let value = sum(&tokens, &mut at)?;
    (at == tokens.len()).then_some(value)
}

fn sum(tokens: &[Result<Rational, u8>], at: &mut usize) -> Option<Rational> {
    let mut v = product(tokens, at)?;
    while let Some(&Err(op @ (b'+' | b'-'))) = tokens.get(*at) {
        *at += 1;
        let r = product(tokens, at)?;
        let r = if op == b'-' {
            Rational::new(r.num.checked_neg()?, r.den)?
        } else {
            r
        };
        v = Rational::new(
            v.num
                .checked_mul(r.den)?
                .checked_add(r.num.checked_mul(v.den)?)?,
            v.den.checked_mul(r.den)?,
        )?;
    }
    Some(v)
}

fn product(tokens: &[Result<Rational, u8>], at: &mut usize) -> Option<Rational> {
    let mut v = factor(tokens, at)?;
    while let Some(&Err(op @ (b'*' | b'/'))) = tokens.get(*at) {
        *at += 1;
        let r = factor(tokens, at)?;
        v = if op == b'*' {
            Rational::new(v.num.checked_mul(r.num)?, v.den.checked_mul(r.den)?)?
        } else {
            divide(v, r)?
        };
    }
    Some(v)
}

fn factor(tokens: &[Result<Rational, u8>], at: &mut usize) -> Option<Rational> {
    match tokens.get(*at)? {
        Ok(v) => {
            *at += 1;
            Some(*v)
        }
        Err(b'-') => {
            *at += 1;
            let v = factor(tokens, at)?;
            Rational::new(v.num.checked_neg()?, v.den)
        }
        Err(b'(') => {
            *at += 1;
            let v = sum(tokens, at)?;
            (tokens.get(*at) == Some(&Err(b')'))).then(|| *at += 1)?;
            Some(v)
        }
        _ => None,
    }
}

fn parse_plain(s: &str) -> Option<Rational> {
    if let Some((a, b)) = s.split_once('/') {
        return divide(parse_plain(a)?, parse_plain(b)?);
    }
    let digits: String = s.chars().filter(|&c| c != ',').collect();
    let (int, frac) = digits.split_once('.').unwrap_or((&digits, ""));
    if int.len() + frac.len() > DIGITS_MAX
        || !(int.chars().chain(frac.chars()).all(|c| c.is_ascii_digit()))
    {
        return None;
    }
    let num: i128 = format!("{int}{frac}").parse().ok()?;
    Rational::new(num, 10i128.checked_pow(frac.len() as u32)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_extract(text: &str, expected: Option<&str>) {
        assert_eq!(
            extract_raw(text).as_deref(),
            expected,
            "extracting from {text:?}"
        );
    }

    #[test]
    fn a_cut_step_states_its_answer_only_when_the_statement_ended() {
        for (text, stated) in [
            ("So she pays 72 dollars.\n\nThe answer is 72.", true),
            ("The answer is 72", false), // "72" may be the start of "720"
            ("The answer is 1.5", false),
            ("The answer is 1.5.", true),
            ("The answer is", false),
            ("48 + 24 = 72.\n#### 72\n", true),
            ("48 + 24 = 72.\n#### 7", false),
            ("so \\boxed{72}", true),
            ("so \\boxed{7", false),
            ("48 / 2 = 24, and 48 + 24 = 72.", false), // no statement of the answer at all
        ] {
            assert_eq!(states_final_answer(text), stated, "{text:?}");
        }
    }

    #[test]
    fn extraction() {
        check_extract("Natalia sold 48 + 24 = 72 clips.\n#### 72", Some("72"));
        check_extract("so x = 5.\n#### 1,234\n", Some("1,234"));
        check_extract("Thus \\boxed{\\frac{3}{4}} is it", Some("\\frac{3}{4}"));
        check_extract("\\boxed{a{b{c}}d} then \\boxed{ {x}^{2} }", Some("{x}^{2}"));
        check_extract("\\boxed 7 is the value", Some("7"));
        check_extract("\\boxed{unclosed", None);
        check_extract("The answer is $18. Done.", Some("$18"));
        check_extract("So the final answer is: 3.5.", Some("3.5"));
        check_extract("Answer: forty two", Some("forty two"));
        check_extract(
            "We get 3 apples, then 12 more, total -15 oranges",
            Some("-15"),
        );
        check_extract("ratio 3/4 of 1,000,000.", Some("1,000,000"));
        check_extract("x-5", Some("5"));
        check_extract("no numbers here", None);
        check_extract("####   \n", None);
        check_extract("", None);
        // Boxed wins over a later marker, markers win over stray numbers.
        check_extract("\\boxed{2} #### 3", Some("2"));
        check_extract("#### 4 and then 5", Some("4 and then 5"));
    }

    fn check_key(raw: &str, expected: &str) {
        assert_eq!(normalize(raw), expected, "normalising {raw:?}");
    }

    #[test]
    fn normalisation() {
        check_key("1,234", "1234");
        check_key("$1,234.00", "1234");
        check_key("\\$5.50", "5.5");
        check_key("0.750", "0.75");
        check_key("3/4", "0.75");
        check_key("\\frac{3}{4}", "0.75");
        check_key("\\dfrac{1}{3}", "1/3");
        check_key("-\\frac{6}{4}", "-1.5");
        check_key("−7", "-7");
        check_key("- 7", "-7");
        check_key("12 apples", "12");
        check_key("18 dollars.", "18");
        check_key("50%", "50");
        check_key("x = 5", "5");
        // A result after `=` is the answer, whatever its left side; math delimiters go.
        check_key("48 + 24 = 72", "72");
        check_key("\\( 48 + 24 = 72 \\)", "72");
        check_key("\\[48 \\times 2 = 96\\]", "96");
        check_key(
            "Natalia sold 48 clips in April and 24 clips in May, making a total of \\( 48 + 24 = 72 \\) clips",
            "72",
        );
        check_key("$12 \\times 5 = $60", "60");
        check_key("$13 + $36 = $13 + 36", "49");
        check_key("a = b", "b");
        check_key("x = 5 + y", "5+y");
        check_key("90^\\circ", "90");
        check_key("\\text{(B)}", "(b)");
        check_key("\\boxed{42}", "42");
        // Plain arithmetic is its value; anything else in it keeps the text.
        check_key("3 + 4", "7");
        check_key("48 + 24", "72");
        check_key("$13 + ($9 * 4) + ($5 * 3)", "64");
        check_key("12 \\times 5 - 1", "59");
        check_key("(3 + 5) / 2", "4");
        check_key("10 / 4", "2.5");
        check_key("2 * -3", "-6");
        check_key("1,000 + 1", "1001");
        check_key("3 + x", "3+x");
        check_key("4 apples + 2", "4apples+2");
        check_key("(1 + 2", "(1+2");
        check_key("5 / 0", "5/0");
        check_key("3 +", "3+");
        // Nesting deeper than any answer is text, not a stack overflow.
        let deep = format!("{}1{}", "(".repeat(100_000), ")".repeat(100_000));
        assert_eq!(normalize(&deep).len(), 200_001);
        let fracs = format!("{}1{}", "\\frac{".repeat(50_000), "}{2}".repeat(50_000));
        assert!(!normalize(&fracs).is_empty());
        check_key("(2, 3)", "(2,3)");
        check_key(
            "1000000000000000000000000000000000000",
            "1000000000000000000000000000000000000",
        );
        check_key("1/0", "1/0");
        check_key("0.1", "0.1");
        check_key("-0.05", "-0.05");
    }

    fn check_same(a: &str, b: &str, same: bool) {
        assert_eq!(equivalent(a, b), same, "{a:?} vs {b:?}");
    }

    #[test]
    fn equivalence() {
        check_same("3/4", "0.75", true);
        check_same("\\frac{3}{4}", ".75", true);
        check_same("\\frac{3}{4}", "0.75", true);
        check_same("$1,000", "1000 dollars", true);
        check_same("2.50", "2.5", true);
        check_same("-3", "3", false);
        check_same("1/3", "0.333", false);
        check_same("Paris", " paris. ", true);
    }

    #[test]
    fn extracted_answers_vote_together() {
        let a = extract_answer("... so she earns $1,080.00 per week.\n#### 1080").unwrap();
        let b = extract_answer("The answer is 1080 dollars.").unwrap();
        let c = extract_answer("Total: \\boxed{1,080}").unwrap();
        assert_eq!(a.key, b.key);
        assert_eq!(b.key, c.key);
        assert_eq!(a.key, "1080");
    }
}
