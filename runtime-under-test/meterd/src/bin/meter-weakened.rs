//! meter-weakened: the test-only runtime with one defence switched off by `METER_WEAKEN`; acts as
//! `meterd` or `meter` by the name it is called with (link it as both into a runtime folder).

fn main() -> anyhow::Result<()> {
    let called = std::env::args_os()
        .next()
        .map(std::path::PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    meterd::harness_build::enable();
    if called == "meterd" {
        meterd::cli::run_daemon(std::env::args_os().collect())
    } else {
        std::process::exit(meterd::cli::run_meter(std::env::args_os().collect()))
    }
}
