//! ONNX Runtime's KV buffers and logits in the element type the graph declares: f32, or f16
//! for exports whose whole graph runs in half precision (`model_q4f16.onnx`). Everything the
//! engine does with them is typed here once, for both.

use half::f16;
use ort::memory::{Allocator, MemoryInfo};
use ort::session::IoBinding;
use ort::value::{
    DynValue, PrimitiveTensorElementType, Shape, Tensor, TensorElementType, TensorRefMut,
    TensorValueType, Value,
};

use super::ort::ort_error;
use super::EngineError;
use crate::model::KvElem;

/// One layer's keys or values, `[rows, heads, capacity, dim]`.
pub(crate) enum KvBuffer {
    F32(Tensor<f32>),
    F16(Tensor<f16>),
}

/// Where a buffer's rows sit: `[rows, heads, capacity, dim]`.
#[derive(Clone, Copy)]
pub(crate) struct KvShape {
    pub heads: usize,
    pub capacity: usize,
    pub dim: usize,
}

impl KvBuffer {
    pub fn new(elem: KvElem, rows: usize, s: KvShape) -> Result<Self, EngineError> {
        let allocator = Allocator::default();
        let shape = [rows, s.heads, s.capacity, s.dim];
        Ok(match elem {
            KvElem::F32 => KvBuffer::F32(Tensor::new(&allocator, shape).map_err(ort_error)?),
            KvElem::F16 => KvBuffer::F16(Tensor::new(&allocator, shape).map_err(ort_error)?),
        })
    }

    /// Copies the first `lens[r]` positions of each row `r` from `from`, a buffer of the same
    /// element type with `from_capacity` positions per row.
    pub fn keep_rows(&mut self, from: &KvBuffer, from_capacity: usize, lens: &[usize], s: KvShape) {
        match (self, from) {
            (KvBuffer::F32(to), KvBuffer::F32(from)) => copy_rows(
                from.extract_tensor().1,
                to.extract_tensor_mut().1,
                from_capacity,
                lens,
                s,
            ),
            (KvBuffer::F16(to), KvBuffer::F16(from)) => copy_rows(
                from.extract_tensor().1,
                to.extract_tensor_mut().1,
                from_capacity,
                lens,
                s,
            ),
            _ => unreachable!("one engine's buffers share its graph's element type"),
        }
    }

    /// Binds rows `first..first + count` as both `past` and `present`: GroupQueryAttention
    /// writes only the positions past those it reads.
    pub fn bind_rows(
        &mut self,
        binding: &mut IoBinding,
        (past, present): (&str, &str),
        memory: &MemoryInfo,
        (first, count): (usize, usize),
        s: KvShape,
    ) -> Result<(), EngineError> {
        match self {
            KvBuffer::F32(t) => bind_view(t, binding, (past, present), memory, (first, count), s),
            KvBuffer::F16(t) => bind_view(t, binding, (past, present), memory, (first, count), s),
        }
    }
}

fn copy_rows<T: Copy>(from: &[T], to: &mut [T], from_capacity: usize, lens: &[usize], s: KvShape) {
    let from_rows = from.len() / (s.heads * from_capacity * s.dim).max(1);
    for (row, &filled) in lens.iter().enumerate().take(from_rows) {
        let filled = filled.min(from_capacity);
        for h in 0..s.heads {
            let src = (row * s.heads + h) * from_capacity * s.dim;
            let dst = (row * s.heads + h) * s.capacity * s.dim;
            to[dst..dst + filled * s.dim].copy_from_slice(&from[src..src + filled * s.dim]);
        }
    }
}

fn bind_view<T: PrimitiveTensorElementType + std::fmt::Debug>(
    buffer: &mut Tensor<T>,
    binding: &mut IoBinding,
    (past, present): (&str, &str),
    memory: &MemoryInfo,
    (first, count): (usize, usize),
    s: KvShape,
) -> Result<(), EngineError> {
    let shape = Shape::new([count, s.heads, s.capacity, s.dim].map(|d| d as i64));
    let (_, data) = buffer.extract_tensor_mut();
    let start = first * s.heads * s.capacity * s.dim;
    assert!(start + count * s.heads * s.capacity * s.dim <= data.len());
    // SAFETY: the range lies inside the buffer (checked above), which the engine owns and
    // neither touches nor reallocates until the binding (which holds the view) is dropped
    // after the run.
    let view = unsafe {
        TensorRefMut::<T>::from_raw(memory.clone(), data.as_mut_ptr().add(start).cast(), shape)
    }
    .map_err(ort_error)?;
    bind_input_in_place(binding, past, &view)?;
    binding.bind_output(present, view).map_err(ort_error)
}

/// Binds `value` as input `name` as it is. ort's own `bind_input` copies a tensor made over
/// borrowed memory, lest the run write what it reads; here that is the point (the same row is
/// bound as present, and GroupQueryAttention writes only past the positions it reads).
fn bind_input_in_place<T: PrimitiveTensorElementType + std::fmt::Debug>(
    binding: &mut IoBinding,
    name: &str,
    value: &Value<TensorValueType<T>>,
) -> Result<(), EngineError> {
    use ort::AsPointer;
    let name = std::ffi::CString::new(name).map_err(ort_error)?;
    // SAFETY: the binding and the value are live ONNX Runtime objects; the value outlives
    // the run (the caller keeps the views until after it), and BindInput copies the name.
    unsafe {
        ort::Error::result_from_status((ort::api().BindInput)(
            binding.ptr_mut(),
            name.as_ptr(),
            value.ptr(),
        ))
    }
    .map_err(ort_error)
}

/// An empty past (no positions) for the grown cache: `[1, heads, 0, dim]`.
pub(crate) fn empty_past(elem: KvElem, heads: usize, dim: usize) -> Result<DynValue, EngineError> {
    let shape = [1usize, heads, 0, dim];
    match elem {
        KvElem::F32 => Tensor::from_array((shape, Vec::<f32>::new())).map(|t| t.into_dyn()),
        KvElem::F16 => Tensor::from_array((shape, Vec::<f16>::new())).map(|t| t.into_dyn()),
    }
    .map_err(ort_error)
}

/// A grown cache's `[1, heads, past, dim]` value cut to its first `len` positions.
pub(crate) fn truncated(value: &DynValue, len: usize) -> Result<DynValue, EngineError> {
    fn cut<T: PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static>(
        value: &DynValue,
        len: usize,
    ) -> Result<DynValue, EngineError> {
        let (shape, data) = value.try_extract_tensor::<T>().map_err(ort_error)?;
        let (heads, past, dim) = (shape[1] as usize, shape[2] as usize, shape[3] as usize);
        let mut out = Vec::with_capacity(heads * len * dim);
        for h in 0..heads {
            out.extend_from_slice(&data[h * past * dim..(h * past + len) * dim]);
        }
        Tensor::from_array(([1usize, heads, len, dim], out))
            .map(|t| t.into_dyn())
            .map_err(ort_error)
    }
    match value.dtype().tensor_type() {
        Some(TensorElementType::Float16) => cut::<f16>(value, len),
        _ => cut::<f32>(value, len),
    }
}

/// A logits output as the graph gives it, f32 or f16; rows are read out as f32.
pub(crate) struct Logits<'a> {
    /// The last dimension: the vocabulary the graph produces (0 for a shapeless output).
    pub vocab: usize,
    data: LogitsData<'a>,
}

enum LogitsData<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl<'a> Logits<'a> {
    pub fn of(value: &'a DynValue) -> Result<Self, EngineError> {
        if value.dtype().tensor_type() == Some(TensorElementType::Float16) {
            let (shape, data) = value.try_extract_tensor::<f16>().map_err(ort_error)?;
            return Ok(Logits {
                vocab: last_dim(shape),
                data: LogitsData::F16(data),
            });
        }
        let (shape, data) = value.try_extract_tensor::<f32>().map_err(ort_error)?;
        Ok(Logits {
            vocab: last_dim(shape),
            data: LogitsData::F32(data),
        })
    }

    pub fn len(&self) -> usize {
        match self.data {
            LogitsData::F32(d) => d.len(),
            LogitsData::F16(d) => d.len(),
        }
    }

    /// Appends values `range` to `out` as f32.
    pub fn extend(&self, range: std::ops::Range<usize>, out: &mut Vec<f32>) {
        match self.data {
            LogitsData::F32(d) => out.extend_from_slice(&d[range]),
            LogitsData::F16(d) => out.extend(d[range].iter().map(|x| x.to_f32())),
        }
    }
}

fn last_dim(shape: &Shape) -> usize {
    shape.last().copied().unwrap_or(0) as usize
}
