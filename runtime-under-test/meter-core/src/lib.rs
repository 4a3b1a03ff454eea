//! Sans-IO licence logic of the meter reference runtime.

pub mod access_rules;
pub mod activation;
pub mod allocation;
pub mod binding;
pub mod firm_certificate;
pub mod licence;
pub mod policy;
pub mod reason;
pub mod rollback;
pub mod seat_ledger;
pub mod station;
pub mod traits;
pub mod usage;
pub mod usage_report;
pub mod usage_seats;
