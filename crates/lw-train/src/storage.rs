//! Reading the CPU storage handed to the training's custom operations.

use candle_core::{CpuStorage, Layout};

/// The f32 values of a contiguous tensor; `what` names it in the error.
pub(crate) fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        return Err(candle_core::Error::Msg(format!("{what} must be f32")));
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err(candle_core::Error::Msg(format!(
            "{what} must be contiguous"
        )));
    };
    Ok(&data[start..end])
}
