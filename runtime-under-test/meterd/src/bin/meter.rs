//! meter: the licence runtime's command-line tool.

fn main() {
    std::process::exit(meterd::cli::run_meter(std::env::args_os().collect()));
}
