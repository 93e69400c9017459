//! ufvmm: a small KVM VMM whose vCPUs stay controllable while they wait for guest pages
//! that arrive late through userfaultfd (postcopy migration, lazy restore).
//!
//! Where things are:
//! - [`memory`]: guest RAM and the page-state map;
//! - [`source`]: page sources and the link model in front of them;
//! - [`fault`]: the userfaultfd event loop and `get_guest_pages`;
//! - [`vcpu`]: the run loop, exit dispatch, kicks;
//! - [`control`]: control socket, signals, report;
//! - [`vm`]: puts it together; [`boot`]: the boot image; [`config`]: the options.

#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

#[path = "../../guest/src/abi.rs"]
pub mod abi;
pub mod boot;
pub mod config;
pub mod control;
pub mod debug;
pub mod fault;
pub mod memory;
pub mod migration;
pub mod plot;
pub mod source;
pub mod vcpu;
pub mod vm;
