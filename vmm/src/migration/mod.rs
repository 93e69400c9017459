//! Postcopy migration between two ufvmm processes (issue 3, in progress): so far the
//! wire format, and the link proxy that puts a modelled network between two peers.

pub mod proxy;
pub mod wire;
