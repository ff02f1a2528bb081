//! claim-storm: one independent contender in a claim race.
//!
//! Reads the Redis settings the same way the binaries do (`CONFROUTE_REDIS__*`), claims every
//! conference `<prefix-name>0 .. <prefix-name>N-1` in a shuffled order with the given node as
//! its first candidate, retrying failed claims until a deadline, and prints one line per name:
//! `name owner epoch kind retries` (`- 0` for the owner and epoch of a claim that found no
//! node with room, kind `no_capacity`). Several of these started at once make a race between
//! processes. Exits 1 when a name could not be claimed by the deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use confroute_shared::config::{self, RedisConfig, Validate};
use confroute_shared::name::ConferenceName;
use confroute_shared::store::{Store, StoreMetrics};
use confroute_shared::types::NodeId;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Deserialize;
use tokio::sync::Semaphore;

#[derive(Parser)]
#[command(about = "One contender in a conference-claim race")]
struct Args {
    /// Number of conference names.
    #[arg(long, default_value_t = 1000)]
    names: usize,
    /// Name prefix (names are <prefix><index>).
    #[arg(long, default_value = "race-")]
    name_prefix: String,
    /// Node id this contender proposes first.
    #[arg(long)]
    candidate: String,
    /// Claims in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Shuffle seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Give up on a name after retrying this many seconds.
    #[arg(long, default_value_t = 30)]
    deadline_secs: u64,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Root {
    redis: RedisConfig,
}

impl Validate for Root {
    fn validate(&self) -> Result<(), config::ConfigError> {
        self.redis.validate()
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let root: Root = match config::load(None) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    let store = match Store::new(&root.redis, StoreMetrics::disabled()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    let candidate = match NodeId::parse(&args.candidate) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("--candidate: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let mut order: Vec<usize> = (0..args.names).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(args.seed));
    let limit = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut tasks = Vec::with_capacity(order.len());
    for i in order {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        let store = store.clone();
        let candidates = vec![candidate.clone()];
        let name = format!("{}{i}", args.name_prefix);
        let deadline = Instant::now() + Duration::from_secs(args.deadline_secs);
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let conf = ConferenceName::parse(&name).map_err(|e| format!("{name}: {e}"))?;
            let mut errors = 0u32;
            loop {
                match store.claim(&conf, &candidates).await {
                    Ok(c) => {
                        let owner = c
                            .owner
                            .map(|o| format!("{} {}", o.node, o.epoch))
                            .unwrap_or_else(|| "- 0".into());
                        return Ok(format!("{name} {owner} {} {errors}", c.kind.as_str()));
                    }
                    Err(e) if Instant::now() < deadline => {
                        errors += 1;
                        if errors == 1 {
                            eprintln!("{name}: {e}; retrying");
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => return Err(format!("{name}: gave up: {e}")),
                }
            }
        }));
    }
    let mut failed = false;
    for t in tasks {
        match t.await {
            Ok(Ok(line)) => println!("{line}"),
            Ok(Err(e)) => {
                eprintln!("{e}");
                failed = true;
            }
            Err(e) => {
                eprintln!("task failed: {e}");
                failed = true;
            }
        }
    }
    if failed {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
