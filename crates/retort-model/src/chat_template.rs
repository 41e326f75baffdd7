//! Chat templates: the model's own Jinja template (from `tokenizer_config.json` or GGUF
//! `tokenizer.chat_template`), rendered with minijinja in Python-compatible mode, and the
//! assistant-only loss mask derived from it.

use minijinja::{Environment, ErrorKind, context};
use retort_data::Message;

use crate::error::{Error, Result};

/// A compiled chat template plus the special-token strings templates refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish()
    }
}

fn raise_exception(msg: String) -> std::result::Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// Compile `source`. Uses Hugging Face's settings: `trim_blocks`, `lstrip_blocks`, Python
    /// string methods, and `raise_exception`.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| Error::Template {
                reason: e.to_string(),
                hint: "this is a bug in retort".into(),
            })?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::Template {
                reason: format!("cannot parse: {e}"),
                hint: "fix `chat_template` in tokenizer_config.json (or pass --chat-template)"
                    .into(),
            })?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Render `messages`; with `add_generation_prompt` the text ends where the assistant's answer
    /// begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template("chat").map_err(|e| Error::Template {
            reason: e.to_string(),
            hint: "this is a bug in retort".into(),
        })?;
        tmpl.render(context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        })
        .map_err(|e| Error::Template {
            reason: format!("cannot render: {e:#}"),
            hint: "check the conversation's roles and order against the model's template".into(),
        })
    }

    /// Byte spans of `render(messages, false)` that belong to assistant turns: each answer's
    /// content through its end-of-turn marker, without the role header and without trailing
    /// whitespace after the marker. Returns the rendered text and the spans.
    ///
    /// Method: for assistant turn `i`, the header ends where `render(messages[..i], true)` ends
    /// and the turn ends where `render(messages[..=i], false)` ends. The template must render
    /// prefixes of a conversation as prefixes of its full rendering; otherwise this is an error.
    pub fn assistant_spans(
        &self,
        messages: &[Message],
    ) -> Result<(String, Vec<std::ops::Range<usize>>)> {
        let full = self.render(messages, false)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if !m.trains() {
                continue;
            }
            let head = self.render(&messages[..i], true)?;
            let upto = self.render(&messages[..=i], false)?;
            if !upto.starts_with(&head) || !full.starts_with(&upto) {
                return Err(Error::Template {
                    reason: format!(
                        "rendering turn {i} does not extend the rendering of the turns before it, \
                         so the assistant's tokens cannot be located"
                    ),
                    hint: "use a template that renders conversations incrementally (ChatML, Llama 3 and Qwen2 templates do)".into(),
                });
            }
            let end = head.len() + upto[head.len()..].trim_end().len();
            spans.push(head.len()..end);
        }
        Ok((full, spans))
    }
}

/// ChatML, as SmolLM2 ships it (including its default system prompt); used when a model has no
/// template of its own.
pub const CHATML_SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[cfg(test)]
mod tests {
    use super::*;

    fn chatml() -> ChatTemplate {
        ChatTemplate::new(CHATML_SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap()
    }

    #[test]
    fn smollm2_default_system_prompt_is_inserted() {
        let t = chatml();
        let s = t.render(&[Message::user("Hi")], true).unwrap();
        assert_eq!(
            s,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn spans_cover_content_and_end_of_turn_only() {
        let t = chatml();
        let msgs = [
            Message::system("S"),
            Message::user("Q1"),
            Message::assistant("A1"),
            Message::user("Q2"),
            Message::assistant("A2 two"),
        ];
        let (full, spans) = t.assistant_spans(&msgs).unwrap();
        let got: Vec<&str> = spans.iter().map(|r| &full[r.clone()]).collect();
        assert_eq!(got, vec!["A1<|im_end|>", "A2 two<|im_end|>"]);
    }

    #[test]
    fn python_string_methods_work() {
        let t = ChatTemplate::new("{{ messages[0]['content'].strip().upper() }}", "", "").unwrap();
        assert_eq!(t.render(&[Message::user("  hi ")], false).unwrap(), "HI");
    }

    #[test]
    fn raise_exception_becomes_an_error_with_the_message() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "").unwrap();
        let e = t
            .render(&[Message::user("x")], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("roles must alternate"), "{e}");
    }

    #[test]
    fn bad_template_is_a_parse_error_with_hint() {
        let e = ChatTemplate::new("{% for %}", "", "")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot parse") && e.contains("hint:"), "{e}");
    }
}
