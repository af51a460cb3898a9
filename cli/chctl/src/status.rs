//! `chctl status`: pings every service, prints the projectors' progress and the stream.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::common::{ping, projector_status, text, Ctx, PROJECTIONS, WORKERS};

pub async fn run(ctx: &Ctx) -> Result<ExitCode> {
    let client = ctx.connect().await?;
    println!(
        "services (prefix {}, NATS {}):",
        ctx.subjects.prefix(),
        ctx.cfg.nats_url
    );
    let pings = futures::future::join_all(WORKERS.iter().map(|w| {
        let service = ctx.service(w);
        let client = &client;
        async move {
            let t = Instant::now();
            let reply = ping(client, &service, Duration::from_millis(1000)).await;
            (service, reply, t.elapsed())
        }
    }))
    .await;
    let mut down = 0;
    for (service, reply, took) in pings {
        match reply {
            Some(v) => println!(
                "  up    {service:<24} version {:<8} id {}  ({} ms)",
                text(&v, "version"),
                text(&v, "id"),
                took.as_millis()
            ),
            None => {
                down += 1;
                println!("  down  {service}");
            }
        }
    }
    println!("projectors:");
    for p in PROJECTIONS {
        match projector_status(ctx, &client, p).await {
            Ok(v) => println!(
                "  {p:<10} last_seq {:<8} stream_last_seq {:<8} lag_events {}",
                text(&v, "last_seq"),
                text(&v, "stream_last_seq"),
                text(&v, "lag_events")
            ),
            Err(e) => println!("  {p:<10} no status: {e:#}"),
        }
    }
    let js = async_nats::jetstream::new(client.clone());
    let name = ctx.subjects.stream_name();
    match js.get_stream(&name).await {
        Ok(s) => match s.get_info().await {
            Ok(info) => println!(
                "stream {name}: {} events, last seq {}, {} consumers",
                info.state.messages, info.state.last_sequence, info.state.consumer_count
            ),
            Err(e) => println!("stream {name}: {e}"),
        },
        Err(_) => println!("stream {name}: missing (run `chctl setup`)"),
    }
    if down > 0 {
        println!("{down} of {} services down", WORKERS.len());
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
