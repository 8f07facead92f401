//! The studies `longwriter study` runs beside writing: a Karel-like program
//! domain for probing what a model trained on programs represents
//! ([`karel`]), and linear probes on hidden states ([`probe`]).

pub mod karel;
pub mod probe;
