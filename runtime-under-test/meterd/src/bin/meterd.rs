//! meterd: the licence runtime daemon; called as `meter` (a link to it), the command-line tool.
//!
//! One binary for both keeps a guest image small: a virtual machine's kernel unpacks every byte
//! of its initramfs at each boot.

fn main() -> anyhow::Result<()> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let called_as = args
        .first()
        .and_then(|arg0| std::path::Path::new(arg0).file_name())
        .and_then(|name| name.to_str())
        .unwrap_or_default();
    if called_as == "meter" {
        std::process::exit(meterd::cli::run_meter(args));
    }
    meterd::cli::run_daemon(args)
}
