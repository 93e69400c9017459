//! Postcopy live migration between two ufvmm processes over TCP.
//!
//! - [`wire`]: the framed, checksummed messages.
//! - [`outgoing`]: the source (`run --migrate-to`, or the `migrate` command).
//! - [`incoming`]: the destination (`ufvmm incoming`).
//! - [`conn`]: connections and frame writing; [`progress`]: counters both sides show;
//!   `pages` (the source's pages) and `listener` (the destination's handshakes).
//! - [`proxy`]: `ufvmm link-proxy`, a modelled network between the two.

pub mod conn;
pub mod incoming;
mod listener;
pub mod outgoing;
mod pages;
pub mod progress;
pub mod proxy;
pub mod wire;

pub use progress::Progress;
