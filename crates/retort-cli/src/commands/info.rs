//! `retort info`: what a model file holds.

use anyhow::Result;

use crate::cli::InfoArgs;

pub fn run(args: InfoArgs, ctx: &super::Ctx) -> Result<()> {
    let ck = retort_model::checkpoint::read(&args.model.model, &ctx.device)?;
    let c = &ck.config;
    let tok = &ck.tokenizer;
    let out = serde_json::json!({
        "path": ck.path,
        "source": format!("{:?}", ck.kind),
        "config": c.to_hf_json(),
        "parameters": c.num_parameters(),
        "tokenizer": {
            "vocab_size": tok.vocab_size(),
            "bos_token_id": tok.bos_token_id(),
            "add_bos": tok.add_bos(),
            "stop_ids": tok.stop_ids(),
            "chat_template": tok.template().map(|t| t.source()),
        },
    });
    outln!("{}", serde_json::to_string_pretty(&out)?)?;
    Ok(())
}
