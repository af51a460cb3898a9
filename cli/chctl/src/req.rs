//! `chctl req`: one request, its reply printed; exit 1 on an error reply.

use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;

use crate::common::{request, Ctx};

#[derive(clap::Args)]
pub struct Args {
    /// `portfolio.update`, `strategy.list`, `cmd.market.price` or `admin.projector.portfolio.status`
    /// (under the prefix), or a full subject (`$SRV.PING`, another prefix's `desk.query.strategy.list`).
    pub subject: String,
    /// The JSON body; `-` reads it from stdin.
    #[arg(default_value = "{}")]
    pub json: String,
    /// Seconds to wait for the reply.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout: u64,
}

pub async fn run(ctx: &Ctx, args: &Args) -> Result<ExitCode> {
    let body = if args.json == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the body from stdin")?;
        s
    } else {
        args.json.clone()
    };
    let subject = ctx.subject(&args.subject);
    let client = ctx.connect().await?;
    // Sent as given: the service judges malformed JSON like it would from any client.
    let reply = request(
        &client,
        &subject,
        Bytes::from(body),
        Duration::from_secs(args.timeout),
    )
    .await?;
    match serde_json::from_slice::<serde_json::Value>(&reply.payload) {
        Ok(v) => println!("{}", serde_json::to_string_pretty(&v)?),
        Err(_) => println!("{}", String::from_utf8_lossy(&reply.payload)),
    }
    match reply.error {
        Some(e) => {
            eprintln!("error {} {}: {}", e.status, e.code, e.message);
            Ok(ExitCode::FAILURE)
        }
        None => Ok(ExitCode::SUCCESS),
    }
}
