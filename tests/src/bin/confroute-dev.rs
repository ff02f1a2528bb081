//! `confroute-dev`: a whole local confroute cluster in one command (see `confroute_tests::dev`).

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    confroute_tests::dev::run(confroute_tests::dev::DevArgs::parse()).await
}
