//! meterd: the licence runtime daemon; called as `meter` (a link to it), the command-line tool.
//!
//! One binary for both keeps a guest image small: a virtual machine's kernel unpacks every byte
//! of its initramfs at each boot.

/// mimalloc: the server's access and release pairs allocate and free small buffers all the time
/// (the server bench measured about a tenth more access and release pairs per second with it).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if meterd::cli::called_as(&args) == "meter" {
        std::process::exit(meterd::cli::run_meter(args));
    }
    meterd::cli::run_daemon(args)
}
