//! The only pyo3 code: converts Python arguments, releases the GIL around the engine, and maps
//! engine errors (and panics) to Python exceptions.

use crate::engine::{self, Options, Precision, Stats, TensorValues, WEIGHT_SUFFIXES};
use crate::error::DimcutError as EngineError;
use crate::manifest::{MANIFEST_FILE, MANIFEST_SCHEMA};
use crate::plan::{ArrayData, ArrayRef, Arrays, Backing, Shortcut, TensorOp};
use numpy::{IntoPyArray, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyFileExistsError, PyFileNotFoundError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::mpsc::{RecvTimeoutError, Sender};
use std::time::Duration;

create_exception!(
    dimcut._core,
    DimcutError,
    PyException,
    "A checkpoint or output problem the engine detected (or an internal engine failure)."
);

fn to_py_err(err: EngineError) -> PyErr {
    let message = err.to_string();
    match err {
        EngineError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            PyFileNotFoundError::new_err(message)
        }
        EngineError::MissingFile { .. } => PyFileNotFoundError::new_err(message),
        EngineError::InvalidPlan(_) | EngineError::InvalidArgument(_) => {
            PyValueError::new_err(message)
        }
        EngineError::OutputExists(_) | EngineError::OutputBusy(_) => {
            PyFileExistsError::new_err(message)
        }
        _ => DimcutError::new_err(message),
    }
}

/// Runs `work` without the GIL; a panic becomes a `DimcutError` instead of aborting Python.
fn run_detached<T: Send>(
    py: Python<'_>,
    work: impl FnOnce() -> Result<T, EngineError> + Send,
) -> PyResult<T> {
    panic_to_error(py.detach(|| catch_unwind(AssertUnwindSafe(work))))
}

fn panic_to_error<T>(
    outcome: Result<Result<T, EngineError>, Box<dyn std::any::Any + Send>>,
) -> PyResult<T> {
    match outcome {
        Ok(result) => result.map_err(to_py_err),
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(DimcutError::new_err(format!(
                "internal engine error: {message}"
            )))
        }
    }
}

/// Messages from the engine's worker thread to the calling thread.
enum ToCaller {
    /// Run Python's signal handlers now and answer whether the run must stop.
    CheckSignals(Sender<bool>),
    Done,
}

/// Asks the calling thread whether a signal handler raised (Ctrl-C, SIGTERM, ...).
#[derive(Clone)]
struct SignalCheck(Sender<ToCaller>);

impl SignalCheck {
    fn interrupted(&self) -> bool {
        let (reply, answer) = std::sync::mpsc::channel();
        self.0.send(ToCaller::CheckSignals(reply)).is_err() || answer.recv().unwrap_or(true)
    }
}

/// Like `run_detached`, but `work` runs on a worker thread while this (the calling, usually
/// main) thread runs Python's signal handlers, which Python only runs on the main thread:
/// the worker asks after every tile (`SignalCheck`), and the caller also polls while waiting.
/// When a handler raises, the worker's next check stops the engine (which removes its
/// temporary output) and the handler's exception (KeyboardInterrupt, ...) is returned.
fn run_interruptible<T: Send>(
    py: Python<'_>,
    work: impl FnOnce(SignalCheck) -> Result<T, EngineError> + Send,
) -> PyResult<T> {
    let mut signal_error: Option<PyErr> = None;
    let outcome = py.detach(|| {
        let (to_caller, messages) = std::sync::mpsc::channel();
        let check = SignalCheck(to_caller.clone());
        std::thread::scope(|scope| {
            let worker = scope.spawn(move || {
                let outcome = catch_unwind(AssertUnwindSafe(|| work(check)));
                let _ = to_caller.send(ToCaller::Done);
                outcome
            });
            let mut poll = || {
                if signal_error.is_none() {
                    if let Err(err) = Python::attach(|py| py.check_signals()) {
                        signal_error = Some(err);
                    }
                }
                signal_error.is_some()
            };
            loop {
                match messages.recv_timeout(Duration::from_millis(50)) {
                    Ok(ToCaller::Done) | Err(RecvTimeoutError::Disconnected) => break,
                    Ok(ToCaller::CheckSignals(reply)) => {
                        let _ = reply.send(poll());
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        poll();
                    }
                }
            }
            worker.join().unwrap_or_else(Err)
        })
    });
    match signal_error {
        // Cancelled (or finished regardless): the signal's exception wins, after cleanup.
        Some(err) => Err(err),
        None => panic_to_error(outcome),
    }
}

const OP_KEYS: [&str; 10] = [
    "name",
    "source",
    "col_scale",
    "in_rotation",
    "in_keep",
    "out_rotation",
    "out_keep",
    "shortcut",
    "literal",
    "dtype",
];

fn parse_op(index: usize, op: &Bound<'_, PyAny>) -> PyResult<TensorOp> {
    let op = op
        .cast::<PyDict>()
        .map_err(|_| PyValueError::new_err(format!("op #{index} is not a dict")))?;
    let name: String = op
        .get_item("name")?
        .ok_or_else(|| PyValueError::new_err(format!("op #{index} has no \"name\"")))?
        .extract()?;
    let context = |message: String| PyValueError::new_err(format!("op {name:?}: {message}"));
    for key in op.keys() {
        let key: String = key.extract().map_err(|e: PyErr| context(e.to_string()))?;
        if !OP_KEYS.contains(&key.as_str()) {
            return Err(context(format!("unknown key {key:?}")));
        }
    }
    // A missing key and an explicit None both mean "not set".
    fn field<'py, T: FromPyObjectOwned<'py>>(
        op: &Bound<'py, PyDict>,
        key: &str,
    ) -> Result<Option<T>, String> {
        match op.get_item(key).map_err(|e| e.to_string())? {
            Some(value) if !value.is_none() => value
                .extract::<T>()
                .map(Some)
                .map_err(|e| format!("{key}: {}", e.into())),
            _ => Ok(None),
        }
    }
    let shortcut = match field::<Vec<Bound<'_, PyAny>>>(op, "shortcut").map_err(context)? {
        None => None,
        Some(items) => Some(parse_shortcut(&items).map_err(context)?),
    };
    let dtype = field::<String>(op, "dtype")
        .and_then(|dtype| dtype.map(|d| d.parse()).transpose())
        .map_err(context)?;
    Ok(TensorOp {
        source: field(op, "source").map_err(context)?,
        col_scale: field(op, "col_scale").map_err(context)?,
        in_rotation: field(op, "in_rotation").map_err(context)?,
        in_keep: field(op, "in_keep").map_err(context)?,
        out_rotation: field(op, "out_rotation").map_err(context)?,
        out_keep: field(op, "out_keep").map_err(context)?,
        literal: field(op, "literal").map_err(context)?,
        shortcut,
        dtype,
        name,
    })
}

/// `[a, b, keep_a, keep_b]` (any sequence).
fn parse_shortcut(items: &[Bound<'_, PyAny>]) -> Result<Shortcut, String> {
    let invalid = || "shortcut must be [array_a, array_b, keep_a, keep_b]".to_string();
    let [a, b, keep_a, keep_b] = items else {
        return Err(invalid());
    };
    Ok(Shortcut {
        a: a.extract().map_err(|_| invalid())?,
        b: b.extract().map_err(|_| invalid())?,
        keep_a: keep_a.extract().map_err(|_| invalid())?,
        keep_b: keep_b.extract().map_err(|_| invalid())?,
    })
}

fn parse_ops(ops: &Bound<'_, PyList>) -> PyResult<Vec<TensorOp>> {
    ops.iter()
        .enumerate()
        .map(|(i, op)| parse_op(i, &op))
        .collect()
}

/// Read-only borrows of the caller's numpy arrays, held while the engine runs without the GIL
/// (rotations can be gigabytes; they are never copied).
struct BorrowedArrays<'py> {
    f32: Vec<(String, PyReadonlyArrayDyn<'py, f32>)>,
    f64: Vec<(String, PyReadonlyArrayDyn<'py, f64>)>,
}

impl<'py> BorrowedArrays<'py> {
    fn new(arrays: &Bound<'py, PyDict>) -> PyResult<Self> {
        let mut borrowed = Self {
            f32: Vec::new(),
            f64: Vec::new(),
        };
        for (name, value) in arrays.iter() {
            let name: String = name.extract()?;
            if let Ok(array) = value.cast::<PyArrayDyn<f32>>() {
                borrowed.f32.push((name, array.readonly()));
            } else if let Ok(array) = value.cast::<PyArrayDyn<f64>>() {
                borrowed.f64.push((name, array.readonly()));
            } else {
                return Err(PyValueError::new_err(format!(
                    "array {name:?} must be a float32 or float64 numpy array, got {}",
                    value.get_type().name()?
                )));
            }
        }
        Ok(borrowed)
    }

    /// Views of the arrays; those named in `mapped` are read-only shared file maps (the
    /// caller's promise), whose pages the engine drops after use.
    fn views(&self, mapped: &[String]) -> PyResult<Arrays<'_>> {
        fn not_contiguous(name: &str) -> PyErr {
            PyValueError::new_err(format!("array {name:?} must be C-contiguous"))
        }
        let backing = |name: &str| match mapped.iter().any(|m| m == name) {
            true => Backing::ReadOnlyFileMap,
            false => Backing::Memory,
        };
        let mut views = Arrays::new();
        for (name, array) in &self.f32 {
            let data = array.as_slice().map_err(|_| not_contiguous(name))?;
            let shape = array.shape().to_vec();
            let data = ArrayData::F32(data);
            let backing = backing(name);
            views.insert(
                name.clone(),
                ArrayRef {
                    data,
                    shape,
                    backing,
                },
            );
        }
        for (name, array) in &self.f64 {
            let data = array.as_slice().map_err(|_| not_contiguous(name))?;
            let shape = array.shape().to_vec();
            let data = ArrayData::F64(data);
            let backing = backing(name);
            views.insert(
                name.clone(),
                ArrayRef {
                    data,
                    shape,
                    backing,
                },
            );
        }
        if let Some(name) = mapped.iter().find(|name| !views.contains_key(*name)) {
            return Err(PyValueError::new_err(format!(
                "mapped names {name:?}, which is not in arrays"
            )));
        }
        Ok(views)
    }
}

fn stats_dict<'py>(py: Python<'py>, stats: &Stats) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("tensors", stats.tensors)?;
    dict.set_item("bytes_read", stats.bytes_read)?;
    dict.set_item("bytes_written", stats.bytes_written)?;
    dict.set_item("flops", stats.flops)?;
    dict.set_item("seconds", stats.seconds)?;
    dict.set_item("shards", stats.shards)?;
    dict.set_item("matmul_seconds", stats.matmul_seconds)?;
    dict.set_item("convert_seconds", stats.convert_seconds)?;
    dict.set_item("write_seconds", stats.write_seconds)?;
    dict.set_item("sync_seconds", stats.sync_seconds)?;
    Ok(dict)
}

/// Writes the checkpoint a plan describes; see docs/plan-format.md. `mapped` names arrays that
/// are views of read-only shared file maps (numpy `mmap_mode="r"`): their pages are dropped
/// after each op that reads them. Never name anonymous memory there: dropping zeroes it.
/// `_fail_writes_after` is a fault-injection hook for the test suite (`dimcut._hooks`) only.
#[pyfunction]
#[pyo3(signature = (
    src_dir, out_dir, ops, arrays, *, extra_files = None, max_shard_size = 5 << 30,
    memory_budget = 512 << 20, precision = "f32", overwrite = false, threads = None,
    progress = None, mapped = Vec::new(), _fail_writes_after = None,
))]
#[allow(clippy::too_many_arguments)]
fn rewrite_checkpoint<'py>(
    py: Python<'py>,
    src_dir: PathBuf,
    out_dir: PathBuf,
    ops: &Bound<'py, PyList>,
    arrays: &Bound<'py, PyDict>,
    extra_files: Option<HashMap<String, Vec<u8>>>,
    max_shard_size: usize,
    memory_budget: usize,
    precision: &str,
    overwrite: bool,
    threads: Option<usize>,
    progress: Option<Py<PyAny>>,
    mapped: Vec<String>,
    _fail_writes_after: Option<u64>,
) -> PyResult<Bound<'py, PyDict>> {
    let ops = parse_ops(ops)?;
    let borrowed = BorrowedArrays::new(arrays)?;
    let arrays = borrowed.views(&mapped)?;
    let extra_files: Vec<_> = extra_files.unwrap_or_default().into_iter().collect();
    let options = Options {
        max_shard_size,
        memory_budget,
        precision: precision.parse::<Precision>().map_err(to_py_err)?,
        overwrite,
        threads,
        fail_writes_after: _fail_writes_after,
    };
    // After every tile: signals (Ctrl-C, SIGTERM) are checked by the calling thread, then the
    // callback runs with the GIL briefly reacquired; an exception either raised is re-raised
    // as is, after the engine removed its temporary output.
    let mut callback_error: Option<PyErr> = None;
    let result = run_interruptible(py, |signals| {
        let mut report = |done: u64, total: u64| {
            if signals.interrupted() {
                return Err(EngineError::Interrupted);
            }
            let Some(callback) = &progress else {
                return Ok(());
            };
            Python::attach(|py| {
                callback.call1(py, (done, total)).map(drop).map_err(|e| {
                    callback_error = Some(e);
                    EngineError::Interrupted
                })
            })
        };
        engine::rewrite_checkpoint(
            &src_dir,
            &out_dir,
            &ops,
            &arrays,
            &extra_files,
            &options,
            &mut report,
        )
    });
    if let Some(err) = callback_error {
        return Err(err);
    }
    stats_dict(py, &result?)
}

/// Computes a plan's tensors in memory: name → float32 array (float64 with precision="f64").
/// `mapped` is as for `rewrite_checkpoint`.
#[pyfunction]
#[pyo3(signature = (
    src_dir, ops, arrays, *, precision = "f32", memory_budget = 512 << 20, threads = None,
    mapped = Vec::new(),
))]
#[allow(clippy::too_many_arguments)]
fn rewrite_tensors<'py>(
    py: Python<'py>,
    src_dir: PathBuf,
    ops: &Bound<'py, PyList>,
    arrays: &Bound<'py, PyDict>,
    precision: &str,
    memory_budget: usize,
    threads: Option<usize>,
    mapped: Vec<String>,
) -> PyResult<Bound<'py, PyDict>> {
    let ops = parse_ops(ops)?;
    let borrowed = BorrowedArrays::new(arrays)?;
    let arrays = borrowed.views(&mapped)?;
    let precision = precision.parse::<Precision>().map_err(to_py_err)?;
    // Signals (Ctrl-C, SIGTERM) are checked after every tile, as by `rewrite_checkpoint`.
    let outputs = run_interruptible(py, |signals| {
        let mut check = |_: u64, _: u64| match signals.interrupted() {
            true => Err(EngineError::Interrupted),
            false => Ok(()),
        };
        engine::rewrite_tensors(
            &src_dir,
            &ops,
            &arrays,
            precision,
            memory_budget,
            threads,
            &mut check,
        )
    })?;
    let result = PyDict::new(py);
    for output in outputs {
        let array = match output.values {
            TensorValues::F32(values) => values.into_pyarray(py).reshape(output.shape)?.into_any(),
            TensorValues::F64(values) => values.into_pyarray(py).reshape(output.shape)?.into_any(),
        };
        result.set_item(output.name, array)?;
    }
    Ok(result)
}

/// Validates every header: tensor name → (dtype, shape, shard file name).
#[pyfunction]
fn inspect_checkpoint<'py>(py: Python<'py>, src_dir: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let tensors = run_detached(py, || engine::inspect_checkpoint(&src_dir))?;
    let result = PyDict::new(py);
    for tensor in tensors {
        let entry = (tensor.dtype.to_string(), tensor.shape, tensor.shard);
        result.set_item(tensor.name, entry)?;
    }
    Ok(result)
}

/// Panics inside the engine's guard: lets the test suite check that a Rust panic becomes a
/// `DimcutError` and never aborts the interpreter.
#[pyfunction]
fn _panic_for_test(py: Python<'_>) -> PyResult<()> {
    run_detached(py, || -> Result<(), EngineError> {
        panic!("deliberate test panic")
    })
}

#[pymodule]
#[pyo3(name = "_core")]
fn core_module(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add("DimcutError", module.py().get_type::<DimcutError>())?;
    module.add("MANIFEST_FILE", MANIFEST_FILE)?;
    module.add("MANIFEST_SCHEMA", MANIFEST_SCHEMA)?;
    module.add(
        "WEIGHT_SUFFIXES",
        PyTuple::new(module.py(), WEIGHT_SUFFIXES)?,
    )?;
    // The plan's op fields, defined once here (dimcut.engine.TensorOp is tested against them).
    module.add("OP_KEYS", PyTuple::new(module.py(), OP_KEYS)?)?;
    module.add_function(wrap_pyfunction!(rewrite_checkpoint, module)?)?;
    module.add_function(wrap_pyfunction!(rewrite_tensors, module)?)?;
    module.add_function(wrap_pyfunction!(inspect_checkpoint, module)?)?;
    module.add_function(wrap_pyfunction!(_panic_for_test, module)?)?;
    Ok(())
}
