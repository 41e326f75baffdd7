//! Cross-tokenizer alignment on two real tokenizers of different families: SmolLM2-135M-Instruct
//! (llama, 49,152 tokens, ChatML with its own default system prompt) and Qwen2.5-Coder-0.5B-Instruct
//! (qwen2, 151,936 tokens, Qwen's template), each with its own chat template, on answers with
//! multi-byte characters, digits, code, emoji and whitespace the templates trim.
//!
//! The files come from `scripts/fetch-assets` and `scripts/fetch-assets qwen-student` (CI runs
//! both). Without them these tests print a note and pass, unless `RETORT_REQUIRE_ASSETS=1` /
//! `RETORT_REQUIRE_QWEN` is set (as `.ci/run` does).

#![allow(clippy::unwrap_used, clippy::print_stderr)] // test code: a panic is a failed test

use std::path::PathBuf;

use retort_data::Message;
use retort_distill::xtok::align_chat;
use retort_model::Tokenizer;
use retort_model::gguf::GgufFile;

fn asset(name: &str, required: bool) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../assets")
        .join(name);
    if p.exists() {
        return Some(p);
    }
    assert!(
        !required,
        "{} is missing; run scripts/fetch-assets",
        p.display()
    );
    eprintln!("skipping: {} not found", p.display());
    None
}

fn tokenizers() -> Option<(Tokenizer, Tokenizer)> {
    let smol = asset(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        std::env::var_os("RETORT_REQUIRE_ASSETS").is_some(),
    )?;
    let qwen = asset(
        "Qwen2.5-Coder-0.5B-Instruct.gguf",
        std::env::var_os("RETORT_REQUIRE_QWEN").is_some(),
    )?;
    let load = |p: PathBuf| Tokenizer::from_gguf(&GgufFile::open(&p).unwrap()).unwrap();
    Some((load(smol), load(qwen)))
}

fn conversations() -> Vec<Vec<Message>> {
    let answers = [
        "A mild headache lasting two days is usually not dangerous. Drink 1.5–2 L of water a day \
         and see a doctor if it comes with fever (≥ 38.5 °C) or a stiff neck.",
        "Mix 12345 mg? No: the dose is 0.25 mg/kg, i.e. 17.5 mg for a 70 kg adult.",
        "```python\nfor i in range(10):\n\tprint(f\"{i:>3}\")  # aligned\n```\nDone.",
        "Thanks 👍🏽! 你好，世界 — naïve café, Ærøskøbing, 𝄞 and ß.",
        "   Leading and trailing whitespace the template may trim.   \n\n",
        "Tabs\tand\n\nblank lines\r\nand CRLF.",
    ];
    let mut convs: Vec<Vec<Message>> = answers
        .iter()
        .map(|a| vec![Message::user("Question?"), Message::assistant(*a)])
        .collect();
    // Two trained turns in one conversation.
    convs.push(vec![
        Message::system("You are a careful physician."),
        Message::user("Is 130/80 high?"),
        Message::assistant("It is stage 1 hypertension by the 2017 ACC/AHA guideline."),
        Message::user("And 118/76?"),
        Message::assistant("Normal: below 120/80."),
    ]);
    convs
}

/// Every group decodes to the same text on both sides, the groups decode to the answers' text in
/// order, and each turn's end-of-turn marker is paired. Content tokens are left out only where
/// one side's token also covers template text (SmolLM2 merges the header's newline with leading
/// spaces of an answer): at most one per side and turn.
#[test]
fn smollm2_and_qwen2_tokenizations_of_the_same_answers_align() {
    let Some((smol, qwen)) = tokenizers() else {
        return;
    };
    let (mut groups, mut one_to_one, mut unaligned) = (0, 0, 0);
    for conv in conversations() {
        let (se, st) = smol.encode_chat_turns(&conv).unwrap();
        let (qe, qt) = qwen.encode_chat_turns(&conv).unwrap();
        // The same vocabulary entry (both are byte-level BPE vocabularies).
        let a = align_chat(&st, &qt, |s, t| {
            smol.inner().id_to_token(se.ids[s]) == qwen.inner().id_to_token(qe.ids[t])
        })
        .unwrap();
        let turns = conv.iter().filter(|m| m.trains()).count();
        assert!(
            a.unaligned.0 <= turns && a.unaligned.1 <= turns,
            "{conv:?}: {a:?}"
        );
        unaligned += a.unaligned.0 + a.unaligned.1;
        assert_eq!(a.ends.len(), turns, "end-of-turn markers paired");
        assert!(a.template.0 >= turns && a.template.1 >= turns);
        let decode = |t: &Tokenizer, ids: &[u32], pos: &[usize]| {
            let v: Vec<u32> = pos.iter().map(|&p| ids[p]).collect();
            t.decode(&v, false).unwrap()
        };
        let mut all = Vec::new();
        for (s, t) in &a.groups {
            let (ds, dt) = (decode(&smol, &se.ids, s), decode(&qwen, &qe.ids, t));
            assert_eq!(ds, dt, "{conv:?}");
            // Only loss positions are aligned.
            assert!(s.iter().all(|&p| se.loss_mask[p]) && t.iter().all(|&p| qe.loss_mask[p]));
            all.extend_from_slice(s);
        }
        // Decoded together: a group may be one byte of a character.
        let text = decode(&smol, &se.ids, &all);
        let contents: String = conv
            .iter()
            .filter(|m| m.trains())
            .map(|m| m.content.trim().to_string())
            .collect();
        assert!(contents.contains(text.trim()), "{conv:?}: {text:?}");
        assert!(
            text.trim().len() + 3 >= contents.trim().len(),
            "{conv:?}: {text:?}"
        );
        groups += a.groups.len();
        one_to_one += a.one_to_one();
    }
    eprintln!(
        "{groups} groups, {one_to_one} of them one token on each side, {unaligned} tokens left out"
    );
    assert!(unaligned <= 2, "{unaligned}");
    assert!(
        one_to_one * 2 > groups,
        "most groups are one token each side"
    );
}

/// The same tokenizer on both sides aligns every content token one to one.
#[test]
fn a_tokenizer_aligned_with_itself_is_one_to_one() {
    let Some((smol, qwen)) = tokenizers() else {
        return;
    };
    for tok in [&smol, &qwen] {
        for conv in conversations() {
            let (e, turns) = tok.encode_chat_turns(&conv).unwrap();
            let a = align_chat(&turns, &turns, |s, t| e.ids[s] == e.ids[t]).unwrap();
            assert_eq!(a.one_to_one(), a.groups.len());
            let content: usize = turns.iter().map(|t| t.positions.len()).sum();
            assert_eq!(a.groups.len(), content);
            let trained = e.loss_mask.iter().filter(|&&m| m).count();
            assert_eq!(content + a.template.0, trained, "{conv:?}: {turns:?}");
        }
    }
}
