//! meterd-sim: the reference runtime as the harness and the tests run it, on simulated machines
//! (`--platform sim:<dir>`) as well as real ones; acts as `meterd` or, called `meter`, as the
//! command-line tool. Never shipped: the `meterd` binary refuses `sim:`.

/// mimalloc: the server's access and release pairs allocate and free small buffers all the time
/// (the server bench measured about a tenth more access and release pairs per second with it).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    meterd::harness_build::enable();
    if meterd::cli::called_as(&args) == "meter" {
        std::process::exit(meterd::cli::run_meter(args));
    }
    meterd::cli::run_daemon(args)
}
