//! On a terminal server a process counts in its login session (the audit session the kernel
//! gives a login), which `setsid` cannot leave: an app that detaches from its RDP session is
//! still that session's station.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use common::{METER, Machine, Vendor};
use serde_json::Value;

/// Runs `meter --json access --product <product>` as a process that opened a login session
/// (wrote its login uid, as `pam_loginuid` does) and then left its process session with
/// `setsid`; the login session is entered into the machine's table as an RDP session first.
/// `None` when this kernel or user cannot open login sessions.
fn access_detached_from_rdp(machine: &Machine, product: u32) -> Option<(i32, Value)> {
    let mut command = Command::new("sh");
    command
        .args([
            "-c",
            "read go; exec \"$0\" \"$@\"",
            METER,
            "--json",
            "access",
        ])
        .arg("--product")
        .arg(product.to_string())
        .env("METER_SOCKET", machine.socket())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    // SAFETY: open_login_session and setsid are async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            common::open_login_session()?;
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("SKIPPED: cannot open a login session here: {e}");
            return None;
        }
    };
    let login: u32 = std::fs::read_to_string(format!("/proc/{}/sessionid", child.id()))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_ne!(login, u32::MAX, "the kernel gave no login session");
    machine.add_session(login, "rdp");
    writeln!(child.stdin.take().unwrap(), "go").unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let code = child.wait().unwrap().code().unwrap_or(-1);
    Some((code, serde_json::from_str(line.trim()).unwrap()))
}

#[test]
fn an_app_that_leaves_its_rdp_session_is_still_that_sessions_station() {
    let machine = Machine::new("ts1", "terminal-server", "127.0.9.20");
    let _daemon = machine.start(&[]);
    let vendor = Vendor::new();
    let licence = vendor.issue(
        "ts",
        &[
            "{code: 1001, name: cad-pro, container: soft, quantity: 5, counting: station-share}",
            "{code: 1002, name: cad-local, container: soft, quantity: 0, counting: station-share}",
        ],
    );
    machine.install(&vendor, &licence);

    let Some((code, granted)) = access_detached_from_rdp(&machine, 1001) else {
        return;
    };
    assert_eq!(code, 0, "{granted}");
    let station = granted["station"].as_str().unwrap();
    assert!(
        station.starts_with("ts1/s"),
        "a detached app counted as {station}, not as its RDP session"
    );
    let (code, refused) = access_detached_from_rdp(&machine, 1002).unwrap();
    assert_eq!(code, 1, "{refused}");
    assert_eq!(
        refused["reason"], "local-licence-terminal-server",
        "{refused}"
    );
}
