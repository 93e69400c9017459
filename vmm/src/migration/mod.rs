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

/// The destination's answer to a resume for a guest it never started (the source then
/// knows the guest is still its own).
pub const NEVER_STARTED: &str = "the guest never started here";
/// The destination's last word when its VM ends before every page arrived.
pub const VM_ENDED: &str = "the destination VM has ended";
/// True if a refusal from the destination says it never started the guest.
pub fn says_never_started(text: &str) -> bool {
    text.contains(NEVER_STARTED) || text.contains(OTHER_MIGRATION)
}
/// The destination's answer to a connection from another migration.
pub const OTHER_MIGRATION: &str = "not the migration in progress here";
