//! Conversations and messages, in the OpenAI `messages` shape.

use serde::{Deserialize, Serialize};

/// Who speaks a message. Serialised lower-case, as in the OpenAI chat format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The role's name as chat templates expect it (`system`, `user`, `assistant`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// OpenAI fine-tuning's per-turn `weight`: `Some(0.0)` keeps an assistant turn as context
    /// but takes no loss on it; absent or `1` trains on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f32>,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            weight: None,
        }
    }

    /// Whether this turn carries a training loss: an assistant turn whose weight is not 0.
    pub fn trains(&self) -> bool {
        self.role == Role::Assistant && self.weight != Some(0.0)
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }
}

/// An ordered list of messages.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub messages: Vec<Message>,
}

impl Conversation {
    pub fn new(messages: Vec<Message>) -> Self {
        Self { messages }
    }

    /// A single user turn, optionally under a system prompt: the shape of a generation prompt.
    pub fn prompt(system: Option<&str>, user: &str) -> Self {
        let mut messages = Vec::with_capacity(2);
        if let Some(s) = system {
            messages.push(Message::system(s));
        }
        messages.push(Message::user(user));
        Self { messages }
    }

    /// Number of assistant turns, i.e. of spans that carry a training loss.
    pub fn assistant_turns(&self) -> usize {
        self.messages
            .iter()
            .filter(|m| m.role == Role::Assistant)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_serialise_lowercase_like_openai() {
        let m = Message::assistant("hi");
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(s, r#"{"role":"assistant","content":"hi"}"#);
        let back: Message = serde_json::from_str(&s).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn unknown_role_is_rejected() {
        let e = serde_json::from_str::<Message>(r#"{"role":"robot","content":"x"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown variant `robot`"), "{e}");
    }

    #[test]
    fn prompt_has_optional_system() {
        assert_eq!(Conversation::prompt(None, "q").messages.len(), 1);
        let c = Conversation::prompt(Some("s"), "q");
        assert_eq!(c.messages[0].role, Role::System);
        assert_eq!(c.assistant_turns(), 0);
    }
}
