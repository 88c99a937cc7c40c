//! The JSON side of the wire: a streaming splitter that cuts a byte stream
//! into JSON values the way QEMU's JSON streamer does, and the encoder that
//! writes QEMU-shaped output (ASCII only, `", "` and `": "` separators, CRLF).

use serde_json::Value;

/// QEMU's limit on the size of one JSON message (`MAX_TOKEN_SIZE`, 64 MiB).
pub const MAX_MESSAGE_SIZE: usize = 64 << 20;
/// QEMU's limit on nesting of objects and arrays (`MAX_NESTING`, 1024).
pub const MAX_NESTING: usize = 1024;

/// One item cut from the input: a JSON value, or the text of a parse error
/// (already worded for the client, e.g. `"JSON parse error, ..."`).
pub type Piece = Result<Value, String>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between values: whitespace is skipped.
    Start,
    /// After a lexical error: input is dropped up to a resynchronisation point.
    Recovery,
    /// Inside an object/array (depth > 0) or a top-level string.
    Value,
    /// A top-level number or keyword, ended by any delimiter.
    Scalar,
}

/// Cuts a byte stream into JSON values.
///
/// Accepts what QEMU's parser accepts at the framing level: values
/// back-to-back or separated by whitespace, split across any number of
/// reads, and single-quoted strings (QEMU's extension; they are rewritten to
/// standard JSON before parsing, as is the `\'` escape). A partial value
/// waits for more bytes. An ASCII control character other than tab, CR and
/// LF, or a 0xFE/0xFF byte, is a lexical error: the partial value is
/// dropped, one error is reported and input is skipped up to the next
/// newline, control character, `{` or `[` — the reset QMP's spec tells
/// clients to use. A value over [`MAX_MESSAGE_SIZE`] bytes or nested deeper
/// than [`MAX_NESTING`] is reported once and the rest of it is skipped
/// without being buffered.
#[derive(Debug)]
pub struct Splitter {
    buf: Vec<u8>,
    state: State,
    depth: usize,
    quote: Option<u8>,
    escape: bool,
    discard: bool,
    max_size: usize,
    max_depth: usize,
}

impl Default for Splitter {
    fn default() -> Self {
        Self::new()
    }
}

fn is_lexical_error(b: u8) -> bool {
    (b < 0x20 && b != b'\t' && b != b'\r' && b != b'\n') || b >= 0xFE
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn show_byte(b: u8) -> String {
    if (0x20..0x7F).contains(&b) {
        (b as char).to_string()
    } else {
        format!("\\x{b:02X}")
    }
}

impl Splitter {
    /// A splitter with QEMU's limits.
    pub fn new() -> Self {
        Self::with_limits(MAX_MESSAGE_SIZE, MAX_NESTING)
    }

    /// A splitter with other limits (tests use small ones).
    pub fn with_limits(max_size: usize, max_depth: usize) -> Self {
        Splitter {
            buf: Vec::new(),
            state: State::Start,
            depth: 0,
            quote: None,
            escape: false,
            discard: false,
            max_size,
            max_depth,
        }
    }

    /// Bytes of a partial value currently held.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// True if no partial value is pending.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Start | State::Recovery)
    }

    fn reset(&mut self) {
        self.buf = Vec::new();
        self.depth = 0;
        self.quote = None;
        self.escape = false;
        self.discard = false;
    }

    fn lexical_error(&mut self, b: u8, out: &mut Vec<Piece>) {
        out.push(Err(format!("JSON parse error, stray '{}'", show_byte(b))));
        self.reset();
        self.state = State::Recovery;
    }

    fn push(&mut self, bytes: &[u8], out: &mut Vec<Piece>) {
        if self.discard {
            return;
        }
        if self.buf.len() + bytes.len() > self.max_size {
            out.push(Err("JSON token size limit exceeded".to_string()));
            self.buf = Vec::new();
            self.discard = true;
            return;
        }
        self.buf.extend_from_slice(bytes);
    }

    fn finish(&mut self, out: &mut Vec<Piece>) {
        if !self.discard {
            out.push(parse(&self.buf));
        }
        self.reset();
        self.state = State::Start;
    }

    /// Feeds bytes; complete values and errors are appended to `out`, in order.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<Piece>) {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Recovery => {
                    if b == b'{' || b == b'[' {
                        self.state = State::Start;
                        continue; // reprocess
                    }
                    if b == b'\n' || is_lexical_error(b) {
                        self.state = State::Start;
                    }
                }
                State::Start => {
                    if is_ws(b) {
                    } else if is_lexical_error(b) {
                        self.lexical_error(b, out);
                    } else if b == b'{' || b == b'[' {
                        self.state = State::Value;
                        self.depth = 1;
                        self.push(&[b], out);
                    } else if b == b'}' || b == b']' || b == b',' || b == b':' {
                        out.push(Err(format!(
                            "JSON parse error, expecting value (stray '{}')",
                            b as char
                        )));
                    } else if b == b'"' || b == b'\'' {
                        self.state = State::Value;
                        self.depth = 0;
                        self.quote = Some(b);
                        self.push(b"\"", out);
                    } else {
                        self.state = State::Scalar;
                        self.push(&[b], out);
                    }
                }
                State::Scalar => {
                    if is_ws(b)
                        || is_lexical_error(b)
                        || matches!(b, b'{' | b'[' | b'}' | b']' | b',' | b':' | b'"' | b'\'')
                    {
                        self.finish(out);
                        continue; // the delimiter starts the next value
                    }
                    self.push(&[b], out);
                }
                State::Value => {
                    if let Some(q) = self.quote {
                        if self.escape {
                            self.escape = false;
                            if b == b'\'' {
                                self.push(b"'", out);
                            } else if is_lexical_error(b) {
                                self.lexical_error(b, out);
                            } else {
                                self.push(&[b'\\', b], out);
                            }
                        } else if b == b'\\' {
                            self.escape = true;
                        } else if b == q {
                            self.quote = None;
                            self.push(b"\"", out);
                            if self.depth == 0 {
                                self.finish(out);
                            }
                        } else if b == b'"' {
                            // only reachable inside a single-quoted string
                            self.push(b"\\\"", out);
                        } else if !(0x20..0xFE).contains(&b) {
                            self.lexical_error(b, out);
                        } else {
                            self.push(&[b], out);
                        }
                    } else if b == b'"' || b == b'\'' {
                        self.quote = Some(b);
                        self.push(b"\"", out);
                    } else if b == b'{' || b == b'[' {
                        self.depth += 1;
                        if self.depth > self.max_depth && !self.discard {
                            out.push(Err("JSON nesting depth limit exceeded".to_string()));
                            self.buf = Vec::new();
                            self.discard = true;
                        }
                        self.push(&[b], out);
                    } else if b == b'}' || b == b']' {
                        self.depth -= 1;
                        self.push(&[b], out);
                        if self.depth == 0 {
                            self.finish(out);
                        }
                    } else if is_lexical_error(b) {
                        self.lexical_error(b, out);
                    } else {
                        self.push(&[b], out);
                    }
                }
            }
            i += 1;
        }
    }
}

/// Parses one complete value; the error text is what the client is told.
pub fn parse(bytes: &[u8]) -> Piece {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    // Nesting is bounded by the splitter (MAX_NESTING), not by serde_json.
    de.disable_recursion_limit();
    let v = serde::Deserialize::deserialize(&mut de)
        .and_then(|v: Value| de.end().map(|()| v))
        .map_err(|e| format!("JSON parse error, {e}"))?;
    Ok(v)
}

/// Parses text that may use QEMU's single-quoted strings (as QAPI schema
/// files do). Returns every value found in it.
pub fn parse_all_lenient(text: &str) -> Result<Vec<Value>, String> {
    let mut sp = Splitter::new();
    let mut out = Vec::new();
    sp.feed(text.as_bytes(), &mut out);
    sp.feed(b"\n", &mut out);
    if !sp.is_idle() {
        return Err("unterminated JSON value".to_string());
    }
    out.into_iter().collect()
}

struct QemuFormatter;

impl serde_json::ser::Formatter for QemuFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        // QMP output is ASCII: anything else as \uXXXX (surrogate pairs
        // above the BMP), as QEMU does.
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            if c.is_ascii() {
                continue;
            }
            writer.write_all(&fragment.as_bytes()[start..i])?;
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                write!(writer, "\\u{u:04x}")?;
            }
            start = i + c.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }
}

/// Encodes a message as QEMU sends it: one line of ASCII JSON ending in CRLF.
pub fn to_wire(v: &Value) -> String {
    let mut out = Vec::with_capacity(128);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, QemuFormatter);
    // Serialising a Value into a Vec cannot fail (keys are strings).
    if serde::Serialize::serialize(v, &mut ser).is_err() {
        out.clear();
        out.extend_from_slice(b"{}");
    }
    out.extend_from_slice(b"\r\n");
    // The formatter only ever writes ASCII.
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn split(input: &[u8]) -> Vec<Piece> {
        let mut s = Splitter::new();
        let mut out = Vec::new();
        s.feed(input, &mut out);
        out
    }

    #[test]
    fn back_to_back_and_newlines() {
        let out = split(b"{\"a\":1}{\"b\":[2,3]}\n  {\"c\":\"}{\"}\r\n");
        assert_eq!(
            out,
            vec![
                Ok(json!({"a": 1})),
                Ok(json!({"b": [2, 3]})),
                Ok(json!({"c": "}{"}))
            ]
        );
    }

    #[test]
    fn byte_at_a_time() {
        let input = br#"{"execute": "x", "arguments": {"s": "a\"b\\", "l": [[], {}]}} [1]"#;
        let mut s = Splitter::new();
        let mut out = Vec::new();
        for b in input.iter() {
            s.feed(std::slice::from_ref(b), &mut out);
        }
        assert_eq!(
            out,
            vec![
                Ok(json!({"execute": "x", "arguments": {"s": "a\"b\\", "l": [[], {}]}})),
                Ok(json!([1]))
            ]
        );
        assert!(s.is_idle());
    }

    #[test]
    fn partial_waits() {
        let mut s = Splitter::new();
        let mut out = Vec::new();
        s.feed(b"{\"execute\": \"qu", &mut out);
        assert!(out.is_empty());
        assert!(!s.is_idle());
        s.feed(b"it\"}", &mut out);
        assert_eq!(out, vec![Ok(json!({"execute": "quit"}))]);
    }

    #[test]
    fn single_quotes() {
        let out = split(br#"{'execute': 'a"b', "x": 'it\'s', "y": "q\'"}"#);
        assert_eq!(
            out,
            vec![Ok(json!({"execute": "a\"b", "x": "it's", "y": "q'"}))]
        );
    }

    #[test]
    fn scalars_at_top_level() {
        let out = split(b"42 true \"s\" null\n");
        assert_eq!(
            out,
            vec![
                Ok(json!(42)),
                Ok(json!(true)),
                Ok(json!("s")),
                Ok(json!(null))
            ]
        );
    }

    #[test]
    fn bad_json_is_an_error_then_stream_continues() {
        let out = split(b"{\"execute\": }{\"a\": 1}");
        assert_eq!(out.len(), 2);
        let e = out[0].as_ref().unwrap_err();
        assert!(e.starts_with("JSON parse error, "), "{e}");
        assert_eq!(out[1], Ok(json!({"a": 1})));
    }

    #[test]
    fn stray_close_is_an_error() {
        let out = split(b"}{\"a\": 1}");
        assert_eq!(out.len(), 2);
        assert!(out[0]
            .as_ref()
            .unwrap_err()
            .starts_with("JSON parse error, "));
        assert_eq!(out[1], Ok(json!({"a": 1})));
    }

    #[test]
    fn control_char_resets_partial_object() {
        let out = split(b"{\"execute\": \"a\x01 junk junk\n{\"b\": 2}");
        assert_eq!(
            out,
            vec![
                Err("JSON parse error, stray '\\x01'".to_string()),
                Ok(json!({"b": 2}))
            ]
        );
        let out = split(b"{\"a\": [1, \xff garbage {\"b\": 2}");
        assert_eq!(
            out,
            vec![
                Err("JSON parse error, stray '\\xFF'".to_string()),
                Ok(json!({"b": 2}))
            ]
        );
    }

    #[test]
    fn size_limit() {
        let mut s = Splitter::with_limits(16, 8);
        let mut out = Vec::new();
        s.feed(b"{\"a\": \"0123456789abcdef\"}", &mut out);
        s.feed(b"{\"b\": 1}", &mut out);
        assert_eq!(
            out,
            vec![
                Err("JSON token size limit exceeded".to_string()),
                Ok(json!({"b": 1}))
            ]
        );
        assert_eq!(s.buffered(), 0);
    }

    #[test]
    fn oversized_value_is_not_buffered() {
        let mut s = Splitter::with_limits(1024, 8);
        let mut out = Vec::new();
        s.feed(b"{\"a\": \"", &mut out);
        let chunk = vec![b'x'; 4096];
        for _ in 0..256 {
            s.feed(&chunk, &mut out);
            assert!(s.buffered() <= 1024);
        }
        s.feed(b"\"}{\"b\": 1}", &mut out);
        assert_eq!(
            out,
            vec![
                Err("JSON token size limit exceeded".to_string()),
                Ok(json!({"b": 1}))
            ]
        );
    }

    #[test]
    fn nesting_limit() {
        let mut s = Splitter::with_limits(1 << 20, 4);
        let mut out = Vec::new();
        s.feed(b"[[[[1]]]] [[[[[1]]]]] {\"b\": 1}", &mut out);
        assert_eq!(
            out,
            vec![
                Ok(json!([[[[1]]]])),
                Err("JSON nesting depth limit exceeded".to_string()),
                Ok(json!({"b": 1}))
            ]
        );
    }

    #[test]
    fn qemu_nesting_1024_accepted() {
        // Deep recursion in serde: run on a thread with a known stack.
        std::thread::Builder::new()
            .stack_size(16 << 20)
            .spawn(|| {
                let deep = format!("{}{}", "[".repeat(1024), "]".repeat(1024));
                let out = split(deep.as_bytes());
                assert_eq!(out.len(), 1);
                assert!(out[0].is_ok());
                let deeper = format!("{}{}", "[".repeat(1025), "]".repeat(1025));
                let out = split(deeper.as_bytes());
                assert_eq!(
                    out,
                    vec![Err("JSON nesting depth limit exceeded".to_string())]
                );
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn invalid_utf8_is_a_parse_error() {
        let out = split(b"{\"a\": \"\xc3\x28\"}");
        assert_eq!(out.len(), 1);
        assert!(out[0]
            .as_ref()
            .unwrap_err()
            .starts_with("JSON parse error, "));
    }

    #[test]
    fn wire_format_is_qemu_like() {
        let v = json!({"return": {"a": [1, 2], "b": "é😀"}, "id": 1});
        assert_eq!(
            to_wire(&v),
            "{\"id\": 1, \"return\": {\"a\": [1, 2], \"b\": \"\\u00e9\\ud83d\\ude00\"}}\r\n"
        );
        let back: Value = serde_json::from_str(to_wire(&v).trim_end()).unwrap();
        assert_eq!(back, v);
    }
}
