//! The commands of the `taming` binary, as library functions.

pub mod bench;
pub mod info;
pub mod verify;
