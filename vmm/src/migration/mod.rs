//! Postcopy live migration between two ufvmm processes over TCP.
//!
//! - [`wire`]: the framed, checksummed messages.
//! - [`outgoing`]: the source (`run --migrate-to`, or the `migrate` command).
//! - [`incoming`]: the destination (`ufvmm incoming`).
//! - [`conn`]: connections and frame writing; [`progress`]: counters both sides show,
//!   and [`timeline`] the same over time;
//!   `pages` (the source's pages), `listener` (the destination's handshakes), `waiting`
//!   (the destination before its migration) and `verdicts` (its word to every
//!   session: a guest it said never started here never starts here).
//! - [`proxy`]: `ufvmm link-proxy`, a modelled network between the two.

pub mod conn;
pub mod incoming;
mod listener;
pub mod outgoing;
mod pages;
pub mod progress;
pub mod proxy;
pub mod timeline;
mod verdicts;
mod waiting;
pub mod wire;

pub use progress::Progress;
