//! On a terminal server a process counts in its login session (the audit session the kernel
//! gives a login), which `setsid` cannot leave: an app that detaches from its RDP session is
//! still that session's station. A terminal server is known by the login sessions alive on it,
//! table or no table.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use common::{METER, Machine, Vendor};
use serde_json::Value;

/// How the test's process is logged in.
#[derive(Clone, Copy)]
struct Login {
    /// The kind the session table lists the login session as; `None`: unlisted (only the
    /// simulated kernel's `logins.json` shows it).
    listed_as: Option<&'static str>,
    /// The process leaves its process session with `setsid` after logging in.
    detached: bool,
}

/// An RDP login whose app detaches with `setsid`.
const DETACHED_RDP: Login = Login {
    listed_as: Some("rdp"),
    detached: true,
};
/// A login the session table does not list (root deleted the table).
const UNLISTED: Login = Login {
    listed_as: None,
    detached: false,
};

/// Runs `meter --json access --product <product>` as a process that opened a login session
/// (wrote its login uid, as `pam_loginuid` does), as `login` says. `None` when this kernel or
/// user cannot open login sessions.
fn access_in_login(machine: &Machine, product: u32, login: Login) -> Option<(i32, Value)> {
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
        command.pre_exec(move || {
            common::open_login_session()?;
            if login.detached {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
            }
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
    let id: u32 = std::fs::read_to_string(format!("/proc/{}/sessionid", child.id()))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_ne!(id, u32::MAX, "the kernel gave no login session");
    machine.add_login(id);
    if let Some(kind) = login.listed_as {
        machine.add_session(id, kind);
    }
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
    install_cad(&machine);

    assert_counted_as_its_session(&machine, DETACHED_RDP);
}

/// A process logged in as `login` on `machine` (ts1) is a station of its own session, and is
/// refused the local licence there; returns early (skipping) where logins cannot be opened.
fn assert_counted_as_its_session(machine: &Machine, login: Login) -> bool {
    let Some((code, granted)) = access_in_login(machine, 1001, login) else {
        return false;
    };
    assert_eq!(code, 0, "{granted}");
    let station = granted["station"].as_str().unwrap();
    assert!(
        station.starts_with("ts1/s"),
        "the app counted as {station}, not as its login session"
    );
    let (code, refused) = access_in_login(machine, 1002, login).unwrap();
    assert_eq!(code, 1, "{refused}");
    assert_eq!(
        refused["reason"], "local-licence-terminal-server",
        "{refused}"
    );
    true
}

/// Two products: five station-share seats, and a local licence (quantity 0).
fn install_cad(machine: &Machine) {
    let vendor = Vendor::new();
    let licence = vendor.issue(
        "ts",
        &[
            "{code: 1001, name: cad-pro, container: soft, quantity: 5, counting: station-share}",
            "{code: 1002, name: cad-local, container: soft, quantity: 0, counting: station-share}",
        ],
    );
    machine.install(&vendor, &licence);
}

#[test]
fn a_terminal_server_without_its_session_table_is_known_by_its_live_logins() {
    // No table at all: only the kernel shows who is logged in (an admin at the console, and
    // the test's login).
    let machine = Machine::new("ts1", "workstation", "127.0.9.21");
    machine.add_login(1);
    let _daemon = machine.start(&[]);
    install_cad(&machine);

    if !assert_counted_as_its_session(&machine, UNLISTED) {
        return;
    }
    // Once a terminal server, always one: the console admin logging off changes nothing.
    std::fs::write(machine.platform().join("logins.json"), "[]").unwrap();
    let (code, refused) = access_in_login(&machine, 1002, UNLISTED).unwrap();
    assert_eq!(code, 1, "{refused}");
    let (_, status) = common::meter_at(&machine.socket(), &["status"]);
    assert_eq!(status["machine"]["role"], "terminal-server", "{status}");
}

#[test]
fn one_login_viewed_remotely_is_a_workstation() {
    let machine = Machine::new("ws1", "workstation", "127.0.9.22");
    let _daemon = machine.start(&[]);
    install_cad(&machine);
    let Some((code, granted)) = access_in_login(&machine, 1002, UNLISTED) else {
        return;
    };
    assert_eq!(code, 0, "{granted}");
    assert_eq!(granted["station"], "ws1", "{granted}");
}
