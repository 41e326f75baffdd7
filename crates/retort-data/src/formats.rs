//! The record shapes users bring, each mapped to a [`Conversation`]:
//!
//! - OpenAI `messages`: `{"messages": [{"role", "content", "weight"?}, …]}`;
//! - Alpaca: `{"instruction", "input"?, "output", "system"?}` → user = instruction (+ blank line +
//!   input when non-empty), assistant = output;
//! - ShareGPT: `{"conversations": [{"from": "human"|"gpt"|"system", "value"}, …], "system"?}`.

use serde_json::{Map, Value};

use crate::conversation::{Conversation, Message, Role};

/// A record's shape. `Parquet` files hold rows of any of the three shapes (columns as fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// OpenAI chat `messages`.
    Messages,
    /// `instruction` / `input` / `output`.
    Alpaca,
    /// `conversations` with `from` / `value`.
    Sharegpt,
}

impl Format {
    pub const ALL: [Format; 3] = [Format::Messages, Format::Alpaca, Format::Sharegpt];

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Messages => "messages",
            Format::Alpaca => "alpaca",
            Format::Sharegpt => "sharegpt",
        }
    }

    /// Guess from a record's keys; `None` when no shape matches.
    pub fn detect(record: &Value) -> Option<Format> {
        let obj = record.as_object()?;
        if obj.contains_key("messages") {
            Some(Format::Messages)
        } else if obj.contains_key("conversations") {
            Some(Format::Sharegpt)
        } else if obj.contains_key("instruction") && obj.contains_key("output") {
            Some(Format::Alpaca)
        } else {
            None
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Format::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| format!("unknown format `{s}`; expected messages, alpaca or sharegpt"))
    }
}

/// A field-level problem: (field path, problem, hint).
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub field: String,
    pub problem: String,
    pub hint: String,
}

fn ferr(
    field: impl Into<String>,
    problem: impl Into<String>,
    hint: impl Into<String>,
) -> FieldError {
    FieldError {
        field: field.into(),
        problem: problem.into(),
        hint: hint.into(),
    }
}

/// Parse one record of the given shape, validating it for training: every turn has non-empty
/// text, roles are known, and at least one assistant turn carries loss.
pub fn parse(format: Format, record: &Value) -> Result<Conversation, FieldError> {
    let obj = record.as_object().ok_or_else(|| {
        ferr(
            "",
            format!("expected a JSON object, found {}", kind(record)),
            "write one object per record",
        )
    })?;
    let conv = match format {
        Format::Messages => parse_messages(obj)?,
        Format::Alpaca => parse_alpaca(obj)?,
        Format::Sharegpt => parse_sharegpt(obj)?,
    };
    if !conv.messages.iter().any(Message::trains) {
        let field = match format {
            Format::Messages => "messages",
            Format::Alpaca => "output",
            Format::Sharegpt => "conversations",
        };
        return Err(ferr(
            field,
            "no assistant turn carries a loss",
            "add an assistant answer (role `assistant`, ShareGPT `gpt`), or drop the record",
        ));
    }
    Ok(conv)
}

/// The record's `id` field when it has one (string or number).
pub fn record_id(record: &Value) -> Option<String> {
    match record.get("id")? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn text(
    obj: &Map<String, Value>,
    key: &str,
    field: &str,
    required: bool,
) -> Result<Option<String>, FieldError> {
    match obj.get(key) {
        None | Some(Value::Null) if !required => Ok(None),
        None | Some(Value::Null) => Err(ferr(field, "is missing", format!("add a `{key}` string"))),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(ferr(
            field,
            format!("must be a string, found {}", kind(v)),
            format!("write `{key}` as a JSON string"),
        )),
    }
}

fn non_empty(s: String, field: &str) -> Result<String, FieldError> {
    if s.trim().is_empty() {
        Err(ferr(
            field,
            "is empty",
            "give the turn some text, or drop the record",
        ))
    } else {
        Ok(s)
    }
}

fn system_field(obj: &Map<String, Value>) -> Result<Option<Message>, FieldError> {
    Ok(match text(obj, "system", "system", false)? {
        Some(s) if !s.trim().is_empty() => Some(Message::system(s)),
        _ => None,
    })
}

fn parse_messages(obj: &Map<String, Value>) -> Result<Conversation, FieldError> {
    let arr = match obj.get("messages") {
        Some(Value::Array(a)) => a,
        Some(v) => {
            return Err(ferr(
                "messages",
                format!("must be an array, found {}", kind(v)),
                "write `messages` as a list of {\"role\", \"content\"} objects",
            ));
        }
        None => return Err(ferr("messages", "is missing", "add a `messages` list")),
    };
    let mut messages = Vec::with_capacity(arr.len());
    for (i, m) in arr.iter().enumerate() {
        let at = |f: &str| format!("messages[{i}].{f}");
        let mo = m.as_object().ok_or_else(|| {
            ferr(
                format!("messages[{i}]"),
                format!("expected an object, found {}", kind(m)),
                "each message is {\"role\": …, \"content\": …}",
            )
        })?;
        let role_s = text(mo, "role", &at("role"), true)?.unwrap_or_default();
        let role = match role_s.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(ferr(
                    at("role"),
                    format!("unknown role `{other}`"),
                    "use system, user or assistant",
                ));
            }
        };
        let content = non_empty(
            text(mo, "content", &at("content"), true)?.unwrap_or_default(),
            &at("content"),
        )?;
        let weight = match mo.get("weight") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) if n.as_f64() == Some(0.0) || n.as_f64() == Some(1.0) => {
                if role != Role::Assistant {
                    return Err(ferr(
                        at("weight"),
                        "is set on a non-assistant turn",
                        "only assistant turns carry a loss; remove `weight` here",
                    ));
                }
                n.as_f64().map(|w| w as f32)
            }
            Some(v) => {
                return Err(ferr(
                    at("weight"),
                    format!("must be 0 or 1, found {v}"),
                    "use 0 to keep an assistant turn as context without loss, 1 (or nothing) to train on it",
                ));
            }
        };
        messages.push(Message {
            role,
            content,
            weight,
        });
    }
    Ok(Conversation::new(messages))
}

fn parse_alpaca(obj: &Map<String, Value>) -> Result<Conversation, FieldError> {
    let instruction = non_empty(
        text(obj, "instruction", "instruction", true)?.unwrap_or_default(),
        "instruction",
    )?;
    let input = text(obj, "input", "input", false)?.unwrap_or_default();
    let output = non_empty(
        text(obj, "output", "output", true)?.unwrap_or_default(),
        "output",
    )?;
    let user = if input.trim().is_empty() {
        instruction
    } else {
        format!("{instruction}\n\n{input}")
    };
    let mut messages: Vec<Message> = system_field(obj)?.into_iter().collect();
    messages.push(Message::user(user));
    messages.push(Message::assistant(output));
    Ok(Conversation::new(messages))
}

fn parse_sharegpt(obj: &Map<String, Value>) -> Result<Conversation, FieldError> {
    let arr = match obj.get("conversations") {
        Some(Value::Array(a)) => a,
        Some(v) => {
            return Err(ferr(
                "conversations",
                format!("must be an array, found {}", kind(v)),
                "write `conversations` as a list of {\"from\", \"value\"} objects",
            ));
        }
        None => {
            return Err(ferr(
                "conversations",
                "is missing",
                "add a `conversations` list",
            ));
        }
    };
    let mut messages: Vec<Message> = system_field(obj)?.into_iter().collect();
    for (i, m) in arr.iter().enumerate() {
        let at = |f: &str| format!("conversations[{i}].{f}");
        let mo = m.as_object().ok_or_else(|| {
            ferr(
                format!("conversations[{i}]"),
                format!("expected an object, found {}", kind(m)),
                "each turn is {\"from\": …, \"value\": …}",
            )
        })?;
        let from = text(mo, "from", &at("from"), true)?.unwrap_or_default();
        let role = match from.as_str() {
            "system" => Role::System,
            "human" | "user" => Role::User,
            "gpt" | "assistant" | "chatgpt" | "bard" => Role::Assistant,
            other => {
                return Err(ferr(
                    at("from"),
                    format!("unknown speaker `{other}`"),
                    "use human, gpt or system",
                ));
            }
        };
        let value = non_empty(
            text(mo, "value", &at("value"), true)?.unwrap_or_default(),
            &at("value"),
        )?;
        messages.push(Message::new(role, value));
    }
    Ok(Conversation::new(messages))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn detects_each_shape() {
        assert_eq!(
            Format::detect(&json!({"messages": []})),
            Some(Format::Messages)
        );
        assert_eq!(
            Format::detect(&json!({"conversations": []})),
            Some(Format::Sharegpt)
        );
        assert_eq!(
            Format::detect(&json!({"instruction": "a", "output": "b"})),
            Some(Format::Alpaca)
        );
        assert_eq!(Format::detect(&json!({"text": "x"})), None);
    }

    #[test]
    fn alpaca_joins_instruction_and_input() {
        let c = parse(
            Format::Alpaca,
            &json!({"instruction": "Translate.", "input": "Hallo", "output": "Hello", "system": "Be brief."}),
        )
        .unwrap();
        assert_eq!(c.messages.len(), 3);
        assert_eq!(c.messages[0], Message::system("Be brief."));
        assert_eq!(c.messages[1].content, "Translate.\n\nHallo");
        assert_eq!(c.messages[2], Message::assistant("Hello"));
        let c = parse(
            Format::Alpaca,
            &json!({"instruction": "Hi", "input": "", "output": "Yo"}),
        )
        .unwrap();
        assert_eq!(c.messages[0], Message::user("Hi"));
    }

    #[test]
    fn sharegpt_maps_speakers() {
        let c = parse(
            Format::Sharegpt,
            &json!({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}),
        )
        .unwrap();
        let roles: Vec<Role> = c.messages.iter().map(|m| m.role).collect();
        assert_eq!(roles, [Role::System, Role::User, Role::Assistant]);
    }

    #[test]
    fn weight_zero_turns_do_not_train() {
        let r = json!({"messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a", "weight": 0},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "b", "weight": 1}]});
        let c = parse(Format::Messages, &r).unwrap();
        assert!(!c.messages[1].trains());
        assert!(c.messages[3].trains());
        let only_zero = json!({"messages": [
            {"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]});
        let e = parse(Format::Messages, &only_zero).unwrap_err();
        assert_eq!(e.field, "messages");
        assert!(e.problem.contains("no assistant turn"), "{e:?}");
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            (
                json!({"messages": [{"role": "robot", "content": "x"}]}),
                "messages[0].role",
                "unknown role `robot`",
            ),
            (
                json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}),
                "messages[1].content",
                "is empty",
            ),
            (
                json!({"messages": [{"role": "user"}]}),
                "messages[0].content",
                "is missing",
            ),
            (
                json!({"messages": [{"role": "user", "content": "q"}]}),
                "messages",
                "no assistant turn",
            ),
            (json!({"messages": "hi"}), "messages", "must be an array"),
            (
                json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}]}),
                "messages[1].weight",
                "must be 0 or 1",
            ),
            (
                json!({"instruction": "i", "output": 3}),
                "output",
                "must be a string",
            ),
            (
                json!({"conversations": [{"from": "bot", "value": "x"}]}),
                "conversations[0].from",
                "unknown speaker",
            ),
        ];
        for (rec, field, problem) in cases {
            let f = Format::detect(&rec).unwrap();
            let e = parse(f, &rec).unwrap_err();
            assert_eq!(e.field, field, "{rec}");
            assert!(e.problem.contains(problem), "{rec}: {e:?}");
            assert!(!e.hint.is_empty());
        }
        let e = parse(Format::Messages, &json!([1])).unwrap_err();
        assert!(e.problem.contains("expected a JSON object"));
    }
}
