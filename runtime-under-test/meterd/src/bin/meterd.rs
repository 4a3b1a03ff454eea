//! meterd: the licence runtime daemon.

fn main() -> anyhow::Result<()> {
    meterd::cli::run_daemon(std::env::args_os().collect())
}
