//! `meter usage …`: checking the usage log and reporting from it.

use std::fmt::Write as _;
use std::path::Path;

use clap::Subcommand;
use serde_json::Value;

use crate::client::LocalClient;
use crate::outcome::{EXIT_DENIED, EXIT_OK, Outcome, report_error};
use crate::protocol::{LocalReply, LocalRequest};

/// `meter usage` subcommands (administrators only).
#[derive(Debug, Subcommand)]
pub enum UsageCommand {
    /// Check the usage log: every record in place, chained to the one before, signed with the
    /// runtime's usage key, and the log ending at the head kept beside it. Exits 1 when it
    /// finds a removed, altered, reordered or cut record. Compare the printed head with one
    /// kept elsewhere to catch whoever rewrote the log with the key.
    Verify,
    /// The seats the log shows, as JSON: each as it began (product, holder's machine) and
    /// ended (released, or taken back when its lease ran out), as a triad member's `meter
    /// triad status --history` lists its ledger's.
    Seats,
    /// Usage per user and product, peak concurrent grants per hour, denials per hour and
    /// reason, and reserved seats left unused.
    Report {
        /// Start of the window: unix ms, or UTC `YYYY-MM-DDTHH:MM[:SS]Z` [default: the first
        /// record].
        #[arg(long, value_parser = parse_time)]
        from: Option<u64>,
        /// End of the window (excluded), as --from [default: now].
        #[arg(long, value_parser = parse_time)]
        to: Option<u64>,
        /// Print comma-separated values (one line per figure) instead of text or JSON.
        #[arg(long)]
        csv: bool,
    },
}

/// Runs a `meter usage` command against the daemon at `socket`.
pub async fn run(socket: &Path, json_mode: bool, command: UsageCommand) -> anyhow::Result<Outcome> {
    let (request, format) = match command {
        UsageCommand::Verify => (LocalRequest::UsageVerify, Format::Verify),
        UsageCommand::Seats => (LocalRequest::UsageSeats, Format::Json),
        UsageCommand::Report { from, to, csv } => {
            if let (Some(from), Some(to)) = (from, to)
                && from >= to
            {
                anyhow::bail!("--from must come before --to");
            }
            let format = match (csv, json_mode) {
                (true, _) => Format::Csv,
                (false, true) => Format::Json,
                (false, false) => Format::Text,
            };
            (
                LocalRequest::UsageReport {
                    from_ms: from,
                    to_ms: to,
                },
                format,
            )
        }
    };
    let mut client = LocalClient::connect(socket).await?;
    let value: Value = match client.request(&request).await? {
        LocalReply::Json(text) => serde_json::from_str(&text)?,
        LocalReply::Error { message, reason } => {
            return Ok(report_error(json_mode, &message, reason));
        }
        other => anyhow::bail!("Unexpected reply {other:?}"),
    };
    match format {
        Format::Verify => {
            let intact = value["intact"].as_bool() == Some(true);
            if json_mode {
                println!("{value}");
            } else {
                print!("{}", verify_text(&value));
            }
            Ok(Outcome {
                code: if intact { EXIT_OK } else { EXIT_DENIED },
            })
        }
        Format::Json => {
            println!("{value}");
            Ok(Outcome { code: EXIT_OK })
        }
        Format::Csv => {
            print!("{}", report_csv(&value));
            Ok(Outcome { code: EXIT_OK })
        }
        Format::Text => {
            print!("{}", report_text(&value));
            Ok(Outcome { code: EXIT_OK })
        }
    }
}

enum Format {
    Verify,
    Json,
    Csv,
    Text,
}

/// Reads a time: unix ms, or UTC `YYYY-MM-DDTHH:MM[:SS]Z`.
pub fn parse_time(text: &str) -> Result<u64, String> {
    if let Ok(ms) = text.parse::<u64>() {
        return Ok(ms);
    }
    let bad = || format!("{text:?} is neither unix ms nor a UTC time like 2026-12-06T09:00Z");
    let rest = text.strip_suffix('Z').ok_or_else(bad)?;
    let (date, time) = rest.split_once('T').ok_or_else(bad)?;
    let numbers = |part: &str, sep: char| -> Option<Vec<u64>> {
        part.split(sep).map(|n| n.parse::<u64>().ok()).collect()
    };
    let date = numbers(date, '-')
        .filter(|d| d.len() == 3)
        .ok_or_else(bad)?;
    let time = numbers(time, ':')
        .filter(|t| t.len() == 2 || t.len() == 3)
        .ok_or_else(bad)?;
    let (year, month, day) = (date[0], date[1], date[2]);
    let (hour, minute, second) = (time[0], time[1], time.get(2).copied().unwrap_or(0));
    if !(1970..=9999).contains(&year)
        || !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return Err(bad());
    }
    let days = days_from_civil(year, month, day);
    Ok(((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (year ≥ 1970).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A unix-ms time as UTC `YYYY-MM-DDTHH:MMZ`.
fn utc(ms: u64) -> String {
    let minutes = ms / 60_000;
    let days = minutes / 1440;
    let (hour, minute) = ((minutes % 1440) / 60, minutes % 60);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}Z")
}

fn product(value: &Value) -> String {
    format!("{}:{}", value["firm"], value["code"])
}

fn user(value: &Value) -> String {
    value.as_str().unwrap_or("?").to_owned()
}

fn seconds(ms: &Value) -> String {
    format!("{:.1}", ms.as_u64().unwrap_or(0) as f64 / 1000.0)
}

fn verify_text(value: &Value) -> String {
    let mut text = String::new();
    let records = &value["records"];
    if value["intact"].as_bool() == Some(true) {
        let _ = writeln!(text, "usage log intact: {records} records");
    } else {
        let _ = writeln!(
            text,
            "usage log TAMPERED: {} problems in {records} records",
            value["problem-count"]
        );
        for problem in value["problems"].as_array().into_iter().flatten() {
            let _ = writeln!(text, "  {problem}");
        }
    }
    let _ = writeln!(text, "head {}", value["head"].as_str().unwrap_or("?"));
    let _ = writeln!(text, "key  {}", value["public-key"].as_str().unwrap_or("?"));
    text
}

fn report_text(value: &Value) -> String {
    let mut text = String::new();
    let ms = |v: &Value| v.as_u64().unwrap_or(0);
    let _ = writeln!(
        text,
        "usage from {} to {} ({} records)",
        utc(ms(&value["from-ms"])),
        utc(ms(&value["to-ms"])),
        value["records"]
    );
    let _ = writeln!(
        text,
        "\nusage per user\n  product     user          grants  held (s)"
    );
    for row in value["usage"].as_array().into_iter().flatten() {
        let _ = writeln!(
            text,
            "  {:<11} {:<13} {:>6}  {:>8}",
            product(&row["product"]),
            user(&row["user"]),
            row["grants"],
            seconds(&row["held-ms"])
        );
    }
    let _ = writeln!(
        text,
        "\npeak concurrent per hour\n  product     hour               peak"
    );
    for row in value["peaks"].as_array().into_iter().flatten() {
        let _ = writeln!(
            text,
            "  {:<11} {:<18} {:>4}",
            product(&row["product"]),
            utc(ms(&row["hour-ms"])),
            row["peak"]
        );
    }
    let _ = writeln!(
        text,
        "\ndenials\n  hour               product     user          reason               count"
    );
    for row in value["denials"].as_array().into_iter().flatten() {
        let _ = writeln!(
            text,
            "  {:<18} {:<11} {:<13} {:<20} {:>5}",
            utc(ms(&row["hour-ms"])),
            product(&row["product"]),
            user(&row["user"]),
            row["reason"].as_str().unwrap_or("?"),
            row["count"]
        );
    }
    let _ = writeln!(
        text,
        "\nreserved and unused\n  product     rule  for                  seats  unused seat-s"
    );
    for row in value["reserved-unused"].as_array().into_iter().flatten() {
        let _ = writeln!(
            text,
            "  {:<11} {:>4}  {:<20} {:>5}  {:>13}",
            product(&row["product"]),
            row["rule"],
            row["who"].as_str().unwrap_or("?"),
            row["reserved"],
            seconds(&row["unused-ms"])
        );
    }
    text
}

/// One line per figure: `table,firm,product,user,hour_ms,reason,rule,value`.
fn report_csv(value: &Value) -> String {
    let mut csv = String::from("table,firm,product,user,hour_ms,reason,rule,figure,value\n");
    let field = |v: &Value| -> String {
        match v {
            Value::Null => String::new(),
            Value::String(s) => csv_escape(s),
            other => other.to_string(),
        }
    };
    let mut line = |table: &str, row: &Value, hour: &Value, figure: &str, v: &Value| {
        let _ = writeln!(
            csv,
            "{table},{},{},{},{},{},{},{figure},{}",
            field(&row["product"]["firm"]),
            field(&row["product"]["code"]),
            field(&row["user"]),
            field(hour),
            field(&row["reason"]),
            field(&row["rule"]),
            field(v)
        );
    };
    for row in value["usage"].as_array().into_iter().flatten() {
        line("usage", row, &Value::Null, "grants", &row["grants"]);
        line("usage", row, &Value::Null, "held_ms", &row["held-ms"]);
    }
    for row in value["peaks"].as_array().into_iter().flatten() {
        line("peak", row, &row["hour-ms"], "peak", &row["peak"]);
    }
    for row in value["denials"].as_array().into_iter().flatten() {
        line("denials", row, &row["hour-ms"], "count", &row["count"]);
    }
    for row in value["reserved-unused"].as_array().into_iter().flatten() {
        line("reserved", row, &Value::Null, "reserved", &row["reserved"]);
        line(
            "reserved",
            row,
            &Value::Null,
            "unused_ms",
            &row["unused-ms"],
        );
    }
    csv
}

fn csv_escape(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_unix_ms_or_utc() {
        assert_eq!(parse_time("1700000000000"), Ok(1_700_000_000_000));
        assert_eq!(parse_time("1970-01-01T00:00Z"), Ok(0));
        assert_eq!(parse_time("2026-12-06T09:30:15Z"), Ok(1_796_549_415_000));
        assert!(parse_time("2026-13-06T09:30Z").is_err());
        assert!(parse_time("yesterday").is_err());
        assert_eq!(utc(1_796_549_415_000), "2026-12-06T09:30Z");
    }

    #[test]
    fn csv_fields_with_commas_are_quoted() {
        assert_eq!(csv_escape("a,b"), "\"a,b\"");
        assert_eq!(csv_escape("plain"), "plain");
    }
}
