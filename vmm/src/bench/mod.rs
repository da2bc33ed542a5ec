//! `spanvm bench`: measurements, each printed beside an anchor measured in the same run.

pub mod boot;
pub mod dsm;
pub mod exits;
