//! Moving values between host vectors and burn tensors at a chosen precision.

use burn::tensor::{DType, Device, Tensor, TensorData};

use crate::Error;

/// A tensor of `shape` on `device` in `dtype`, from row-major f32 values.
pub fn from_f32<const D: usize>(
    values: &[f32],
    shape: [usize; D],
    device: &Device,
    dtype: DType,
) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), (device, dtype))
}

/// A tensor of `shape` on `device` in `dtype`, from row-major f64 values.
pub fn from_f64<const D: usize>(
    values: &[f64],
    shape: [usize; D],
    device: &Device,
    dtype: DType,
) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), (device, dtype))
}

/// The tensor's values, row-major, rounded to f32.
pub fn to_f32<const D: usize>(t: &Tensor<D>) -> Result<Vec<f32>, Error> {
    t.try_to_vec_as::<f32>()
        .map_err(|e| Error::Backend(e.to_string()))
}

/// The tensor's values, row-major, as f64.
pub fn to_f64<const D: usize>(t: &Tensor<D>) -> Result<Vec<f64>, Error> {
    t.try_to_vec_as::<f64>()
        .map_err(|e| Error::Backend(e.to_string()))
}
