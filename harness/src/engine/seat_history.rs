//! Reading a triad's committed seat history: the most seats of a product it ever had running,
//! which holders hold seats at its end, and what in it does not add up.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// What a member's committed seat events say about one product.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SeatHistory {
    /// Events read (of every product).
    pub events: usize,
    /// The most seats of the product running at once.
    pub peak: u32,
    /// Holders (runtime ids) of the product's seats running at the end.
    pub holders: BTreeSet<String>,
    /// Events that do not add up (a seat ended that never began, one begun twice).
    pub anomalies: Vec<String>,
}

/// The product code a ledger product number carries (firm in the high half).
fn product_code(ledger_product: u64) -> u32 {
    (ledger_product & 0xffff_ffff) as u32
}

/// Reads `meter triad status --history`'s events for `product`.
pub fn read(history: &[Value], product: u32) -> SeatHistory {
    let mut out = SeatHistory {
        events: history.len(),
        ..SeatHistory::default()
    };
    // Every running lease, of any product: (its product code, holder).
    let mut running: BTreeMap<u64, (u32, String)> = BTreeMap::new();
    let mut held = 0u32;
    for event in history {
        let (kind, body) = match event.as_object().and_then(|o| o.iter().next()) {
            Some((kind, body)) => (kind.as_str(), body),
            None => {
                out.anomalies.push(format!("unreadable event {event}"));
                continue;
            }
        };
        let Some(lease) = body.get("lease").and_then(Value::as_u64) else {
            out.anomalies
                .push(format!("event without a lease: {event}"));
            continue;
        };
        match kind {
            "Granted" => {
                let code = product_code(body.get("product").and_then(Value::as_u64).unwrap_or(0));
                let holder = body
                    .get("holder")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                if running.insert(lease, (code, holder)).is_some() {
                    out.anomalies.push(format!("seat {lease} began twice"));
                } else if code == product {
                    held += 1;
                    out.peak = out.peak.max(held);
                }
            }
            "Released" | "Expired" => match running.remove(&lease) {
                Some((code, _)) if code == product => held -= 1,
                Some(_) => {}
                None => out
                    .anomalies
                    .push(format!("seat {lease} ended without beginning")),
            },
            other => out.anomalies.push(format!("unknown event {other}")),
        }
    }
    out.holders = running
        .into_values()
        .filter(|(code, _)| *code == product)
        .map(|(_, holder)| holder)
        .collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn granted(lease: u64, holder: &str) -> Value {
        json!({"Granted": {"lease": lease, "product": (10u64 << 32) | 1001, "holder": holder, "at_ms": 1}})
    }

    #[test]
    fn the_peak_counts_running_seats_of_the_product_only() {
        let history = vec![
            granted(0, "a"),
            granted(1, "b"),
            json!({"Granted": {"lease": 2, "product": 2001, "holder": "c", "at_ms": 2}}),
            json!({"Expired": {"lease": 0, "at_ms": 3}}),
            granted(3, "d"),
        ];
        let read = read(&history, 1001);
        assert_eq!(read.peak, 2);
        assert_eq!(
            read.holders,
            ["b", "d"].into_iter().map(String::from).collect()
        );
        assert!(read.anomalies.is_empty());
    }

    #[test]
    fn a_seat_that_ends_without_beginning_is_an_anomaly() {
        let history = vec![json!({"Released": {"lease": 9, "at_ms": 3}})];
        assert_eq!(read(&history, 1001).anomalies.len(), 1);
    }
}
