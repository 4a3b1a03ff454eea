//! The meter reference licence runtime: the daemon `meterd` and the command-line tool `meter`.

pub mod activation;
pub mod cli;
pub mod client;
pub mod daemon;
pub mod dongle_probe;
pub mod dongle_vendor;
pub mod dongles;
pub mod frame;
pub mod licences;
pub mod local;
pub mod metering;
pub mod os_sources;
pub mod outcome;
pub mod pidfd;
pub mod platform;
pub mod protocol;
pub mod remote;
pub mod server;
pub mod status_view;
pub mod store;
pub mod tls;
pub mod transport;
pub mod vendor;
pub mod vendor_files;
pub mod weakened;
pub mod witness;
