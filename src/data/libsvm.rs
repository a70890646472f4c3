//! The LIBSVM text format: one row per line, `label index:value ...`, labels
//! +1/-1 (or 1/0), indices 1-based and strictly increasing. This module turns
//! lines into `Dataset` rows and reads byte ranges of a file, so that workers
//! splitting one file read every line exactly once between them.
//!
//! Tolerated: blank lines, `#` comments to the end of a line, trailing
//! whitespace and CRLF line ends. Anything else unexpected is an error
//! naming the file and the 1-based line.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::Path;

use super::{Dataset, FeatureMode, bad_data};
use crate::error::{Error, Result};
use crate::table::mix64;

/// Parses a whole file.
pub fn read_file(path: impl AsRef<Path>, mode: FeatureMode) -> Result<Dataset> {
    let mut data = Dataset::new();
    read_range(path, 0..u64::MAX, mode, &mut data)?;
    Ok(data)
}

/// Parses text from any reader; errors name the input `name` and the line.
pub fn parse(name: &str, input: impl BufRead, mode: FeatureMode) -> Result<Dataset> {
    mode.validate()?;
    let mut data = Dataset::new();
    match parse_lines(input, u64::MAX, &mut Parser::new(mode), &mut data) {
        Ok(()) => Ok(data),
        Err(LineError::Io(e)) => Err(Error::io(format!("reading {name}"), e)),
        Err(LineError::Bad { line, detail }) => Err(bad_data(format!("{name}:{line}"), detail)),
    }
}

/// Appends to `data` the rows on the lines of `path` that start inside the
/// byte `range` (a line belongs to the range it starts in).
pub fn read_range(path: impl AsRef<Path>, range: Range<u64>, mode: FeatureMode, data: &mut Dataset) -> Result<()> {
    mode.validate()?;
    let path = path.as_ref();
    let io_err = |e: io::Error| Error::io(format!("reading {}", path.display()), e);
    let mut input = BufReader::with_capacity(1 << 20, File::open(path).map_err(io_err)?);
    // Back up one byte and skip through the next newline: a line starting
    // exactly at range.start follows a newline at range.start - 1 and is
    // ours; a line that started earlier belongs to the previous range.
    let mut start = 0;
    if range.start > 0 {
        input.seek(SeekFrom::Start(range.start - 1)).map_err(io_err)?;
        start = range.start - 1 + input.skip_until(b'\n').map_err(io_err)? as u64;
    }
    if start >= range.end {
        return Ok(());
    }
    match parse_lines(&mut input, range.end - start, &mut Parser::new(mode), data) {
        Ok(()) => Ok(()),
        Err(LineError::Io(e)) => Err(io_err(e)),
        Err(LineError::Bad { line, detail }) => {
            // Only failures need absolute line numbers, so only they pay
            // for counting the lines before this range.
            let before = count_newlines(path, start).map_err(io_err)?;
            Err(bad_data(format!("{}:{}", path.display(), before + line), detail))
        }
    }
}

enum LineError {
    Io(io::Error),
    /// `line` counts from 1 at the first line read.
    Bad {
        line: u64,
        detail: String,
    },
}

/// Parses the lines of `input` that start within its first `limit` bytes.
fn parse_lines(mut input: impl BufRead, limit: u64, parser: &mut Parser, data: &mut Dataset) -> Result<(), LineError> {
    let mut line = Vec::with_capacity(4096);
    let (mut pos, mut number) = (0u64, 0u64);
    while pos < limit {
        line.clear();
        let n = input.read_until(b'\n', &mut line).map_err(LineError::Io)?;
        if n == 0 {
            break;
        }
        pos += n as u64;
        number += 1;
        parser.line(&line, data).map_err(|detail| LineError::Bad { line: number, detail })?;
    }
    Ok(())
}

fn count_newlines(path: &Path, end: u64) -> io::Result<u64> {
    let mut input = File::open(path)?.take(end);
    let mut buf = vec![0u8; 1 << 16];
    let mut count = 0;
    loop {
        match input.read(&mut buf) {
            Ok(0) => return Ok(count),
            Ok(n) => count += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Turns lines into rows; keeps scratch space between lines.
pub(crate) struct Parser {
    mode: FeatureMode,
    merged: Vec<(u64, f32)>,
}

impl Parser {
    pub(crate) fn new(mode: FeatureMode) -> Self {
        Parser { mode, merged: Vec::new() }
    }

    /// Appends the row on `line` (line end included or not) to `data`;
    /// blank and comment-only lines hold no row. On error `data` is unchanged.
    pub(crate) fn line(&mut self, line: &[u8], data: &mut Dataset) -> Result<(), String> {
        let line = match line.iter().position(|&b| b == b'#') {
            Some(i) => &line[..i],
            None => line,
        };
        let mut tokens = line.split(u8::is_ascii_whitespace).filter(|t| !t.is_empty());
        let Some(label) = tokens.next() else { return Ok(()) };
        let label = parse_label(label)?;
        let start = data.features.len();
        let mut result = push_features(tokens, data);
        if let (Ok(()), FeatureMode::Hashed { bits }) = (&result, self.mode) {
            result = self.hash_row(bits, start, data);
        }
        if result.is_err() {
            data.features.truncate(start);
            data.values.truncate(start);
        }
        result?;
        data.end_row(label);
        Ok(())
    }

    /// Replaces the row's ids (index - 1) by hash(index) mod 2^bits, sorted,
    /// summing the values of ids that collide.
    fn hash_row(&mut self, bits: u32, start: usize, data: &mut Dataset) -> Result<(), String> {
        let mask = u64::MAX >> (64 - bits);
        let row = data.features[start..].iter().zip(&data.values[start..]);
        self.merged.clear();
        self.merged.extend(row.map(|(&id, &v)| (mix64(id + 1) & mask, v)));
        self.merged.sort_unstable_by_key(|&(id, _)| id);
        data.features.truncate(start);
        data.values.truncate(start);
        for &(id, v) in &self.merged {
            let collides = data.features.len() > start && data.features.last() == Some(&id);
            match data.values.last_mut() {
                Some(sum) if collides => {
                    *sum += v;
                    if !sum.is_finite() {
                        return Err(format!("features hashed to id {id} collide and their values sum to {sum}"));
                    }
                }
                _ => {
                    data.features.push(id);
                    data.values.push(v);
                }
            }
        }
        Ok(())
    }
}

/// Appends `index:value` tokens as (index - 1, value), checking them.
fn push_features<'a>(tokens: impl Iterator<Item = &'a [u8]>, data: &mut Dataset) -> Result<(), String> {
    let mut prev = 0; // indices start at 1, so 0 means "none yet"
    for token in tokens {
        let Some(colon) = token.iter().position(|&b| b == b':') else {
            return Err(format!("feature {} is not index:value", show(token)));
        };
        let (index, value) = (&token[..colon], &token[colon + 1..]);
        let Some(index) = parse_index(index) else {
            return Err(format!("feature index {} is not an integer in 1..=18446744073709551615", show(index)));
        };
        if index == 0 {
            return Err("feature index 0 is not 1-based (LIBSVM indices start at 1)".into());
        }
        if index <= prev {
            return Err(format!("feature index {index} follows {prev}: indices must be strictly increasing"));
        }
        prev = index;
        let Some(value) = parse_value(value) else {
            return Err(format!("feature {index} has value {}, not a finite number", show(value)));
        };
        data.features.push(index - 1);
        data.values.push(value);
    }
    Ok(())
}

/// +1 for `+1`, `1`, `1.0`; -1 for `-1`, `-1.0`, `0`, `0.0`.
fn parse_label(token: &[u8]) -> Result<f32, String> {
    match token {
        b"+1" | b"1" => return Ok(1.0),
        b"-1" | b"0" => return Ok(-1.0),
        _ => {}
    }
    match std::str::from_utf8(token).ok().and_then(|s| s.parse::<f64>().ok()) {
        Some(1.0) => Ok(1.0),
        Some(-1.0 | 0.0) => Ok(-1.0),
        _ => Err(format!("label {} is not +1, -1, 1 or 0", show(token))),
    }
}

fn parse_index(token: &[u8]) -> Option<u64> {
    if token.is_empty() {
        return None;
    }
    token.iter().try_fold(0u64, |n, &b| match b {
        b'0'..=b'9' => n.checked_mul(10)?.checked_add(u64::from(b - b'0')),
        _ => None,
    })
}

fn parse_value(token: &[u8]) -> Option<f32> {
    if token == b"1" {
        return Some(1.0); // the common case in one-hot data
    }
    let v: f32 = std::str::from_utf8(token).ok()?.parse().ok()?;
    v.is_finite().then_some(v)
}

/// A token for an error message: quoted, escaped, cut if long.
fn show(token: &[u8]) -> String {
    const MAX: usize = 40;
    let s = String::from_utf8_lossy(&token[..token.len().min(MAX)]);
    if token.len() > MAX { format!("{s:?}...") } else { format!("{s:?}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_accept_the_usual_spellings_only() {
        for (text, label) in [("+1", 1.0), ("1", 1.0), ("1.0", 1.0), ("+1.0", 1.0), ("-1", -1.0), ("-1.0", -1.0)] {
            assert_eq!(parse_label(text.as_bytes()), Ok(label), "{text}");
        }
        for (text, label) in [("0", -1.0), ("0.0", -1.0), ("-0", -1.0)] {
            assert_eq!(parse_label(text.as_bytes()), Ok(label), "{text}");
        }
        for text in ["2", "0.5", "nan", "inf", "yes", "", "1:1", "\u{fffd}"] {
            assert!(parse_label(text.as_bytes()).is_err(), "{text}");
        }
    }

    #[test]
    fn indices_span_the_whole_u64_range() {
        assert_eq!(parse_index(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_index(b"18446744073709551616"), None);
        assert_eq!(parse_index(b"007"), Some(7));
        for bad in [&b""[..], b"-1", b"+1", b"1.0", b"1e3", b" 1"] {
            assert_eq!(parse_index(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn values_must_be_finite() {
        assert_eq!(parse_value(b"1"), Some(1.0));
        assert_eq!(parse_value(b"-0.25"), Some(-0.25));
        assert_eq!(parse_value(b"1e-3"), Some(1e-3));
        for bad in [&b""[..], b"nan", b"inf", b"1e39", b"x", b"1:2"] {
            assert_eq!(parse_value(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn long_tokens_are_cut_in_messages() {
        assert_eq!(show(b"ab\"c"), r#""ab\"c""#);
        let long = show(&[b'x'; 100]);
        assert!(long.ends_with("\"...") && long.len() < 50, "{long}");
    }

    #[test]
    fn a_failed_line_leaves_the_dataset_unchanged() {
        let mut data = Dataset::new();
        let mut p = Parser::new(FeatureMode::Direct);
        p.line(b"1 1:1 2:2\n", &mut data).unwrap();
        let before = data.clone();
        assert!(p.line(b"1 3:1 4:x\n", &mut data).is_err());
        assert_eq!(data, before);
    }

    #[test]
    fn hashed_collisions_sum_and_stay_sorted() {
        let mut data = Dataset::new();
        // One bit: every index hashes to 0 or 1, so five features collide.
        Parser::new(FeatureMode::Hashed { bits: 1 }).line(b"1 1:1 2:2 3:3 4:4 5:5", &mut data).unwrap();
        let row = data.row(0);
        assert!(row.features.len() <= 2 && row.features.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(row.values.iter().sum::<f32>(), 15.0);
    }
}
