//! Postcopy live migration between two ufvmm processes over TCP.
//!
//! - [`wire`]: the framed, checksummed messages.
//! - [`outgoing`]: the source (`run --migrate-to`, or the `migrate` command).
//! - [`incoming`]: the destination (`ufvmm incoming`).
//! - [`conn`]: connections and frame writing; [`progress`]: counters both sides show.
//! - [`proxy`]: `ufvmm link-proxy`, a modelled network between the two.

pub mod conn;
pub mod incoming;
pub mod outgoing;
pub mod progress;
pub mod proxy;
pub mod wire;

pub use progress::Progress;
