//! libvirt's own steps in starting and destroying a guest, timed from its daemon's log.
//!
//! The daemon logs its QEMU driver's process steps (`qemu.qemu_process` at debug level, see
//! [`super::daemon`]); a worker thread writes a step's lines in order, so a step lasts from
//! its line to a later line of the same thread (the next, or the one that ends it). `make
//! bench-vm` reports these next to the libvirt backend's timings: they are what libvirt adds
//! to every start of QEMU, which the qemu backend does not pay.

use std::collections::BTreeMap;

/// Where a step ends: at a line of the thread that started it.
enum End {
    /// The thread's next line, whatever it says.
    NextLine,
    /// The thread's next line, which must say this (else the step is not counted).
    NextLineSays(&'static str),
    /// The thread's first later line that says this.
    LineSaying(&'static str),
}

/// A step of libvirt's: the name the reports use, the text of the line it starts with, and
/// where it ends.
struct Step {
    name: &'static str,
    starts: &'static str,
    ends: End,
}

const STEPS: [Step; 5] = [
    // A destroy: from SIGTERM to QEMU until libvirt, polling every 200 ms, sees the process
    // gone (the destroy call's kill is the one its stop job follows).
    Step {
        name: "destroy_wait",
        starts: "qemuProcessKill:",
        ends: End::NextLineSays("qemuProcessBeginStopJob:"),
    },
    // From QEMU's start until its monitor answers.
    Step {
        name: "monitor_connect",
        starts: "Waiting for monitor to show up",
        ends: End::LineSaying("qemuMonitorGetChardevInfo returned"),
    },
    // Loading the internal snapshot (a revert: QEMU starts paused, then `snapshot-load`).
    Step {
        name: "snapshot_load",
        starts: "reverting internal snapshot via QMP",
        ends: End::NextLine,
    },
    // Reading the guest CPU back from QEMU, one `qom-get` per CPU feature with QEMU 10.0.
    Step {
        name: "guest_cpu_check",
        starts: "Verifying and updating provided guest CPU",
        ends: End::NextLine,
    },
    // The whole start, from libvirt's first step until it lets the guest's CPUs run.
    Step {
        name: "whole_start",
        starts: "Beginning VM startup process",
        ends: End::LineSaying("qemuProcessFinishStartup"),
    },
];

/// One line of the daemon's log: its time of day in milliseconds, its thread and its text.
struct Line<'a> {
    at_ms: u64,
    thread: &'a str,
    text: &'a str,
}

/// Reads `2026-12-08 03:40:13.232+0000: 3852: debug : …`; other lines give nothing.
fn parse(line: &str) -> Option<Line<'_>> {
    let (_date, rest) = line.split_once(' ')?;
    let (clock, rest) = rest.split_once("+0000: ")?;
    let (thread, text) = rest.split_once(": ")?;
    let mut parts = clock.split([':', '.']);
    let mut next = || parts.next()?.parse::<u64>().ok();
    let (h, m, s, ms) = (next()?, next()?, next()?, next()?);
    Some(Line {
        at_ms: ((h * 60 + m) * 60 + s) * 1000 + ms,
        thread,
        text,
    })
}

/// Milliseconds from `from` to `to`, across midnight if need be.
fn elapsed(from: u64, to: u64) -> u64 {
    const DAY_MS: u64 = 86_400_000;
    (to + DAY_MS - from) % DAY_MS
}

/// Each step's durations in milliseconds, in the order they happened; a step the log never
/// finished (the thread wrote nothing after it) is left out.
pub fn step_durations(log: &str) -> BTreeMap<&'static str, Vec<f64>> {
    let lines: Vec<Line> = log.lines().filter_map(parse).collect();
    let mut durations: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(step) = STEPS.iter().find(|step| line.text.contains(step.starts)) else {
            continue;
        };
        let mut later = lines[i + 1..].iter().filter(|l| l.thread == line.thread);
        let end = match step.ends {
            End::NextLine => later.next(),
            End::NextLineSays(mark) => later.next().filter(|l| l.text.contains(mark)),
            End::LineSaying(mark) => later.find(|l| l.text.contains(mark)),
        };
        if let Some(end) = end {
            durations
                .entry(step.name)
                .or_default()
                .push(elapsed(line.at_ms, end.at_ms) as f64);
        }
    }
    durations
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
2026-12-08 03:40:13.232+0000: 3852: debug : qemuProcessKill:8830 : vm=0x1 name=vm1 pid=3879 flags=0x9
2026-12-08 03:40:13.300+0000: 3880: debug : qemuProcessHandleShutdown:575 : vm=0x1
2026-12-08 03:40:13.434+0000: 3852: debug : qemuProcessBeginStopJob:8891 : waking up all jobs waiting on the domain condition
2026-12-08 03:40:13.434+0000: 3852: debug : qemuProcessStop:8934 : Shutting down vm=0x1 name=vm1
2026-12-08 03:40:13.434+0000: 3852: debug : qemuProcessKill:8830 : vm=0x1 name=vm1 pid=3879 flags=0x2
2026-12-08 03:40:13.900+0000: 3852: debug : qemuProcessHandleEvent:552 : vm=0x1
2026-12-08 03:40:13.443+0000: 3846: debug : qemuProcessInit:5899 : Beginning VM startup process
2026-12-08 03:40:13.467+0000: 3846: debug : qemuProcessLaunch:8227 : Waiting for monitor to show up
2026-12-08 03:40:13.537+0000: 3846: debug : qemuProcessWaitForMonitor:2302 : qemuMonitorGetChardevInfo returned 0
2026-12-08 03:40:13.537+0000: 3846: debug : qemuProcessLaunch:8256 : reverting internal snapshot via QMP
2026-12-08 03:40:13.726+0000: 3846: debug : qemuProcessLaunch:8261 : Verifying and updating provided guest CPU
2026-12-08 03:40:14.058+0000: 3846: debug : qemuProcessLaunch:8265 : Detecting IOThread PIDs
2026-12-08 03:40:14.071+0000: 3846: debug : qemuProcessFinishStartup:8452 : Writing domain status to disk
2026-12-08 23:59:59.990+0000: 3850: debug : qemuProcessKill:8830 : vm=0x1 name=vm1 pid=3894 flags=0x9
not a log line
2026-12-09 00:00:00.190+0000: 3850: debug : qemuProcessBeginStopJob:8891 : waking up all jobs waiting on the domain condition
2026-12-09 00:00:00.190+0000: 3850: debug : qemuProcessStop:8934 : Shutting down vm=0x1
2026-12-09 00:00:00.200+0000: 3846: debug : qemuProcessInit:5899 : Beginning VM startup process
";

    #[test]
    fn each_step_lasts_until_its_threads_next_line() {
        let steps = step_durations(LOG);
        assert_eq!(
            steps["destroy_wait"],
            [202.0, 200.0],
            "the kill inside a stop is left out"
        );
        assert_eq!(steps["monitor_connect"], [70.0]);
        assert_eq!(steps["snapshot_load"], [189.0]);
        assert_eq!(steps["guest_cpu_check"], [332.0]);
        assert_eq!(
            steps["whole_start"],
            [628.0],
            "the unfinished start is left out"
        );
    }

    #[test]
    fn a_log_without_those_steps_gives_nothing() {
        assert!(step_durations("libvirt version: 11.3.0\n").is_empty());
        assert!(step_durations("").is_empty());
    }
}
