//! Pre-initialization (the wizer approach, done by the host at start-up).
//!
//! A fresh signer instance spends most of its guest time on start-up: it
//! reads the environment, parses the configuration and derives the day's
//! signing key before it looks at the request. A component that exports the
//! core function [`PREINIT_EXPORT`] (outside its world, so other hosts never
//! see it) lets serve-signer do that once:
//!
//! 1. the component's core module that exports it is instantiated on its
//!    own, with the environment and the wall clock only (any other import
//!    traps), and the export runs;
//! 2. its linear memory then becomes the module's data, and the module goes
//!    back into the component in place of the original;
//! 3. the host compiles that component and makes fresh instances from it.
//!
//! The snapshot is taken in an instance no request ever reaches, so it
//! holds nothing a caller sent; the dead stack below the stack pointer is
//! left out. It holds the configuration
//! and derived keys, so it is compiled in memory only, never cached on disk.
//! The run is refused, and the plain component kept, when the export calls
//! anything else, leaves a mutable global changed (the stack pointer, in
//! LLVM's output), or the module has a shape this does not rewrite (passive
//! data, an imported or 64-bit memory, a start function). Tables are not
//! snapshotted: an export that changed one would lose the change (Rust
//! code does not). The imports are lowered as wit-bindgen's Rust
//! components lower them (UTF-8, `cabi_realloc`); serve-signer serves its
//! own signer only.

use std::ops::Range;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use wasmparser::{BinaryReader, DataKind, ExternalKind, TypeRef};
use wasmtime::{
    Caller, Engine, Extern, ExternType, Func, FuncType, Instance, Store, StoreLimits, StoreLimitsBuilder, Val, ValType,
};

use crate::engine::{self, WasmtimeResultExt};

/// The core export a component offers for pre-initialization (`src/bin/signer.rs`).
pub const PREINIT_EXPORT: &str = "snapsign-preinit";

/// Exports the instrumented module adds: its memory and each mutable global.
const MEMORY_EXPORT: &str = "snapsign-preinit-memory";
const GLOBAL_EXPORT: &str = "snapsign-preinit-global-";

/// Zero bytes between two non-zero runs below which both go in one data
/// segment (doubled until there are at most [`MAX_SEGMENTS`]).
const SEGMENT_GAP: usize = 256;

/// Data segments a snapshot is written as, at most (wasmparser refuses more than 100,000).
const MAX_SEGMENTS: usize = 10_000;

/// A component whose module starts from a pre-initialized memory.
pub struct Snapshot {
    /// The rewritten component (it holds the guest's configuration: keep it in memory).
    pub component: Vec<u8>,
    /// Linear memory at the snapshot, bytes.
    pub memory_bytes: usize,
    /// Data segments the snapshot was written as.
    pub segments: usize,
}

/// Runs `component`'s pre-initialization with `env` and gives back the
/// component rebuilt from the snapshot; `None` when no core module of it
/// exports [`PREINIT_EXPORT`]. `cache_dir` keeps the compiled instrumented
/// module (it holds no configuration); `timeout` and `max_memory_bytes`
/// bound the run as they bound a request.
pub fn snapshot(
    engine: &Engine,
    component: &[u8],
    env: &[(String, String)],
    cache_dir: &Path,
    timeout: Duration,
    max_memory_bytes: usize,
) -> Result<Option<Snapshot>> {
    ensure!(component.get(..8) == Some(b"\0asm\x0d\0\x01\0".as_slice()), "not a WebAssembly component");
    let sections = sections(component, 8)?;
    let mut found = None;
    for section in sections.iter().filter(|s| s.id == 1) {
        let module = &component[section.body.clone()];
        let shape = Shape::of(module)?;
        if shape.exports_preinit {
            found = Some((section, module, shape));
            break;
        }
    }
    let Some((section, module, shape)) = found else { return Ok(None) };
    shape.check_rewritable()?;
    let memory = run(engine, module, &shape, env, cache_dir, timeout, max_memory_bytes)?;
    let (rewritten, segments) = rebuild_module(module, &shape, &memory)?;
    let mut out = component[..section.start].to_vec();
    push_section(&mut out, 1, &rewritten);
    out.extend_from_slice(&component[section.body.end..]);
    Ok(Some(Snapshot { component: out, memory_bytes: memory.len(), segments }))
}

/// One section of a module or component: its id, where it starts (the id
/// byte) and its body.
struct Section {
    id: u8,
    start: usize,
    body: Range<usize>,
}

fn sections(bytes: &[u8], header: usize) -> Result<Vec<Section>> {
    let mut out = Vec::new();
    let mut at = header;
    while at < bytes.len() {
        let id = bytes[at];
        let (len, body) = read_u32(bytes, at + 1)?;
        let end = body.checked_add(len as usize).filter(|&end| end <= bytes.len());
        let end = end.with_context(|| format!("section {id} at byte {at} runs past the end"))?;
        out.push(Section { id, start: at, body: body..end });
        at = end;
    }
    Ok(out)
}

/// A LEB128 u32 at `at`: its value and where it ends.
fn read_u32(bytes: &[u8], at: usize) -> Result<(u32, usize)> {
    let mut reader = BinaryReader::new(bytes.get(at..).context("truncated binary")?, at);
    let value = reader.read_var_u32().context("read a LEB128 length")?;
    Ok((value, at + reader.current_position()))
}

fn push_u32(out: &mut Vec<u8>, mut value: u32) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn push_i32(out: &mut Vec<u8>, mut value: i32) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        let done = (value == 0 && byte & 0x40 == 0) || (value == -1 && byte & 0x40 != 0);
        out.push(if done { byte } else { byte | 0x80 });
        if done {
            return;
        }
    }
}

fn push_section(out: &mut Vec<u8>, id: u8, body: &[u8]) {
    out.push(id);
    push_u32(out, body.len() as u32);
    out.extend_from_slice(body);
}

fn push_name(out: &mut Vec<u8>, name: &str) {
    push_u32(out, name.len() as u32);
    out.extend_from_slice(name.as_bytes());
}

/// What pre-initialization needs to know of a core module.
#[derive(Default)]
struct Shape {
    exports_preinit: bool,
    has_start: bool,
    imported_memories: u32,
    /// (64-bit, shared, custom page size, maximum pages) of each defined memory.
    memories: Vec<(bool, bool, bool, Option<u64>)>,
    /// Indices of the mutable globals the module defines.
    mutable_globals: Vec<u32>,
    passive_or_foreign_data: bool,
    /// The lowest offset of an active data segment placed by a constant.
    lowest_data: Option<u32>,
}

impl Shape {
    fn of(module: &[u8]) -> Result<Shape> {
        ensure!(module.get(..8) == Some(b"\0asm\x01\0\0\0".as_slice()), "not a core WebAssembly module");
        let mut shape = Shape::default();
        let mut imported_globals = 0;
        for section in sections(module, 8)? {
            let reader = BinaryReader::new(&module[section.body.clone()], section.body.start);
            match section.id {
                2 => {
                    for import in wasmparser::ImportSectionReader::new(reader)?.into_imports() {
                        match import?.ty {
                            TypeRef::Memory(_) => shape.imported_memories += 1,
                            TypeRef::Global(_) => imported_globals += 1,
                            _ => {}
                        }
                    }
                }
                5 => {
                    for memory in wasmparser::MemorySectionReader::new(reader)? {
                        let memory = memory?;
                        shape.memories.push((
                            memory.memory64,
                            memory.shared,
                            memory.page_size_log2.is_some(),
                            memory.maximum,
                        ));
                    }
                }
                6 => {
                    for (index, global) in wasmparser::GlobalSectionReader::new(reader)?.into_iter().enumerate() {
                        if global?.ty.mutable {
                            shape.mutable_globals.push(imported_globals + index as u32);
                        }
                    }
                }
                7 => {
                    for export in wasmparser::ExportSectionReader::new(reader)? {
                        let export = export?;
                        shape.exports_preinit |= export.name == PREINIT_EXPORT && export.kind == ExternalKind::Func;
                    }
                }
                8 => shape.has_start = true,
                11 => {
                    for data in wasmparser::DataSectionReader::new(reader)? {
                        match data?.kind {
                            DataKind::Active { memory_index: 0, offset_expr } => {
                                if let Ok(wasmparser::Operator::I32Const { value }) =
                                    offset_expr.get_operators_reader().read()
                                {
                                    let offset = value as u32;
                                    shape.lowest_data = Some(shape.lowest_data.map_or(offset, |low| low.min(offset)));
                                }
                            }
                            _ => shape.passive_or_foreign_data = true,
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(shape)
    }

    fn check_rewritable(&self) -> Result<()> {
        ensure!(!self.has_start, "the module has a start function");
        ensure!(self.imported_memories == 0, "the module imports its memory");
        match self.memories.as_slice() {
            [(false, false, false, _)] => {}
            [_] => bail!("the module's memory is 64-bit, shared or has custom pages"),
            other => bail!("the module defines {} memories, not one", other.len()),
        }
        ensure!(!self.passive_or_foreign_data, "the module has passive data segments");
        Ok(())
    }
}

/// The module with exports for its memory and each mutable global.
fn instrument(module: &[u8], shape: &Shape) -> Result<Vec<u8>> {
    let mut out = module[..8].to_vec();
    for section in sections(module, 8)? {
        if section.id != 7 {
            out.extend_from_slice(&module[section.start..section.body.end]);
            continue;
        }
        let (count, entries) = read_u32(module, section.body.start)?;
        let mut body = Vec::new();
        push_u32(&mut body, count + 1 + shape.mutable_globals.len() as u32);
        body.extend_from_slice(&module[entries..section.body.end]);
        push_name(&mut body, MEMORY_EXPORT);
        body.push(0x02);
        push_u32(&mut body, 0);
        for &global in &shape.mutable_globals {
            push_name(&mut body, &format!("{GLOBAL_EXPORT}{global}"));
            body.push(0x03);
            push_u32(&mut body, global);
        }
        push_section(&mut out, 7, &body);
    }
    Ok(out)
}

/// What the pre-initializing instance may use.
struct Preinit {
    env: Vec<(String, String)>,
    limits: StoreLimits,
}

/// Instantiates the instrumented module, runs its pre-initialization and
/// gives back its linear memory.
fn run(
    engine: &Engine,
    module: &[u8],
    shape: &Shape,
    env: &[(String, String)],
    cache_dir: &Path,
    timeout: Duration,
    max_memory_bytes: usize,
) -> Result<Vec<u8>> {
    let instrumented = instrument(module, shape)?;
    let (module, _) = engine::load_module(engine, "signer-preinit", &instrumented, cache_dir)?;
    let limits = StoreLimitsBuilder::new().memory_size(max_memory_bytes).instances(1).build();
    let state = Preinit { env: env.to_vec(), limits };
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limits);
    store.set_epoch_deadline(engine::deadline_ticks(timeout));
    store.epoch_deadline_trap();
    let mut imports = Vec::new();
    for import in module.imports() {
        let ExternType::Func(ty) = import.ty() else {
            bail!("the module imports {}#{}, which is not a function", import.module(), import.name());
        };
        imports.push(Extern::Func(host_function(&mut store, import.module(), import.name(), ty)));
    }
    let instance = Instance::new(&mut store, &module, &imports).anyhow().context("instantiate the module")?;
    let globals = |store: &mut Store<Preinit>| -> Result<Vec<(u32, i128)>> {
        let mut values = Vec::new();
        for &index in &shape.mutable_globals {
            let global = instance
                .get_global(&mut *store, &format!("{GLOBAL_EXPORT}{index}"))
                .context("the instrumented global export is missing")?;
            let value = match global.get(&mut *store) {
                Val::I32(v) => v as i128,
                Val::I64(v) => v as i128,
                other => {
                    bail!("mutable global {index} holds a {:?}, which a snapshot does not carry", other.ty(&*store))
                }
            };
            values.push((index, value));
        }
        Ok(values)
    };
    let before = globals(&mut store)?;
    let preinit = instance.get_typed_func::<(), ()>(&mut store, PREINIT_EXPORT).anyhow().context("find the export")?;
    preinit.call(&mut store, ()).anyhow().with_context(|| format!("run {PREINIT_EXPORT}"))?;
    let after = globals(&mut store)?;
    for ((index, was), (_, is)) in before.iter().zip(&after) {
        ensure!(was == is, "{PREINIT_EXPORT} left mutable global {index} changed ({was} to {is})");
    }
    let memory = instance.get_memory(&mut store, MEMORY_EXPORT).context("the instrumented memory export is missing")?;
    let mut memory = memory.data(&store).to_vec();
    // With the stack first (LLVM's layout for Rust), the module's one
    // mutable global is the stack pointer and all below it is the stack,
    // dead once the export returned: its leftovers (key material among
    // them) stay out of the snapshot.
    if let ([(_, stack_pointer)], Some(lowest_data)) = (after.as_slice(), shape.lowest_data)
        && let Ok(stack_pointer) = usize::try_from(*stack_pointer)
        && stack_pointer <= lowest_data as usize
        && stack_pointer <= memory.len()
    {
        memory[..stack_pointer].fill(0);
    }
    Ok(memory)
}

/// The environment and the wall clock, as wasi:cli and wasi:clocks 0.2
/// lower them (UTF-8, the module's `cabi_realloc`: how wit-bindgen's Rust
/// components lower them); every other import traps, naming itself. The
/// monotonic clock is refused too: an instant kept in the snapshot would
/// mean nothing to the instances made from it, whose clock has another origin.
fn host_function(store: &mut Store<Preinit>, module: &str, name: &str, ty: FuncType) -> Func {
    let shape = |params: &[ValType], results: &[ValType]| {
        ty.params().len() == params.len()
            && ty.results().len() == results.len()
            && ty.params().zip(params).all(|(a, b)| ValType::eq(&a, b))
            && ty.results().zip(results).all(|(a, b)| ValType::eq(&a, b))
    };
    let interface = module.split('@').next().unwrap_or(module);
    let versioned = module.starts_with(&format!("{interface}@0.2."));
    match (interface, name) {
        ("wasi:cli/environment", "get-environment") if versioned && shape(&[ValType::I32], &[]) => {
            Func::new(&mut *store, ty, |mut caller, params, _| lower_environment(&mut caller, params[0].unwrap_i32()))
        }
        ("wasi:clocks/wall-clock", "now") if versioned && shape(&[ValType::I32], &[]) => {
            Func::new(&mut *store, ty, |mut caller, params, _| {
                let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
                let mut datetime = now.as_secs().to_le_bytes().to_vec();
                datetime.extend_from_slice(&now.subsec_nanos().to_le_bytes());
                write(&mut caller, params[0].unwrap_i32(), &datetime)
            })
        }
        _ => {
            let what = format!("{module}#{name}");
            Func::new(&mut *store, ty, move |_, _, _| {
                Err(wasmtime::format_err!(
                    "pre-initialization may read the environment and the wall clock only; it called {what}"
                ))
            })
        }
    }
}

fn memory(caller: &mut Caller<'_, Preinit>) -> wasmtime::Result<wasmtime::Memory> {
    caller.get_export(MEMORY_EXPORT).and_then(Extern::into_memory).ok_or_else(|| wasmtime::format_err!("no memory"))
}

fn write(caller: &mut Caller<'_, Preinit>, at: i32, bytes: &[u8]) -> wasmtime::Result<()> {
    memory(caller)?.write(&mut *caller, at as u32 as usize, bytes).map_err(wasmtime::Error::msg)
}

/// `list<tuple<string, string>>` into the guest's memory, allocated with its `cabi_realloc`.
fn lower_environment(caller: &mut Caller<'_, Preinit>, retptr: i32) -> wasmtime::Result<()> {
    let realloc = caller
        .get_export("cabi_realloc")
        .and_then(Extern::into_func)
        .ok_or_else(|| wasmtime::format_err!("the module exports no cabi_realloc"))?
        .typed::<(i32, i32, i32, i32), i32>(&*caller)?;
    let env = caller.data().env.clone();
    let size = |len: usize| i32::try_from(len).map_err(|_| wasmtime::format_err!("the environment is over 2 GiB"));
    let list = realloc.call(&mut *caller, (0, 0, 4, size(env.len().saturating_mul(16))?))?;
    let mut entries = Vec::with_capacity(env.len() * 16);
    for (key, value) in &env {
        for text in [key, value] {
            let at = realloc.call(&mut *caller, (0, 0, 1, size(text.len())?))?;
            write(caller, at, text.as_bytes())?;
            entries.extend_from_slice(&at.to_le_bytes());
            entries.extend_from_slice(&(text.len() as u32).to_le_bytes());
        }
    }
    write(caller, list, &entries)?;
    let mut answer = list.to_le_bytes().to_vec();
    answer.extend_from_slice(&(env.len() as u32).to_le_bytes());
    write(caller, retptr, &answer)
}

/// The module with `memory` as its initial memory: its minimum size, and
/// its non-zero bytes as active data segments. Gives back the module and
/// how many segments it has.
fn rebuild_module(module: &[u8], shape: &Shape, memory: &[u8]) -> Result<(Vec<u8>, usize)> {
    ensure!(memory.len().is_multiple_of(65536), "linear memory of {} bytes is not whole pages", memory.len());
    let pages = (memory.len() / 65536) as u32;
    let mut gap = SEGMENT_GAP;
    let mut runs = nonzero_runs(memory, gap);
    while runs.len() > MAX_SEGMENTS {
        gap *= 2;
        runs = nonzero_runs(memory, gap);
    }
    let mut data = Vec::new();
    push_u32(&mut data, runs.len() as u32);
    for run in &runs {
        data.push(0x00); // active, memory 0
        data.push(0x41); // i32.const
        push_i32(&mut data, run.start as i32);
        data.push(0x0b); // end
        push_u32(&mut data, run.len() as u32);
        data.extend_from_slice(&memory[run.clone()]);
    }
    let mut out = module[..8].to_vec();
    let mut wrote_data = false;
    let all = sections(module, 8)?;
    let has_data = all.iter().any(|s| s.id == 11);
    for section in all {
        match section.id {
            5 => {
                let maximum = shape.memories[0].3;
                let mut body = vec![1, u8::from(maximum.is_some())];
                push_u32(&mut body, pages);
                if let Some(maximum) = maximum {
                    push_u32(&mut body, u32::try_from(maximum).context("maximum pages")?);
                }
                push_section(&mut out, 5, &body);
            }
            12 => {
                let mut body = Vec::new();
                push_u32(&mut body, runs.len() as u32);
                push_section(&mut out, 12, &body);
            }
            11 => {
                push_section(&mut out, 11, &data);
                wrote_data = true;
            }
            10 if !has_data => {
                out.extend_from_slice(&module[section.start..section.body.end]);
                push_section(&mut out, 11, &data);
                wrote_data = true;
            }
            _ => out.extend_from_slice(&module[section.start..section.body.end]),
        }
    }
    ensure!(wrote_data || runs.is_empty(), "the module has no code section to put its data after");
    Ok((out, runs.len()))
}

/// The ranges of `memory` that hold non-zero bytes, runs closer than `gap` merged.
fn nonzero_runs(memory: &[u8], gap: usize) -> Vec<Range<usize>> {
    let mut runs: Vec<Range<usize>> = Vec::new();
    let mut at = 0;
    while let Some(start) = memory[at..].iter().position(|&b| b != 0).map(|i| at + i) {
        let end = memory[start..].iter().position(|&b| b == 0).map_or(memory.len(), |i| start + i);
        match runs.last_mut() {
            Some(last) if start - last.end < gap => last.end = end,
            _ => runs.push(start..end),
        }
        at = end;
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_zero_runs_merge_across_short_gaps_only() {
        let mut memory = vec![0u8; 4096];
        memory[10] = 1;
        memory[20..30].fill(2);
        memory[30 + SEGMENT_GAP..40 + SEGMENT_GAP].fill(3);
        memory[4095] = 4;
        assert_eq!(nonzero_runs(&memory, SEGMENT_GAP), vec![10..30, 30 + SEGMENT_GAP..40 + SEGMENT_GAP, 4095..4096]);
        assert_eq!(nonzero_runs(&memory, SEGMENT_GAP * 2), vec![10..40 + SEGMENT_GAP, 4095..4096]);
        assert!(nonzero_runs(&[0; 100], SEGMENT_GAP).is_empty());
    }

    /// A core module: the header and `sections` (id, body).
    fn module(sections: &[(u8, &[u8])]) -> Vec<u8> {
        let mut out = b"\0asm\x01\0\0\0".to_vec();
        for (id, body) in sections {
            push_section(&mut out, *id, body);
        }
        out
    }

    #[test]
    fn modules_a_snapshot_cannot_be_written_into_are_refused_by_name() {
        let memory: (u8, &[u8]) = (5, &[1, 0, 1]);
        let passive = module(&[memory, (12, &[1]), (11, &[1, 1, 1, b'x'])]);
        let two_memories = module(&[(5, &[2, 0, 1, 0, 1])]);
        let start = module(&[(1, &[1, 0x60, 0, 0]), (3, &[1, 0]), memory, (8, &[0]), (10, &[1, 2, 0, 0x0b])]);
        let memory64 = module(&[(5, &[1, 0x04, 1])]);
        for (module, refusal) in [
            (passive, "passive data segments"),
            (two_memories, "defines 2 memories"),
            (start, "start function"),
            (memory64, "64-bit"),
        ] {
            let error = Shape::of(&module).and_then(|shape| shape.check_rewritable()).unwrap_err();
            assert!(error.to_string().contains(refusal), "{error:#}");
        }
        assert!(Shape::of(&module(&[memory])).unwrap().check_rewritable().is_ok());
    }

    /// The probe component's snapshot: its memory is whole pages from the
    /// module's minimum, and nothing below the stack pointer (the dead
    /// stack) is in it.
    #[test]
    fn a_snapshot_starts_at_its_memory_and_leaves_the_dead_stack_out() {
        const PROBE: &[u8] = include_bytes!(env!("SNAPSIGN_REUSE_PROBE_WASM"));
        let engine = engine::engine(engine::EngineLimits { max_concurrency: 1, max_memory_bytes: 16 << 20 }).unwrap();
        let cache = tempfile::tempdir().unwrap();
        let env = [("SECRET".to_owned(), "do-not-keep-this-one".to_owned())];
        let snapshot = snapshot(&engine, PROBE, &env, cache.path(), Duration::from_secs(10), 16 << 20)
            .unwrap()
            .expect("the probe exports snapsign-preinit");
        let module = sections(&snapshot.component, 8)
            .unwrap()
            .into_iter()
            .filter(|s| s.id == 1)
            .map(|s| &snapshot.component[s.body])
            .find(|m| Shape::of(m).unwrap().exports_preinit)
            .unwrap();
        let shape = Shape::of(module).unwrap();
        assert_eq!(shape.memories.len(), 1);
        let mut stack_pointer = None;
        let mut minimum = None;
        for section in sections(module, 8).unwrap() {
            let reader = BinaryReader::new(&module[section.body.clone()], section.body.start);
            match section.id {
                5 => {
                    minimum = Some(
                        wasmparser::MemorySectionReader::new(reader)
                            .unwrap()
                            .into_iter()
                            .next()
                            .unwrap()
                            .unwrap()
                            .initial,
                    )
                }
                6 => {
                    let global =
                        wasmparser::GlobalSectionReader::new(reader).unwrap().into_iter().next().unwrap().unwrap();
                    if let wasmparser::Operator::I32Const { value } =
                        global.init_expr.get_operators_reader().read().unwrap()
                    {
                        stack_pointer = Some(value as u32);
                    }
                }
                _ => {}
            }
        }
        assert_eq!(minimum, Some(snapshot.memory_bytes as u64 / 65536));
        let (stack_pointer, lowest) = (stack_pointer.unwrap(), shape.lowest_data.unwrap());
        assert!(
            stack_pointer > 0 && lowest >= stack_pointer,
            "data at {lowest} below the stack pointer {stack_pointer}"
        );
        assert!(snapshot.segments > 0);
        // The environment it read is in the snapshot (wasi-libc keeps it):
        // why the snapshot is compiled in memory only, never cached.
        assert!(snapshot.component.windows(20).any(|w| w == b"do-not-keep-this-one"));
    }

    #[test]
    fn leb128_round_trips_at_the_edges() {
        for value in [0u32, 1, 127, 128, 16_383, 16_384, u32::MAX] {
            let mut bytes = Vec::new();
            push_u32(&mut bytes, value);
            assert_eq!(read_u32(&bytes, 0).unwrap(), (value, bytes.len()));
        }
        for value in [0i32, 63, 64, -1, -64, -65, i32::MAX, i32::MIN, 1 << 20] {
            let mut bytes = Vec::new();
            push_i32(&mut bytes, value);
            assert_eq!(BinaryReader::new(&bytes, 0).read_var_i32().unwrap(), value);
        }
    }
}
