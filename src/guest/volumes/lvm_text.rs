//! LVM2's metadata text format: nested sections `name { ... }`, assignments
//! `key = value` where a value is a number, a "string" or an [array], and
//! `#` comments. The parser is iterative over a token list with a nesting
//! cap, so hostile text cannot overflow the stack.

/// A value of the text format.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Int(i64),
    Str(String),
    List(Vec<Value>),
    Section(Section),
}

/// The items of a section, in order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Section(pub Vec<(String, Value)>);

impl Section {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn int(&self, key: &str) -> Option<i64> {
        match self.get(key)? {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn list(&self, key: &str) -> Option<&[Value]> {
        match self.get(key)? {
            Value::List(l) => Some(l),
            _ => None,
        }
    }

    pub fn section(&self, key: &str) -> Option<&Section> {
        match self.get(key)? {
            Value::Section(s) => Some(s),
            _ => None,
        }
    }

    /// The subsections, with their names.
    pub fn sections(&self) -> impl Iterator<Item = (&str, &Section)> {
        self.0.iter().filter_map(|(k, v)| match v {
            Value::Section(s) => Some((k.as_str(), s)),
            _ => None,
        })
    }
}

const MAX_DEPTH: usize = 32;

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Word(String),
    Str(String),
    Int(i64),
    Punct(char),
}

fn tokens(text: &str) -> Result<Vec<Token>, String> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b' ' | b'\t' | b'\r' | b'\n' | 0 => i += 1,
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'{' | b'}' | b'[' | b']' | b'=' | b',' => {
                out.push(Token::Punct(c as char));
                i += 1;
            }
            b'"' => {
                let mut s = Vec::new();
                i += 1;
                loop {
                    match b.get(i) {
                        None => return Err(format!("unterminated string at byte {i}")),
                        Some(b'"') => break,
                        Some(b'\\') if i + 1 < b.len() => {
                            s.push(b[i + 1]);
                            i += 2;
                        }
                        Some(&c) => {
                            s.push(c);
                            i += 1;
                        }
                    }
                }
                i += 1;
                out.push(Token::Str(String::from_utf8_lossy(&s).into_owned()));
            }
            _ => {
                let start = i;
                while i < b.len() && !b" \t\r\n{}[]=,\"#".contains(&b[i]) {
                    i += 1;
                }
                let word = &text[start..i];
                if word.is_empty() {
                    return Err(format!("unexpected byte at {start}"));
                }
                match word.parse::<i64>() {
                    Ok(n) => out.push(Token::Int(n)),
                    // Floats (LVM has none that matter here) stay words.
                    Err(_) => out.push(Token::Word(word.to_string())),
                }
            }
        }
    }
    Ok(out)
}

/// Parses a whole metadata text into its top-level section.
pub fn parse(text: &str) -> Result<Section, String> {
    let toks = tokens(text)?;
    let mut stack: Vec<(String, Section)> = vec![(String::new(), Section::default())];
    let mut i = 0;
    while i < toks.len() {
        match &toks[i] {
            Token::Punct('}') => {
                if stack.len() == 1 {
                    return Err(format!("unbalanced '}}' at token {i}"));
                }
                let (name, sec) = stack.pop().unwrap();
                stack
                    .last_mut()
                    .unwrap()
                    .1
                     .0
                    .push((name, Value::Section(sec)));
                i += 1;
            }
            Token::Word(key) | Token::Str(key) => match toks.get(i + 1) {
                Some(Token::Punct('{')) => {
                    if stack.len() > MAX_DEPTH {
                        return Err(format!("sections nested deeper than {MAX_DEPTH}"));
                    }
                    stack.push((key.clone(), Section::default()));
                    i += 2;
                }
                Some(Token::Punct('=')) => {
                    let (value, next) = value(&toks, i + 2)?;
                    stack.last_mut().unwrap().1 .0.push((key.clone(), value));
                    i = next;
                }
                _ => {
                    return Err(format!(
                        "expected '=' or '{{' after '{}'",
                        super::shown(key)
                    ))
                }
            },
            t => {
                return Err(format!(
                    "unexpected {} at token {i}",
                    super::shown(&format!("{t:?}"))
                ))
            }
        }
    }
    if stack.len() != 1 {
        return Err("unterminated section".into());
    }
    Ok(stack.pop().unwrap().1)
}

/// A value starting at token `i`; returns it and the next token index.
/// Arrays hold scalars only (LVM nests none).
fn value(toks: &[Token], i: usize) -> Result<(Value, usize), String> {
    match toks.get(i) {
        Some(Token::Int(n)) => Ok((Value::Int(*n), i + 1)),
        Some(Token::Str(s)) | Some(Token::Word(s)) => Ok((Value::Str(s.clone()), i + 1)),
        Some(Token::Punct('[')) => {
            let mut items = Vec::new();
            let mut j = i + 1;
            loop {
                match toks.get(j) {
                    Some(Token::Punct(']')) => return Ok((Value::List(items), j + 1)),
                    Some(Token::Punct(',')) => j += 1,
                    Some(Token::Int(n)) => {
                        items.push(Value::Int(*n));
                        j += 1;
                    }
                    Some(Token::Str(s)) | Some(Token::Word(s)) => {
                        items.push(Value::Str(s.clone()));
                        j += 1;
                    }
                    _ => return Err(format!("bad array item at token {j}")),
                }
            }
        }
        _ => Err(format!("missing value at token {i}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nested_sections_arrays_and_comments() {
        let text = r#"vg { # comment
            id = "abc"
            extent_size = 8192
            status = ["READ", "WRITE"]
            lv { segment1 { stripes = [ "pv0", 0 ] } }
        }
        contents = "Text Format Volume Group"
        description = "say \"hi\""
        "#;
        let top = parse(text).unwrap();
        let vg = top.section("vg").unwrap();
        assert_eq!(vg.str("id"), Some("abc"));
        assert_eq!(vg.int("extent_size"), Some(8192));
        assert_eq!(vg.list("status").unwrap().len(), 2);
        let seg = vg.section("lv").unwrap().section("segment1").unwrap();
        assert_eq!(seg.list("stripes").unwrap()[1], Value::Int(0));
        assert_eq!(top.str("description"), Some("say \"hi\""));
        assert!(parse("a { b = 1").is_err());
        assert!(parse("}").is_err());
        assert!(parse(&"a {".repeat(100)).is_err());
    }
}
