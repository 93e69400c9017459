//! Postcopy migration between two ufvmm processes (issue 3, in progress): so far the
//! wire format and its parser.

pub mod wire;
