//! The commands of the `taming` binary, as library functions.

pub mod autoencode;
pub mod bench;
pub mod check;
pub mod classify;
pub mod conditions;
pub mod data;
pub mod images;
pub mod info;
pub mod maps;
pub mod run;
pub mod sample;
pub mod serve;
pub mod train_transformer;
pub mod train_vqgan;
pub mod verify;
