//! The text tokenizer: Hugging Face `tokenizers` loaded from `tokenizer.json` or rebuilt from GGUF
//! metadata, with the model's chat template and its special tokens.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::tokenizer::TokenizerFromGguf;
use retort_data::Message;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;

use crate::chat_template::ChatTemplate;
use crate::error::{Error, Result};
use crate::gguf::GgufFile;

/// A conversation as token ids with its assistant-only loss mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedChat {
    /// `(T)` token ids.
    pub ids: Vec<u32>,
    /// `(T)`: true where the token is part of an assistant answer (content and end-of-turn).
    pub loss_mask: Vec<bool>,
}

/// The tokens of one trained assistant turn, for aligning two tokenizations of it
/// ([`Tokenizer::encode_chat_turns`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TurnTokens {
    /// Positions (indices into the encoded ids) of the tokens inside the turn's content, in order.
    pub positions: Vec<usize>,
    /// Their byte ranges relative to the start of the message's content as written (before any
    /// trimming by the template), so both tokenizers' offsets share one coordinate system.
    pub offsets: Vec<(usize, usize)>,
    /// Positions of the turn's trained tokens after its content: the end-of-turn marker.
    pub end_positions: Vec<usize>,
}

/// Tokenizer, chat template and the ids generation stops on.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    template: Option<Arc<ChatTemplate>>,
    bos_token_id: Option<u32>,
    /// Prepend BOS when encoding (GGUF `tokenizer.ggml.add_bos_token`, HF `add_bos_token`).
    add_bos: bool,
    /// Ids that end a generation (EOS and the template's end-of-turn token).
    stop_ids: Vec<u32>,
    source: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("add_bos", &self.add_bos)
            .field("stop_ids", &self.stop_ids)
            .finish()
    }
}

fn tok_err(path: &Path, reason: impl std::fmt::Display, hint: &str) -> Error {
    Error::Tokenizer {
        path: path.to_path_buf(),
        reason: reason.to_string(),
        hint: hint.to_string(),
    }
}

impl Tokenizer {
    /// Assemble from parts; `stop_ids` gets the ids of `<|im_end|>`/`<|eot_id|>`/`<|endoftext|>`
    /// added when the vocabulary has them.
    pub fn new(
        inner: tokenizers::Tokenizer,
        template: Option<ChatTemplate>,
        bos_token_id: Option<u32>,
        add_bos: bool,
        mut stop_ids: Vec<u32>,
        source: &Path,
    ) -> Tokenizer {
        for s in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>"] {
            if let Some(id) = inner.token_to_id(s)
                && !stop_ids.contains(&id)
            {
                stop_ids.push(id);
            }
        }
        Tokenizer {
            inner,
            template: template.map(Arc::new),
            bos_token_id,
            add_bos,
            stop_ids,
            source: source.to_path_buf(),
        }
    }

    /// Rebuild the tokenizer stored in a GGUF file's metadata.
    ///
    /// candle's builder maps `tokenizer.ggml.pre = "smollm"` to GPT-2's pre-tokenizer with a prefix
    /// space, which yields ids like `Ġuser` after special tokens. SmolLM2's own `tokenizer.json` uses
    /// `Sequence[Digits(individual), ByteLevel(add_prefix_space = false)]`; we install that, after
    /// which ids match llama.cpp (see `tests/fixtures/smollm2_tokens.json`).
    pub fn from_gguf(gguf: &GgufFile) -> Result<Tokenizer> {
        let path = gguf.path();
        let mut inner = tokenizers::Tokenizer::from_gguf(gguf.content()).map_err(|e| {
            tok_err(
                path,
                format!("the GGUF tokenizer metadata cannot be used: {e}"),
                "pass a model directory with tokenizer.json instead",
            )
        })?;
        let meta_str = |k: &str| gguf.metadata(k).and_then(|v| v.to_string().ok()).cloned();
        let meta_u32 = |k: &str| gguf.metadata(k).and_then(|v| v.to_u32().ok());
        if meta_str("tokenizer.ggml.pre").as_deref() == Some("smollm") {
            let seq = Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
            ]);
            inner.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(seq)));
        }
        let bos = meta_u32("tokenizer.ggml.bos_token_id");
        let eos = meta_u32("tokenizer.ggml.eos_token_id");
        let add_bos = gguf
            .metadata("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        // candle's builder installs a post-processor that adds BOS when add_bos_token is set; we add
        // BOS ourselves so the chat-template path and the raw path behave the same.
        inner.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
        let id_str = |id: Option<u32>| id.and_then(|i| inner.id_to_token(i)).unwrap_or_default();
        let template = match gguf.chat_template() {
            Some(src) => Some(ChatTemplate::new(&src, &id_str(bos), &id_str(eos))?),
            None => None,
        };
        Ok(Tokenizer::new(
            inner,
            template,
            bos,
            add_bos,
            eos.into_iter().collect(),
            path,
        ))
    }

    /// Load `tokenizer.json` and `tokenizer_config.json` (chat template, BOS/EOS) from a model dir.
    pub fn from_hf_dir(dir: &Path, eos_from_config: &[u32]) -> Result<Tokenizer> {
        let tj = dir.join("tokenizer.json");
        if !tj.exists() {
            return Err(tok_err(
                dir,
                "`tokenizer.json` is missing",
                "copy the tokenizer files of the model into the directory (retort saves them with every checkpoint)",
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(&tj).map_err(|e| {
            tok_err(
                &tj,
                format!("cannot parse: {e}"),
                "the file is damaged; copy it again from the model's source",
            )
        })?;
        let tc_path = dir.join("tokenizer_config.json");
        let tc: serde_json::Value = if tc_path.exists() {
            serde_json::from_str(&fs_err::read_to_string(&tc_path)?).map_err(|e| {
                tok_err(
                    &tc_path,
                    format!("invalid JSON: {e}"),
                    "fix or remove the file",
                )
            })?
        } else {
            serde_json::Value::Null
        };
        let token_str = |v: &serde_json::Value| -> Option<String> {
            match v {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o
                    .get("content")
                    .and_then(|c| c.as_str())
                    .map(str::to_string),
                _ => None,
            }
        };
        let bos_str = token_str(&tc["bos_token"]);
        let eos_str = token_str(&tc["eos_token"]);
        let bos = bos_str.as_deref().and_then(|s| inner.token_to_id(s));
        let mut stop: Vec<u32> = eos_from_config.to_vec();
        if let Some(e) = eos_str.as_deref().and_then(|s| inner.token_to_id(s))
            && !stop.contains(&e)
        {
            stop.push(e);
        }
        let add_bos = tc["add_bos_token"].as_bool().unwrap_or(false);
        let template_src = match &tc["chat_template"] {
            serde_json::Value::String(s) => Some(s.clone()),
            // A list of named templates: take "default".
            serde_json::Value::Array(a) => a
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(str::to_string),
            _ => None,
        };
        let template_src = match template_src {
            Some(s) => Some(s),
            None => {
                let jinja = dir.join("chat_template.jinja");
                if jinja.exists() {
                    Some(fs_err::read_to_string(&jinja)?)
                } else {
                    None
                }
            }
        };
        let template = match template_src {
            Some(src) => Some(ChatTemplate::new(
                &src,
                bos_str.as_deref().unwrap_or(""),
                eos_str.as_deref().unwrap_or(""),
            )?),
            None => None,
        };
        Ok(Tokenizer::new(inner, template, bos, add_bos, stop, dir))
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// SHA-256 (hex) over every (token, id) pair of the vocabulary, added tokens included, in id
    /// order: two tokenizers with the same fingerprint map text to the same ids' meanings.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut pairs: Vec<(u32, String)> = self
            .inner
            .get_vocab(true)
            .into_iter()
            .map(|(t, i)| (i, t))
            .collect();
        pairs.sort();
        let mut h = Sha256::new();
        for (i, t) in pairs {
            h.update(i.to_le_bytes());
            h.update(t.as_bytes());
            h.update([0u8]);
        }
        hex::encode(h.finalize())
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    pub fn template(&self) -> Option<&ChatTemplate> {
        self.template.as_deref()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Text → encoding with offsets, special tokens in the text recognised, no BOS.
    fn encode_raw(&self, text: &str) -> Result<tokenizers::Encoding> {
        self.inner.encode(text, false).map_err(|e| {
            tok_err(
                &self.source,
                format!("cannot encode: {e}"),
                "this is a bug in retort or the tokenizer",
            )
        })
    }

    /// The BOS id to prepend, if the model asks for one.
    fn bos_prefix(&self) -> Option<u32> {
        self.bos_token_id.filter(|_| self.add_bos)
    }

    /// Plain text → ids, special tokens in the text recognised, BOS per the model's setting.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.encode_raw(text)?;
        Ok(self
            .bos_prefix()
            .into_iter()
            .chain(enc.get_ids().iter().copied())
            .collect())
    }

    /// Ids → text; `skip_special` drops special tokens such as `<|im_end|>`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| {
            tok_err(
                &self.source,
                format!("cannot decode: {e}"),
                "the ids are outside the vocabulary",
            )
        })
    }

    fn require_template(&self) -> Result<&ChatTemplate> {
        self.template().ok_or_else(|| {
            tok_err(
                &self.source,
                "the model has no chat template",
                "add `chat_template` to tokenizer_config.json, or use a model that ships one",
            )
        })
    }

    /// A conversation rendered up to the start of the next assistant answer, as ids.
    pub fn encode_prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let text = self.require_template()?.render(messages, true)?;
        self.encode(&text)
    }

    /// The prompt with the assistant's answer already begun with `prefill` (the model continues
    /// it): steers small models into a format far better than instructions do.
    pub fn encode_prompt_prefilled(&self, messages: &[Message], prefill: &str) -> Result<Vec<u32>> {
        let text = self.require_template()?.render(messages, true)?;
        self.encode(&format!("{text}{prefill}"))
    }

    /// A conversation as ids with the assistant-only loss mask: every token of an assistant
    /// answer and its end-of-turn marker carries loss; role headers, system and user turns don't.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<EncodedChat> {
        let (text, spans) = self.require_template()?.assistant_spans(messages)?;
        Ok(self.encode_spans(&text, &spans)?.0)
    }

    /// `text` as ids (BOS per the model) with the loss mask of `spans`, and the raw encoding.
    fn encode_spans(
        &self,
        text: &str,
        spans: &[std::ops::Range<usize>],
    ) -> Result<(EncodedChat, tokenizers::Encoding)> {
        let enc = self.encode_raw(text)?;
        let mut ids: Vec<u32> = self.bos_prefix().into_iter().collect();
        let mut loss_mask = vec![false; ids.len()];
        for (&id, &(start, _end)) in enc.get_ids().iter().zip(enc.get_offsets()) {
            ids.push(id);
            loss_mask.push(spans.iter().any(|s| s.contains(&start)));
        }
        Ok((EncodedChat { ids, loss_mask }, enc))
    }

    /// [`encode_chat`](Self::encode_chat), plus for every trained assistant turn the tokens of
    /// its content with byte offsets relative to the content, and its end-of-turn tokens. Fails
    /// when the template changes an answer's content other than by trimming whitespace: the
    /// content is what two tokenizations are aligned on.
    pub fn encode_chat_turns(
        &self,
        messages: &[Message],
    ) -> Result<(EncodedChat, Vec<TurnTokens>)> {
        let (text, spans) = self.require_template()?.assistant_spans(messages)?;
        let (chat, enc) = self.encode_spans(&text, &spans)?;
        let lead = usize::from(self.bos_prefix().is_some());
        let trained = messages.iter().enumerate().filter(|(_, m)| m.trains());
        let mut turns = Vec::with_capacity(spans.len());
        for ((i, m), span) in trained.zip(&spans) {
            let rendered = &text[span.clone()];
            // (bytes of the content as rendered, bytes trimmed off its start)
            let (len, shift) = if rendered.starts_with(m.content.as_str()) {
                (m.content.len(), 0)
            } else if rendered.starts_with(m.content.trim()) {
                let t = m.content.trim();
                (t.len(), m.content.len() - m.content.trim_start().len())
            } else {
                return Err(tok_err(
                    &self.source,
                    format!(
                        "the chat template rewrites the content of message {i} (an assistant turn),                          so its tokens cannot be aligned with another tokenizer's"
                    ),
                    "cross-tokenizer distillation needs a template that renders answers verbatim                      (ChatML, Llama 3 and Qwen2 templates do)",
                ));
            };
            let content = span.start..span.start + len;
            let mut turn = TurnTokens::default();
            // The loss tokens of the span (those starting in it): inside the content, or after
            // it (a token starting in the content and running past its end counts as after).
            for (j, &(s, e)) in enc.get_offsets().iter().enumerate() {
                let pos = lead + j;
                if content.contains(&s) && e <= content.end {
                    turn.positions.push(pos);
                    turn.offsets
                        .push((s - content.start + shift, e - content.start + shift));
                } else if span.contains(&s) {
                    turn.end_positions.push(pos);
                }
            }
            turns.push(turn);
        }
        Ok((chat, turns))
    }

    /// Write `tokenizer.json` and `tokenizer_config.json` (with the chat template) into `dir`.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        self.inner
            .save(dir.join("tokenizer.json"), false)
            .map_err(|e| {
                tok_err(
                    dir,
                    format!("cannot write tokenizer.json: {e}"),
                    "check the directory is writable",
                )
            })?;
        let name = |id: Option<u32>| id.and_then(|i| self.inner.id_to_token(i));
        let eos = self.stop_ids.first().copied();
        let cfg = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": name(self.bos_token_id),
            "eos_token": name(eos),
            "pad_token": name(eos),
            "unk_token": null,
            "add_bos_token": self.add_bos,
            "add_eos_token": false,
            "clean_up_tokenization_spaces": false,
            "model_max_length": 8192,
            "chat_template": self.template().map(|t| t.source()),
        });
        fs_err::write(
            dir.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&cfg).map_err(std::io::Error::from)?,
        )?;
        Ok(())
    }
}
