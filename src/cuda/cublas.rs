//! cuBLAS, loaded at run time, for the Newton–Schulz products of the orthogonalised rule
//! (math §5b): the raw symbols, then a handle bound to a device's stream, then a batched
//! `bf16` GEMM whose buffers are checked against its shape.
//!
//! cudarc's own loader, with this crate's `cuda-12080` pin, looks for `libcublas.so` and
//! `libcublas.so.12` but not CUDA 13's `libcublas.so.13`; this one tries CUDA 13's name first,
//! then CUDA 12's, and says which loaded. A machine with neither gets [`Error::NoCublas`],
//! which names every file tried.

use std::ffi::{c_int, c_longlong, c_void};
use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use super::cuda_error;
pub use crate::device::{Gemm, GemmBatch, GemmOutput};
use crate::error::{Error, Result};

/// The cuBLAS library files tried, in order: CUDA 13's, then CUDA 12's.
pub const CUBLAS_LIBRARY_NAMES: &[&str] = if cfg!(windows) {
    &["cublas64_13.dll", "cublas64_12.dll"]
} else {
    &["libcublas.so.13", "libcublas.so.12", "libcublas.so"]
};

type Handle = *mut c_void;
type Status = c_int;
const STATUS_SUCCESS: Status = 0;
const OP_N: c_int = 0;
const OP_T: c_int = 1;
const CUDA_R_16BF: c_int = 14;
const CUDA_R_32F: c_int = 0;
const COMPUTE_32F: c_int = 68;
const GEMM_DEFAULT: c_int = -1;

type CreateFn = unsafe extern "C" fn(*mut Handle) -> Status;
type DestroyFn = unsafe extern "C" fn(Handle) -> Status;
type SetStreamFn = unsafe extern "C" fn(Handle, cudarc::driver::sys::CUstream) -> Status;
#[allow(clippy::type_complexity)]
type GemmStridedBatchedExFn = unsafe extern "C" fn(
    Handle,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    *const c_void,
    *const c_void,
    c_int,
    c_int,
    c_longlong,
    *const c_void,
    c_int,
    c_int,
    c_longlong,
    *const c_void,
    *mut c_void,
    c_int,
    c_int,
    c_longlong,
    c_int,
    c_int,
    c_int,
) -> Status;

/// The loaded library and the four symbols this crate calls.
struct Library {
    name: &'static str,
    create: CreateFn,
    destroy: DestroyFn,
    set_stream: SetStreamFn,
    gemm_strided_batched_ex: GemmStridedBatchedExFn,
    /// Kept loaded for the process: the function pointers above point into it.
    _library: libloading::Library,
}

fn library() -> Result<&'static Library> {
    static LIBRARY: OnceLock<std::result::Result<Library, String>> = OnceLock::new();
    LIBRARY
        .get_or_init(open_library)
        .as_ref()
        .map_err(|message| Error::NoCublas {
            tried: CUBLAS_LIBRARY_NAMES.join(", "),
            message: message.clone(),
        })
}

fn open_library() -> std::result::Result<Library, String> {
    let mut errors = Vec::new();
    for &name in CUBLAS_LIBRARY_NAMES {
        // SAFETY: loading cuBLAS runs its initialisers, as linking it would; its symbols are
        // looked up below with the signatures of cuBLAS's public header (cublas_api.h), the
        // same in CUDA 12 and 13.
        let loaded = unsafe {
            libloading::Library::new(name).and_then(|library| {
                let create = *library.get::<CreateFn>(b"cublasCreate_v2\0")?;
                let destroy = *library.get::<DestroyFn>(b"cublasDestroy_v2\0")?;
                let set_stream = *library.get::<SetStreamFn>(b"cublasSetStream_v2\0")?;
                let gemm_strided_batched_ex =
                    *library.get::<GemmStridedBatchedExFn>(b"cublasGemmStridedBatchedEx\0")?;
                Ok(Library {
                    name,
                    create,
                    destroy,
                    set_stream,
                    gemm_strided_batched_ex,
                    _library: library,
                })
            })
        };
        match loaded {
            Ok(library) => return Ok(library),
            Err(error) => errors.push(format!("{name}: {error}")),
        }
    }
    Err(errors.join("; "))
}

/// Loads cuBLAS (once per process) and returns the file that loaded, or
/// [`Error::NoCublas`]. Needs no device.
///
/// ```
/// # #[cfg(feature = "cuda")] {
/// match spectral_step::cuda::cublas::load() {
///     Ok(name) => println!("cuBLAS from {name}"),
///     Err(error) => println!("no cuBLAS: {error}"),
/// }
/// # }
/// ```
pub fn load() -> Result<&'static str> {
    library().map(|library| library.name)
}

fn check(call: &'static str, status: Status) -> Result<()> {
    if status == STATUS_SUCCESS {
        Ok(())
    } else {
        Err(Error::Cublas { call, status })
    }
}

/// An element type cuBLAS stores a product's result in: `bf16` or `f32`.
pub trait GemmResult: cudarc::driver::DeviceRepr + private::Sealed {
    /// Its [`GemmOutput`].
    const OUTPUT: GemmOutput;
}

mod private {
    pub trait Sealed {}
    impl Sealed for half::bf16 {}
    impl Sealed for f32 {}
}

impl GemmResult for bf16 {
    const OUTPUT: GemmOutput = GemmOutput::Bf16;
}

impl GemmResult for f32 {
    const OUTPUT: GemmOutput = GemmOutput::F32;
}

/// A cuBLAS handle on one stream of a device.
pub struct Cublas {
    handle: Handle,
    stream: Arc<CudaStream>,
    library: &'static Library,
}

// SAFETY: cuBLAS allows a handle to be used from any host thread, and from several at once
// so long as its configuration does not change meanwhile (cuBLAS guide, "Thread Safety");
// this type sets the stream once, in `new`, and changes nothing after.
unsafe impl Send for Cublas {}
// SAFETY: as for `Send`.
unsafe impl Sync for Cublas {}

impl std::fmt::Debug for Cublas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cublas")
            .field("library", &self.library.name)
            .finish_non_exhaustive()
    }
}

impl Cublas {
    /// A handle whose work is enqueued on `stream`. [`Error::NoCublas`] where no cuBLAS
    /// loads.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        let library = library()?;
        stream
            .context()
            .bind_to_thread()
            .map_err(cuda_error("binding the context for cuBLAS"))?;
        let mut handle: Handle = std::ptr::null_mut();
        // SAFETY: `create` writes one handle to the pointer, which points at `handle`; the
        // context is current on this thread, as cuBLAS requires.
        check("cublasCreate_v2", unsafe { (library.create)(&mut handle) })?;
        let cublas = Self {
            handle,
            stream,
            library,
        };
        // SAFETY: the handle was just created and the stream is alive (held by `cublas`).
        check("cublasSetStream_v2", unsafe {
            (library.set_stream)(cublas.handle, cublas.stream.cu_stream())
        })?;
        Ok(cublas)
    }

    /// The file cuBLAS was loaded from.
    pub fn library_name(&self) -> &'static str {
        self.library.name
    }

    /// Enqueues `batch` on the handle's stream: `bf16` operands, `f32` accumulation
    /// (`CUBLAS_COMPUTE_32F`), the result stored as `C` (`bf16` or `f32`). Each buffer must belong to the stream's context
    /// and hold exactly its operand's elements (`batch * m * k`, `batch * k * n`,
    /// `batch * m * n`), else [`Error::InvalidArgument`] and nothing is enqueued.
    pub fn gemm_bf16<C: GemmResult>(
        &self,
        batch: &GemmBatch,
        a: &CudaSlice<bf16>,
        b: &CudaSlice<bf16>,
        c: &mut CudaSlice<C>,
    ) -> Result<()> {
        let (a_len, b_len, c_len) = batch.lengths()?;
        // The same driver context, even through another `CudaContext` handle of it.
        let context = self.stream.context();
        if [a.context(), b.context(), c.context()]
            .iter()
            .any(|buffer_context| ***buffer_context != **context)
        {
            return Err(Error::InvalidArgument(format!(
                "a buffer of another CUDA context was passed to cuBLAS on device {}",
                context.ordinal()
            )));
        }
        if (a.len(), b.len(), c.len()) != (a_len, b_len, c_len) {
            return Err(Error::InvalidArgument(format!(
                "cuBLAS batch {batch:?} needs buffers of {a_len}, {b_len} and {c_len} \
                 elements, got {}, {} and {}",
                a.len(),
                b.len(),
                c.len()
            )));
        }
        let (a_ptr, _a_guard) = a.device_ptr(&self.stream);
        let (b_ptr, _b_guard) = b.device_ptr(&self.stream);
        let (c_ptr, _c_guard) = c.device_ptr_mut(&self.stream);
        let gemm = Gemm {
            batch: *batch,
            a: a_ptr,
            b: b_ptr,
            c: c_ptr,
            output: C::OUTPUT,
        };
        // SAFETY: the three buffers are of the stream's context and hold exactly `batch`
        // packed matrices of the shapes above (both checked); `c` is borrowed mutably, so it
        // aliases neither input; the guards order the buffers' use on the stream.
        unsafe { self.gemm(&gemm) }
    }

    /// Enqueues `gemm` on the handle's stream: `bf16` operands, `f32` accumulation
    /// (`CUBLAS_COMPUTE_32F`), `C` stored as `gemm.output`.
    ///
    /// # Safety
    ///
    /// `gemm.a`, `gemm.b` and `gemm.c` must be addresses in the stream's context of live
    /// allocations holding at least [`Gemm::byte_lengths`] bytes from those addresses until
    /// the batch has run, and `C` must not overlap `A` or `B`.
    pub(crate) unsafe fn gemm(&self, gemm: &Gemm) -> Result<()> {
        let batch = &gemm.batch;
        let (a_len, b_len, c_len) = batch.lengths()?;
        self.stream
            .context()
            .bind_to_thread()
            .map_err(cuda_error("binding the context for cuBLAS"))?;
        // Row-major C = op(A) op(B) is column-major Cᵀ = op(B)ᵀ op(A)ᵀ, and a row-major
        // buffer read column-major is its transpose: so B goes first, each operand with its
        // own transpose flag, and the leading dimensions are the row-major row lengths.
        let (m, n, k) = (batch.m as c_int, batch.n as c_int, batch.k as c_int);
        let row_length = |rows_if_plain: c_int, cols_if_plain: c_int, transposed: bool| {
            if transposed {
                rows_if_plain
            } else {
                cols_if_plain
            }
        };
        let lda = row_length(m, k, batch.transpose_a);
        let ldb = row_length(k, n, batch.transpose_b);
        let op = |transposed: bool| if transposed { OP_T } else { OP_N };
        let stride = |len: usize| (len / batch.batch) as c_longlong;
        let (stride_a, stride_b, stride_c) = (stride(a_len), stride(b_len), stride(c_len));
        let c_type = match gemm.output {
            GemmOutput::Bf16 => CUDA_R_16BF,
            GemmOutput::F32 => CUDA_R_32F,
        };
        // SAFETY: by this function's contract the three addresses hold `batch` packed
        // matrices of the shapes above, so every access the strided batch makes with these
        // leading dimensions and strides is inside them, and C aliases neither input; alpha
        // and beta are host `f32`s, as CUBLAS_COMPUTE_32F with the default host pointer mode
        // reads them, alive for the call.
        check("cublasGemmStridedBatchedEx", unsafe {
            (self.library.gemm_strided_batched_ex)(
                self.handle,
                op(batch.transpose_b),
                op(batch.transpose_a),
                n,
                m,
                k,
                (&batch.alpha as *const f32).cast(),
                gemm.b as *const c_void,
                CUDA_R_16BF,
                ldb,
                stride_b,
                gemm.a as *const c_void,
                CUDA_R_16BF,
                lda,
                stride_a,
                (&batch.beta as *const f32).cast(),
                gemm.c as *mut c_void,
                c_type,
                n,
                stride_c,
                batch.batch as c_int,
                COMPUTE_32F,
                GEMM_DEFAULT,
            )
        })
    }
}

impl Drop for Cublas {
    fn drop(&mut self) {
        // A failure here (a context already torn down) leaves nothing to clean up.
        if self.stream.context().bind_to_thread().is_ok() {
            // SAFETY: the handle was created by `new` and is destroyed once, here.
            let _ = unsafe { (self.library.destroy)(self.handle) };
        }
    }
}
