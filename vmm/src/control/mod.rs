//! Control: the Unix-socket API, the signal thread, and the end-of-run report.

pub mod api;
pub mod ops;
pub mod report;
pub mod signals;
