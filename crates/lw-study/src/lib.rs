//! The studies `longwriter study` runs beside writing: a Karel-like program
//! domain for probing what a model trained on programs represents
//! ([`karel`]), linear probes on hidden states ([`probe`]), and the
//! multiple-choice tasks of the checkpoint fine-tuning study ([`tasks`]).

pub mod karel;
pub mod probe;
pub mod tasks;
